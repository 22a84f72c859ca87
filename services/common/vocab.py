"""The vocabulary hash that the teacher reports (GetInfo.tokenizer_sha256) and the worker checks its student
tokenizer against (services/worker/vocab_check.py): one definition for both sides."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def vocab_sha256(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token string -> id, keys sorted, compact JSON, UTF-8): same ids, same hash."""
    blob = json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
