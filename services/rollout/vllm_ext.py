"""vLLM worker extension: reload weights in place from safetensors files.

vLLM mixes this class into its worker (`worker_extension_cls`); the engine calls the method on every
worker with `collective_rpc`. `reload_weights` runs the model's checkpoint-format loader and redoes the
post-load processing (repacking on CPU, fusing), which a plain `load_weights` into the live model skips.
Imported inside vLLM's worker processes: keep it free of the service's heavier modules.

The collective weight path (collective.py, collective_api.py) runs here too: the worker joins the trainer's
group (`opd_collective_join`), receives every tensor straight into its own device memory and hashes it
(`opd_collective_receive`, before the engine's write lock, like a PUT's parse), and the engine's ordinary swap
then calls `opd_reload_safetensors([])`: an empty path list means "the staged collective tensors".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from services.rollout.collective import Group


class WeightReloadExtension:
    _opd_group: Group | None = None
    _opd_staged: dict[str, torch.Tensor] | None = None

    if TYPE_CHECKING:
        # Provided by the vLLM worker this class is mixed into (vllm.v1.worker.gpu_worker.Worker).
        def reload_weights(
            self,
            weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
            weights_path: str | None = None,
            is_checkpoint_format: bool = True,
        ) -> None: ...

    def opd_reload_safetensors(self, paths: list[str]) -> None:
        """Load every tensor of `paths` (checkpoint names, already validated by the server) in place; with
        no paths, the tensors staged by `opd_collective_receive`."""
        if not paths:
            staged, self._opd_staged = self._opd_staged, None
            if staged is None:
                raise RuntimeError("no paths and no staged collective weights to install")
            self.reload_weights(weights_iterator=iter(staged.items()), is_checkpoint_format=True)
            return

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for path in paths:
                with safe_open(path, framework="pt", device="cpu") as fh:
                    for name in fh.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                        yield name, fh.get_tensor(name)

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)

    # -- the collective weight path ---------------------------------------------------------------------

    def opd_collective_join(
        self,
        addr: str,
        port: int,
        world_size: int,
        rank: int,
        backend: str,
        group_name: str,
        timeout_s: float,
    ) -> None:
        """Join the trainer's weight group as `rank` (a rendezvous), replacing any group joined before."""
        from services.rollout.collective import Group

        self.opd_collective_leave()
        device = getattr(self, "device", None) if backend == "nccl" else None
        self._opd_group = Group.join(
            addr, port, world_size, rank, backend, group_name, timeout_s=timeout_s, device=device
        )

    def opd_collective_receive(
        self, specs: list[Any], bucket_bytes: int, chunk_bytes: int, hash_names: list[str]
    ) -> str:
        """Receive every tensor of `specs` ([name, shape, dtype], validated by the server) into fresh memory
        on this worker's group device; keep them staged and return their sha256 (engine.state_sha256)."""
        from services.rollout.collective import parse_dtype, plan_buckets
        from services.rollout.engine import state_sha256

        if self._opd_group is None:
            raise RuntimeError("not a member of a weight group")
        plan = plan_buckets([(n, tuple(shape), parse_dtype(d)) for n, shape, d in specs], bucket_bytes)
        try:
            tensors = self._opd_group.receive(plan, chunk_bytes=chunk_bytes)
        except Exception:
            self.opd_collective_leave()
            raise
        self._opd_staged = tensors
        return state_sha256(tensors, hash_names)

    def opd_collective_discard(self) -> None:
        """Free staged tensors that were not installed (a refused or failed swap)."""
        self._opd_staged = None

    def opd_collective_leave(self) -> None:
        group, self._opd_group = self._opd_group, None
        self._opd_staged = None
        if group is not None:
            group.close()
