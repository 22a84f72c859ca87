"""vLLM worker extension: reload weights in place from safetensors files.

vLLM mixes this class into its worker (`worker_extension_cls`); the engine calls the method on every
worker with `collective_rpc`. `reload_weights` runs the model's checkpoint-format loader and redoes the
post-load processing (repacking on CPU, fusing), which a plain `load_weights` into the live model skips.
Imported inside vLLM's worker processes: keep it free of the service's heavier modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open


class WeightReloadExtension:
    if TYPE_CHECKING:
        # Provided by the vLLM worker this class is mixed into (vllm.v1.worker.gpu_worker.Worker).
        def reload_weights(
            self,
            weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
            weights_path: str | None = None,
            is_checkpoint_format: bool = True,
        ) -> None: ...

    def opd_reload_safetensors(self, paths: list[str]) -> None:
        """Load every tensor of `paths` (checkpoint names, already validated by the server) in place."""

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for path in paths:
                with safe_open(path, framework="pt", device="cpu") as fh:
                    for name in fh.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                        yield name, fh.get_tensor(name)

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
