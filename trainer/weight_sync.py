"""Publishing new policy weights to the rollout services, then bumping `opd:<run>:policy_version`.

Two transports (DESIGN.md 3.2, docs/rollout.md "Weight push"):
    http    PUT /v1/weights?version=N, streamed: the safetensors header is built from `Weights.specs()`,
            then each tensor's bytes go out in buckets (64 MiB) as `Weights.tensors()` yields them, to all
            servers concurrently from one pass (bounded per-server queues: a slow server holds the pass
            back). The serialised model is never held, on the trainer or on a server.
    shared  write `policy-<N>.safetensors` (streamed the same way; atomically: tmp file + rename) into a
            directory the services can read, then POST /v1/weights/load {path, version} to each

With no rollout URL configured a push only bumps the version in Redis (records then still carry versions).
A push fails loudly if any server refuses (401, 409 at another version, 413, 422).

One pass: `tensors()` is iterated exactly once per push, to its end, whatever the servers answer (under
FSDP it is a collective every rank takes part in). So a server that is down is waited for *before* the
pass (up to `down_timeout_s`), and one that fails in the middle of it (killed, restarted) is sent the
weights again only if they can be read again: `StateDictWeights`, or any Weights in a single process. Under
FSDP it is left behind instead (logged; the Redis version is then not bumped): the next push, or the
trainer's check for rollouts that serve an older version, brings it current.

Versions: the rollout starts at version 0 and the trainer's version after k pushes is k. `reconcile` runs at
start: if a server is behind (the trainer crashed after checkpointing version v but before pushing it) it
gets the current weights at version v; if a server is ahead (weights pushed after the last checkpoint were
lost in a crash) the trainer's version jumps past it and all servers get the current weights, because the
served weights are not the trainer's and versions only increase.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import httpx
import redis
import torch
from torch import Tensor

from services.common import redis_keys
from services.common.policy_files import SHARED_PREFIX, shared_path
from services.rollout.client import RolloutClient, RolloutError, push_weights_stream
from services.rollout.protocol import WeightInfo
from services.rollout.weights_stream import BUCKET_BYTES, encode_header, iter_body

log = logging.getLogger(__name__)

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


class Weights(Protocol):
    """The full weights to push, produced on demand (trainer/parallel.py: ModuleWeights gathers FSDP shards).

    `specs` names every tensor with its full shape and the serving dtype, in send order, without moving any
    data. `tensors` yields (name, CPU tensor) in that order; under FSDP each is a collective, so every rank
    iterates it in step (only the main rank gets tensors). A push reads `tensors` once, to its end; an
    optional `replayable` attribute says whether a retry may read it again (see `replayable`)."""

    def specs(self) -> list[TensorSpec]: ...

    def tensors(self) -> Iterator[tuple[str, Tensor]]: ...


def replayable(weights: Weights) -> bool:
    """Whether `weights.tensors()` may be iterated again (another pass, for a retry): a Weights says so with
    a `replayable` attribute; else only outside a multi-rank job (where each tensor may be a collective)."""
    flag = getattr(weights, "replayable", None)
    if flag is not None:
        return bool(flag)
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


class _OnePass:
    """`weights` for one push: `finish` reads whatever of the pass nothing read, so that a push that failed
    before or during its pass still takes part in every gather (under FSDP the other ranks gather each
    tensor with rank 0 and would wait forever). A retry's second pass (replayable weights only) is fresh."""

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.replayable = replayable(weights)
        self._it: Iterator[tuple[str, Tensor]] | None = None

    def specs(self) -> list[TensorSpec]:
        return self.weights.specs()

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        if self._it is not None:
            return iter(self.weights.tensors())  # another pass: callers check `replayable` first
        self._it = iter(self.weights.tensors())
        return self._it

    def finish(self) -> None:
        if self.replayable:
            return  # nobody waits on a pass of these
        try:
            for _ in self._it if self._it is not None else self.tensors():
                pass
        except Exception:
            log.exception("reading the rest of the weights after a failed push")


