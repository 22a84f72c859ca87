"""push_mode = "collective": weights reach every rollout replica by one broadcast (issue #16).

The trainer (rank 0 only) hosts a TCPStore on `collective_addr:collective_port` and forms a group with the
replicas (ranks 1..N) through their HTTP control plane (services/rollout/collective_api.py, bearer token):
every replica is asked to join concurrently while the trainer creates rank 0, since a join is a rendezvous.
Each push then:

1. posts the update ({version, specs, bucket plan}) to every replica; each checks the version and the specs
   against its served schema and writes its verdict into the store;
2. when every replica accepted, says "go" in the store (otherwise "abort": nothing moves, and the push
   raises the replica's 409/422);
3. reads `weights.tensors()` once, packing tensors into flat buckets (`collective_bucket_mb`), and sends each
   bucket once (gloo: a pipelined chain through the replicas; NCCL: its ring broadcast), so N replicas cost
   about what one does;
4. collects every replica's WeightInfo (each installed the tensors atomically) and sets the Redis version key,
   as WeightSync does.

Failures. A replica that dies mid-transfer closes its connections and the transfer fails at once; one that
stops without dying fails it after `collective_timeout_s`. Either way the push raises CollectiveError and the
group is dropped: the next push forms a new one (a fresh group name in the same store). A replica that
restarted since the group was formed answers "not a member" before anything moves; the push then re-forms
the group and tries once more. A push to a subset of the replicas (`only`: a restarted one that is behind)
goes over HTTP (WeightSync), since the group spans them all. `versions`, `behind` and `reconcile` are
WeightSync's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import torch
from torch import Tensor

from services.common import redis_keys
from services.common.devices import resolve_device
from services.rollout.client import RolloutError, tls_verify
from services.rollout.collective import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_CHUNK_BYTES,
    CollectiveError,
    Group,
    TCPStore,
    dtype_name,
    host_store,
    local_address_towards,
    plan_buckets,
    update_keys,
)
from services.rollout.protocol import WeightInfo
from trainer.config import TrainerConfig
from trainer.weight_sync import Weights, WeightSync

log = logging.getLogger(__name__)

__all__ = ["CollectiveError", "CollectiveSync"]


class _Rejoin(Exception):
    """A replica is not (or no longer) in the group, and nothing was sent: form the group anew."""


class CollectiveSync(WeightSync):
    """WeightSync whose pushes go by collective broadcast; rank 0 only."""

    def __init__(
        self,
        redis_client: redis.Redis,
        run: str,
        rollout_urls: list[str],
        *,
        token: str | None = None,
        timeout_s: float = 300.0,
        tls_ca_file: str | None = None,
        down_timeout_s: float = 300.0,
        addr: str = "",
        port: int = 0,
        backend: str = "auto",
        device: str = "cpu",
        collective_timeout_s: float = 120.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__(
            redis_client,
            run,
            rollout_urls,
            mode="http",  # what a push to a subset of the replicas uses
            token=token,
            timeout_s=timeout_s,
            tls_ca_file=tls_ca_file,
            down_timeout_s=down_timeout_s,
        )
        torch_device = resolve_device(device)
        if backend == "auto":
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
        self.backend = backend
        self.device = torch_device if backend == "nccl" else torch.device("cpu")
        first_host = urlsplit(self.urls[0]).hostname if self.urls else None
        # the address the replicas reach this process at: the one routing to them unless configured
        self.addr = addr or (local_address_towards(first_host) if first_host else "127.0.0.1")
        self.port = port
        self.collective_timeout_s = collective_timeout_s
        self.bucket_bytes, self.chunk_bytes = bucket_bytes, chunk_bytes
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = [
            httpx.Client(
                base_url=url.rstrip("/"), timeout=timeout_s, verify=tls_verify(tls_ca_file), headers=headers
            )
            for url in self.urls
        ]
        self._ctl = ThreadPoolExecutor(max_workers=len(self.urls) + 1, thread_name_prefix="collective")
        self._store: TCPStore | None = None
        self._group: Group | None = None
        self.last_push: dict[str, float] = {}  # bytes, transfer_s, total_s of the newest collective push

    @classmethod
    def from_config(cls, redis_client: redis.Redis, cfg: TrainerConfig) -> CollectiveSync:
        return cls(
            redis_client,
            cfg.run,
            cfg.rollout_urls,
            token=cfg.resolve_token(),
            timeout_s=cfg.push_timeout_s,
            tls_ca_file=cfg.rollout_tls_ca_file or None,
            addr=cfg.collective_addr,
            port=cfg.collective_port,
            backend=cfg.collective_backend,
            device=cfg.device,
            collective_timeout_s=cfg.collective_timeout_s,
            bucket_bytes=cfg.collective_bucket_mb << 20,
        )

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def group_name(self) -> str | None:
        return self._group.name if self._group is not None else None

    def close(self) -> None:
        group = self._group
        if group is not None:
            body = {"group_name": group.name}
            for f in [
                self._ctl.submit(self._post, i, "/v1/weights/collective/leave", body, 10.0)
                for i in range(len(self._http))
            ]:
                try:
                    f.result()
                except Exception as e:  # best effort: a replica that is gone has left anyway
                    log.debug("leaving the weight group: %s", e)
            self._drop_group()
        self._ctl.shutdown(wait=False, cancel_futures=True)
        self._store = None
        for c in self._http:
            c.close()
        super().close()

    def _drop_group(self) -> None:
        """Forget the group; its teardown (closing connections, which fails peers' pending ops at once)
        runs in the background, as a backend with an op still pending waits for it to end."""
        group, self._group = self._group, None
        if group is not None:
            threading.Thread(target=group.close, name="collective-close", daemon=True).start()

    # -- HTTP control plane --------------------------------------------------------------------------------

    def _post(
        self, i: int, path: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        try:
            resp = self._http[i].post(path, json=body, timeout=timeout_s or self.timeout_s)
        except httpx.TransportError as e:
            raise RolloutError(503, f"{self.urls[i]}: {type(e).__name__}: {e}") from e
        if not resp.is_success:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise RolloutError(resp.status_code, f"{self.urls[i]}: {detail}")
        out: dict[str, Any] = resp.json()
        return out

    def _ensure_group(self) -> Group:
        if self._group is not None:
            return self._group
        if self._store is None:
            self._store = host_store(self.addr, self.port, self.collective_timeout_s)
            log.info("weight group store listening on %s:%d", self.addr, self._store.port)
        name = f"opd-{uuid.uuid4().hex[:16]}"
        world = len(self.urls) + 1
        body = dict(
            addr=self.addr,
            port=self._store.port,
            world_size=world,
            backend=self.backend,
            group_name=name,
            timeout_s=self.collective_timeout_s,
        )
        t0 = time.perf_counter()
        joins: list[Future[Any]] = [
            self._ctl.submit(
                self._post,
                i,
                "/v1/weights/collective/join",
                {**body, "rank": i + 1},
                self.collective_timeout_s + 30,
            )
            for i in range(len(self.urls))
        ]
        mine: Future[Group] = Future()
        store = self._store

        def create() -> None:  # a daemon thread: a rendezvous that never completes must not block exit
            try:
                mine.set_result(
                    Group(
                        store,
                        name,
                        0,
                        world,
                        self.backend,
                        timeout_s=self.collective_timeout_s,
                        device=self.device,
                        local_addr=self.addr,
                    )
                )
            except BaseException as e:
                mine.set_exception(e)

        threading.Thread(target=create, name="collective-rendezvous", daemon=True).start()
        done, _ = wait([*joins, mine], return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            # our side may still complete (or time out) later: close it whenever it does
            def close_late(f: Future[Group]) -> None:
                if f.exception() is None:
                    f.result().close()

            mine.add_done_callback(close_late)
            error = failed[0].exception()
            assert error is not None
            if isinstance(error, RolloutError):
                raise error
            raise CollectiveError(f"forming weight group {name} failed: {error}") from error
        self._group = mine.result()
        log.info(
            "weight group %s formed: trainer + %d replica(s), %s, in %.2f s",
            name,
            len(self.urls),
            self.backend,
            time.perf_counter() - t0,
        )
        return self._group

    # -- push ----------------------------------------------------------------------------------------------

    def push(self, weights: Weights, version: int, only: list[int] | None = None) -> float:
        """Send the weights as `version` to every replica by broadcast, then SET the version key. A subset
        (`only`) goes over HTTP. Returns the seconds spent."""
        every = list(range(len(self.urls)))
        if not self.urls or (only is not None and sorted(set(only)) != every):
            return super().push(weights, version, only)
        t0 = time.perf_counter()
        self._push_collective(weights, version)
        redis_keys.call_with_backoff(lambda: self.redis.set(self.key, version), timeout_s=self.down_timeout_s)
        self.last_push["total_s"] = time.perf_counter() - t0
        return self.last_push["total_s"]

    def _push_collective(self, weights: Weights, version: int) -> None:
        once = _ReadOnce(weights)
        specs = weights.specs()
        plan = plan_buckets(specs, self.bucket_bytes)
        wire = [[name, list(shape), dtype_name(dtype)] for name, shape, dtype in specs]
        try:
            for attempt in (1, 2):
                group = self._ensure_group()
                try:
                    self._update(group, once, plan, wire, version)
                    return
                except _Rejoin as e:
                    self._drop_group()
                    if attempt == 2:
                        raise CollectiveError(
                            f"push of version {version}: {e} (after forming a new group)"
                        ) from e
                    log.warning("push of version %d: %s; forming a new weight group", version, e)
        finally:
            once.finish()

    def _update(
        self, group: Group, weights: _ReadOnce, plan: list[Any], wire: list[list[Any]], version: int
    ) -> None:
        """One update on `group`, returning once every replica installed it."""
        update_id = uuid.uuid4().hex
        body = {
            "group_name": group.name,
            "update_id": update_id,
            "version": version,
            "specs": wire,
            "bucket_bytes": self.bucket_bytes,
            "chunk_bytes": self.chunk_bytes,
        }
        n = len(self.urls)
        futures = [self._ctl.submit(self._post, i, "/v1/weights/collective/update", body) for i in range(n)]
        _, go = update_keys(update_id, 0)
        verdicts = self._await_acks(group, update_id, futures)
        refused = [i for i, v in enumerate(verdicts) if v != "ok"]
        if refused:
            group.store.set(go, f"abort: {', '.join(self.urls[i] for i in refused)} refused")
            self._refused(weights, version, refused, [_error_of(f) for f in futures])
            return
        group.store.set(go, "go")

        def failed_replica() -> str | None:
            for i, f in enumerate(futures):
                if f.done() and f.exception() is not None:
                    return f"{self.urls[i]} failed: {f.exception()}"
            return None

        t0 = time.perf_counter()
        try:
            sent = group.send(plan, weights.tensors(), chunk_bytes=self.chunk_bytes, abort=failed_replica)
        except CollectiveError as e:
            self._drop_group()
            wait(futures, timeout=5.0)
            replicas = "; ".join(
                str(f.exception()) for f in futures if f.done() and f.exception() is not None
            )
            raise CollectiveError(
                f"weight broadcast of version {version} failed: {e}"
                + (f" (replicas: {replicas})" if replicas else "")
                + "; the group is dropped and formed anew on the next push"
            ) from e
        transfer_s = time.perf_counter() - t0
        wait(futures)
        failed = [(i, err) for i, f in enumerate(futures) if (err := _error_of(f)) is not None]
        if failed:
            # sent, but a replica did not install it (its receive or its install failed): state unknown
            self._drop_group()
            raise CollectiveError(
                f"update to version {version} failed on "
                + "; ".join(f"{self.urls[i]}: {e.detail}" for i, e in failed)
                + "; the group is dropped and formed anew on the next push"
            )
        infos = [WeightInfo.model_validate(f.result()) for f in futures]
        for url, info in zip(self.urls, infos, strict=True):
            if info.version != version:
                raise RuntimeError(f"rollout {url} reports version {info.version} after a push of {version}")
        self.last_push = {"bytes": float(sent), "transfer_s": transfer_s}
        log.info(
            "pushed version %d to %d replica(s) by %s broadcast: %.1f MB in %.2f s",
            version,
            n,
            self.backend,
            sent / 1e6,
            transfer_s,
        )

    def _refused(
        self, weights: _ReadOnce, version: int, refused: list[int], errors: list[RolloutError | None]
    ) -> None:
        """Some replicas refused (nothing was sent). Replicas that already serve `version` (restarted with
        --resume-from after the checkpoint of this version) are done: the others get it over HTTP. Any other
        refusal raises that replica's error (422: specs; 409: version)."""

        def serves(i: int) -> bool:
            try:
                return self.clients[i].weights().version == version
            except (RolloutError, httpx.TransportError):
                return False

        stale = [i for i in refused if (e := errors[i]) is not None and e.status_code == 409 and serves(i)]
        if len(stale) == len(refused):
            rest = [i for i in range(len(self.urls)) if i not in refused]
            log.info("%s already serve version %d: pushing it to the rest over HTTP", stale, version)
            WeightSync.push(self, weights, version, only=rest)
            return
        raise next(
            (e for i, e in enumerate(errors) if i in refused and e is not None),
            RolloutError(409, f"update of version {version} refused"),
        )

    def _await_acks(self, group: Group, update_id: str, futures: list[Future[Any]]) -> list[str]:
        """Every replica's verdict from the store ("ok" or "refused: ..."). A replica that answered without
        writing one (not a member, wrong token, down) ends the wait: the others are called off."""
        keys = [update_keys(update_id, i + 1)[0] for i in range(len(futures))]
        _, go = update_keys(update_id, 0)
        deadline = time.monotonic() + self.collective_timeout_s
        while True:
            have = [group.store.check([k]) for k in keys]
            if all(have):
                return [bytes(group.store.get(k)).decode() for k in keys]
            for i, f in enumerate(futures):
                if have[i] or not f.done() or group.store.check([keys[i]]):
                    continue  # (the verdict is written before the answer: check again after seeing it)
                group.store.set(go, f"abort: {self.urls[i]} answered without a verdict")
                error = _error_of(f) or RolloutError(502, f"{self.urls[i]}: answered without a verdict")
                wait(futures, timeout=self.collective_timeout_s)
                if error.status_code == 409:
                    raise _Rejoin(str(error))
                raise error
            if time.monotonic() > deadline:
                group.store.set(go, "abort: timeout")
                self._drop_group()
                missing = [self.urls[i] for i, h in enumerate(have) if not h]
                raise CollectiveError(f"no verdict from {missing} within {self.collective_timeout_s:.0f} s")
            time.sleep(0.005)


class _ReadOnce:
    """Weights read exactly once per push: `finish` reads whatever nothing read (under FSDP every rank
    gathers with rank 0 tensor by tensor, so rank 0 must go through them all even when a push failed or sent
    nothing, or the other ranks would wait in their gather forever)."""

    replayable = False  # for WeightSync's HTTP fallback: one pass, never a second

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self._it: Iterator[tuple[str, Tensor]] | None = None

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return self.weights.specs()

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        assert self._it is None, "weights read twice in one push"
        self._it = iter(self.weights.tensors())
        return self._it

    def finish(self) -> None:
        try:
            for _ in self._it if self._it is not None else self.tensors():
                pass
        except Exception:
            log.exception("reading the rest of the weights after a failed push")


def _error_of(f: Future[Any]) -> RolloutError | None:
    try:
        f.result()
    except RolloutError as e:
        return e
    except Exception as e:
        return RolloutError(502, f"{type(e).__name__}: {e}")
    return None
