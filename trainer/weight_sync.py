"""Publishing new policy weights to the rollout services, then bumping `opd:<run>:policy_version`.

Two transports (DESIGN.md 3.2):
    http    PUT /v1/weights?version=N with the safetensors bytes of the full state dict (bearer token)
    shared  write `policy-<N>.safetensors` (atomically: tmp file + rename) into a directory the services can
            read, then POST /v1/weights/load {path, version} to each (for models too large to stream)

With no rollout URL configured a push only bumps the version in Redis (records then still carry versions).
All servers are pushed to concurrently; a push fails loudly if any server refuses.

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
from services.rollout.client import RolloutClient, RolloutError, state_dict_to_safetensors
from services.rollout.protocol import WeightInfo

log = logging.getLogger(__name__)

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


class Weights(Protocol):
    """The full weights to push, produced on demand (trainer/parallel.py: ModuleWeights gathers FSDP shards).

    `specs` names every tensor with its full shape and the serving dtype, in send order, without moving any
    data. `tensors` yields (name, CPU tensor) in that order; under FSDP each is a collective, so every rank
    iterates it in step (only the main rank gets tensors)."""

    def specs(self) -> list[TensorSpec]: ...

    def tensors(self) -> Iterator[tuple[str, Tensor]]: ...


class StateDictWeights:
    """Weights from a plain state dict (one process: tests, tools)."""

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
    ) -> None:
        self.redis = redis_client
        self.key = redis_keys.policy_version_key(run)
        self.mode = mode
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.keep_files = keep_files
        self.down_timeout_s = down_timeout_s
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

    def _write_shared(self, body: bytes, version: int) -> str:
        assert self.shared_dir is not None
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        final = shared_path(self.shared_dir, version)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)  # a reader never sees a partial file
        for old in sorted(self.shared_dir.glob(f"{SHARED_PREFIX}*.safetensors"))[: -self.keep_files]:
            old.unlink(missing_ok=True)
        return str(final.resolve())

    def push(self, weights: Weights, version: int, only: list[int] | None = None) -> float:
        """Send the weights as `version` to the servers (all, or indices `only`), then SET the version key.

        `weights` gives the full state dict in the serving dtype (trainer/parallel.py gathers it); it is
        read only when there is a server to send to. Returns the seconds spent.
        """
        t0 = time.perf_counter()
        indices = list(range(len(self.clients)) if only is None else only)
        if indices:
            body = state_dict_to_safetensors(dict(weights.tensors()))
            path = self._write_shared(body, version) if self.mode == "shared" else None

            def send(c: RolloutClient) -> WeightInfo:
                return c.load_weights(path, version) if path else c.put_weights(body, version)

            infos = list(self._pool.map(lambda i: self._send_until_up(i, send, version), indices))
            for info in infos:
                if info.version != version:
                    raise RuntimeError(f"rollout reports version {info.version} after a push of {version}")
        redis_keys.call_with_backoff(lambda: self.redis.set(self.key, version), timeout_s=self.down_timeout_s)
        return time.perf_counter() - t0

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