class StateDictWeights:
    """Weights from a plain state dict (one process: tests, tools)."""

    replayable = True

    def __init__(self, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> None:
        self._sd = state_dict
        self._dtype = dtype

    def _cast(self, t: Tensor) -> Tensor:
        t = t.detach().to("cpu")
        return t.to(self._dtype) if self._dtype is not None and t.is_floating_point() else t

    def specs(self) -> list[TensorSpec]:
        out = []
        for name, t in self._sd.items():
            dtype = self._dtype if self._dtype is not None and t.is_floating_point() else t.dtype
            out.append((name, tuple(t.shape), dtype))
        return out

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name, t in self._sd.items():
            yield name, self._cast(t)


class WeightSync:
    """Pushes to every configured rollout service; rank 0 only."""

    def __init__(
        self,
        redis_client: redis.Redis,
        run: str,
        rollout_urls: list[str],
        *,
        mode: str = "http",
        shared_dir: str = "",
        token: str | None = None,
        timeout_s: float = 300.0,
        keep_files: int = 2,
        tls_ca_file: str | None = None,
        down_timeout_s: float = 300.0,
        bucket_bytes: int = BUCKET_BYTES,
        queue_buckets: int = 2,
    ) -> None:
        self.redis = redis_client
        self.key = redis_keys.policy_version_key(run)
        self.mode = mode
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.keep_files = keep_files
        self.down_timeout_s = down_timeout_s
        self.bucket_bytes, self.queue_buckets = bucket_bytes, queue_buckets
        self.urls = list(rollout_urls)
        self.clients = [
            RolloutClient(url, token=token, timeout_s=timeout_s, tls_ca_file=tls_ca_file)
            for url in rollout_urls
        ]
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.clients)), thread_name_prefix="push")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for c in self.clients:
            c.close()

    def versions(self) -> list[int]:
        return list(self._pool.map(lambda c: c.weights().version, self.clients))

    def behind(self, version: int) -> list[int]:
        """Indices of the servers that report a version below `version` (a restart without resume serves
        its initial weights at version 0). An unreachable server is not counted: its push will wait for it.
        """

        def served(i: int) -> int | None:
            try:
                return self.clients[i].weights().version
            except (RolloutError, httpx.TransportError) as e:
                log.warning("rollout %s: version unknown (%s)", self.urls[i], e)
                return None

        found = list(self._pool.map(served, range(len(self.clients))))
        return [i for i, v in enumerate(found) if v is not None and v < version]

    def _write_shared(self, weights: _OnePass, version: int) -> str:
        assert self.shared_dir is not None
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        final = shared_path(self.shared_dir, version)
        tmp = final.with_suffix(".tmp")
        specs = weights.specs()
        prefix, _ = encode_header(specs)
        with open(tmp, "wb") as fh:
            for bucket in iter_body(prefix, specs, weights.tensors(), self.bucket_bytes):
                fh.write(bucket)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)  # a reader never sees a partial file
        for old in sorted(self.shared_dir.glob(f"{SHARED_PREFIX}*.safetensors"))[: -self.keep_files]:
            old.unlink(missing_ok=True)
        return str(final.resolve())

    def push(self, weights: Weights, version: int, only: list[int] | None = None) -> float:
        """Send the weights as `version` to the servers (all, or indices `only`), then SET the version key.

        `weights` gives the full state dict in the serving dtype (trainer/parallel.py gathers it); it is
        read (one pass) only when there is a server to send to. Returns the seconds spent.
        """
        t0 = time.perf_counter()
        indices = list(range(len(self.clients)) if only is None else only)
        complete = True
        if indices:
            once = _OnePass(weights)
            try:
                if self.mode == "shared":
                    path = self._write_shared(once, version)
                    infos = list(
                        self._pool.map(
                            lambda i: self._send_until_up(
                                i, lambda c: c.load_weights(path, version), version
                            ),
                            indices,
                        )
                    )
                else:
                    infos, complete = self._push_http(once, version, indices)
            finally:
                once.finish()
            for info in infos:
                if info.version != version:
                    raise RuntimeError(f"rollout reports version {info.version} after a push of {version}")
        if complete:
            redis_keys.call_with_backoff(
                lambda: self.redis.set(self.key, version), timeout_s=self.down_timeout_s
            )
        return time.perf_counter() - t0

    def _push_http(
        self, weights: _OnePass, version: int, indices: list[int]
    ) -> tuple[list[WeightInfo], bool]:
        """Stream `weights` to the servers `indices` in one pass; (their infos, whether every one has it)."""
        # wait out restarts before the pass: a server down now could not be sent this pass later
        served = dict(zip(indices, self._pool.map(self._served_when_up, indices), strict=True))
        targets = [i for i in indices if served[i] != version]
        for i in set(indices) - set(targets):
            log.info("%s already serves version %d (resumed from its checkpoint)", self.urls[i], version)
        infos: list[WeightInfo] = []
        if not targets:
            return infos, True  # nothing to send (a pass others wait on is read by `finish`)
        specs = weights.specs()
        results = push_weights_stream(
            [self.clients[i] for i in targets],
            specs,
            weights.tensors(),
            version,
            bucket_bytes=self.bucket_bytes,
            queue_buckets=self.queue_buckets,
            pool=self._pool,
        )
        failed: list[int] = []
        for i, result in zip(targets, results, strict=True):
            if isinstance(result, WeightInfo):
                infos.append(result)
            elif isinstance(result, RolloutError) and result.status_code == 409:
                info = self.clients[i].weights()
                if info.version != version:
                    raise result
                infos.append(info)  # a concurrent restart resumed exactly this version
            elif isinstance(result, httpx.TransportError) or (
                isinstance(result, RolloutError) and result.status_code == 503
            ):
                log.warning(
                    "rollout %s failed during the push of version %d: %s", self.urls[i], version, result
                )
                failed.append(i)
            else:
                raise result
        prefix, length = encode_header(specs)

        def again(c: RolloutClient) -> WeightInfo:  # another pass, for one server
            body = iter_body(prefix, specs, weights.tensors(), self.bucket_bytes)
            return c.put_weights_stream(_pieces(body), length, version, wait_sha256=False)

        complete = True
        for i in failed:
            if weights.replayable:
                infos.append(self._send_until_up(i, again, version))
            elif self._served_when_up(i) == version:
                infos.append(self.clients[i].weights())
            else:
                log.error(
                    "rollout %s missed version %d (the weights are gathered in one pass): the next push or "
                    "the check for rollouts behind brings it current",
                    self.urls[i],
                    version,
                )
                complete = False
        return infos, complete

    def _served_when_up(self, i: int) -> int:
        """Server i's served version, waiting out a restart (503 or unreachable) for up to down_timeout_s."""
        client, url = self.clients[i], self.urls[i]
        deadline = time.monotonic() + self.down_timeout_s
        delay = 0.5
        while True:
            try:
                return client.served_version()
            except (RolloutError, httpx.TransportError) as e:
                if (isinstance(e, RolloutError) and e.status_code != 503) or time.monotonic() > deadline:
                    raise
            log.warning("rollout %s unreachable before a weight push; waiting", url)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)

    def _send_until_up(self, i: int, send: Callable[[RolloutClient], WeightInfo], version: int) -> WeightInfo:
        """One server's push, waiting out a restart of that server for up to `down_timeout_s`.

        A server restarted with `--resume-from` may already serve this version, loaded from the checkpoint
        that was committed before this push (so the same weights): its 409 then means done.
        """
        client, url = self.clients[i], self.urls[i]
        deadline = time.monotonic() + self.down_timeout_s
        delay = 0.5
        while True:
            try:
                return send(client)
            except RolloutError as e:
                if e.status_code == 409:
                    info = client.weights()
                    if info.version == version:
                        log.info("%s already serves version %d (resumed from its checkpoint)", url, version)
                        return info
                if e.status_code != 503 or time.monotonic() > deadline:
                    raise
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            log.warning("rollout %s unreachable during the push of version %d; retrying", url, version)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)

    def reconcile(self, weights: Weights, version: int) -> int:
        """Bring the servers to the trainer's weights at start; returns the trainer's (possibly raised) version."""
        served = self.versions()
        if served and max(served) > version:
            new = max(served) + 1
            log.warning(
                "rollout versions %s are ahead of the checkpoint's %d (pushed after the last checkpoint, "
                "then lost): pushing the current weights as version %d",
                served,
                version,
                new,
            )
            self.push(weights, new)
            return new
        behind = [i for i, v in enumerate(served) if v < version]
        if behind:
            log.info("rollouts %s are behind version %d: pushing it", behind, version)
            self.push(weights, version, only=behind)
        else:
            redis_keys.call_with_backoff(
                lambda: self.redis.set(self.key, version), timeout_s=self.down_timeout_s
            )
        return version


def _pieces(buckets: Iterator[memoryview], piece: int = 1 << 20) -> Iterator[memoryview]:
    for bucket in buckets:
        for start in range(0, len(bucket), piece):
            yield bucket[start : start + piece]
