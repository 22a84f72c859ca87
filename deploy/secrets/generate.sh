#!/bin/sh
# Make the secret files docker-compose.yml mounts (and that `kubectl create secret` can read):
# teacher_token, weights_token, redis_password. Hex, so that the Redis password is URL-safe. Existing files
# are kept: rerunning never changes a running deployment's secrets.
set -eu
dir=$(dirname "$0")
umask 077
chmod 700 "$dir"
for name in teacher_token weights_token redis_password; do
    file="$dir/$name"
    if [ -s "$file" ]; then
        echo "kept $file"
        continue
    fi
    python3 -c 'import secrets; print(secrets.token_hex(32))' > "$file"
    # Compose bind-mounts secret files with their host permissions; the containers run as other users
    # (uid 10001, redis), so the files are world-readable inside a directory only the owner can enter.
    chmod 644 "$file"
    echo "wrote $file"
done
