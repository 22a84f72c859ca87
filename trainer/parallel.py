"""How the student is laid out over ranks, in what precision, and how its full weights are gathered.

Two layouts (`parallelism`):

    replicate  every rank holds the whole student (fp32 master weights and fp32 AdamW state); gradients
               are summed over ranks after backward (trainer/dist.py). For students that fit one device.
    fsdp       FSDP2: `fully_shard` on every decoder layer and on the root, so parameters, gradients and
               optimizer state are sharded over the ranks (each holds ~1/N); a layer's full weights exist
               only while it runs. For the paper's 7B student at 16K tokens (docs/training.md).

Precision (`compute_dtype`): master weights and optimizer state are always fp32 (a bf16 AdamW step at
lr 2e-6 rounds to nothing for weights near 1: config.py refuses it). With compute_dtype bfloat16 the
matmuls run in bf16: FSDP2 casts the gathered parameters (MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32): gradients are reduced and accumulated in fp32), and the replicate layout runs the
forward under autocast and the LM head on bf16 copies of the hidden states and head weight. Either way the
head's gradient is accumulated in fp32 inside trainer/heads.py and the loss maths is fp32.

Why the objective is a module: trainer/heads.py reads the LM-head weight directly instead of calling the
head's forward. Under FSDP2 a parameter is only gathered between its module's forward pre-hook and its
gradient's reduce-scatter, so the whole objective (trunk + head + loss) runs inside `ObjectiveModule.forward`,
whose root hooks gather the embeddings, final norm and LM head (tied or not) and reduce-scatter their
gradients after backward. Gradient reduction is a SUM (the loss already divides by the global token count).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import TrainerConfig
from trainer.data import MiniBatch
from trainer.dist import DistContext
from trainer.objective import compute_objective, sampled_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# activation_checkpointing = "auto" turns it on from this many parameters (a 1.5B student at 16K tokens
# keeps ~28 layers x 16K x 1.5K x 2 bytes of layer inputs alone, plus each layer's working set).
AUTO_CHECKPOINTING_PARAMS = 1_000_000_000

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype_of(cfg: TrainerConfig) -> torch.dtype:
    return DTYPES[cfg.compute_dtype]


def push_dtype_of(cfg: TrainerConfig) -> torch.dtype:
    """The dtype weights are cast to when pushed: the serving dtype (default: the compute dtype)."""
    return DTYPES[cfg.compute_dtype if cfg.push_dtype == "auto" else cfg.push_dtype]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wants_checkpointing(cfg: TrainerConfig, n_params: int) -> bool:
    if cfg.activation_checkpointing == "auto":
        return n_params >= AUTO_CHECKPOINTING_PARAMS
    return cfg.activation_checkpointing == "on"


class ObjectiveModule(nn.Module):
    """The student with its objective: forward(mini-batch) -> (loss, metrics). See the module docstring."""

    def __init__(
        self, model: PreTrainedModel, cfg: TrainerConfig, autocast_dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.compute_dtype = compute_dtype_of(cfg) if cfg.compute_dtype != "float32" else None
        self.autocast_dtype = autocast_dtype  # replicate + bf16: the trunk runs under autocast

    def forward(
        self,
        mb: MiniBatch,
        denom_tokens: float | None = None,
        with_diagnostics: bool = False,
        old_logprobs: bool = False,
    ) -> tuple[Tensor, dict[str, float]]:
        """(loss, metrics); with `old_logprobs`, ((B, T) log pi(y_t) without grad, {}) instead (the PPO old
        policy, trainer/objective.py `sampled_logprobs`), through the same forward as the loss."""
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.autocast_dtype is not None:
            ctx = torch.autocast(mb.input_ids_B_S.device.type, dtype=self.autocast_dtype)
        with ctx:
            if old_logprobs:
                return sampled_logprobs(self.model, mb, self.cfg, self.compute_dtype), {}
            return compute_objective(
                self.model,
                mb,
                self.cfg,
                denom_tokens=denom_tokens,
                with_diagnostics=with_diagnostics,
                compute_dtype=self.compute_dtype,
            )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder's layer list (Hugging Face convention: model.get_decoder().layers)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: parallelism 'fsdp' shards per decoder layer and needs "
            "model.get_decoder().layers to be an nn.ModuleList"
        )
    return layers


def wrap_model(model: PreTrainedModel, cfg: TrainerConfig, ctx: DistContext) -> ObjectiveModule:
    """Activation checkpointing, then the layout of `cfg.parallelism`; returns the module to train.

    Every rank must hold the same initial weights (trainer/train.py broadcasts rank 0's first).
    """
    n_params = num_parameters(model)
    for p in model.parameters():
        if p.dtype != torch.float32:
            raise ValueError(f"master weights must be float32, got {p.dtype} (trainer/config.py: dtype)")
    if wants_checkpointing(cfg, n_params):
        # per decoder layer; non-reentrant so it composes with FSDP2's hooks and with heads.py
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("activation checkpointing on (%.2fB parameters)", n_params / 1e9)
    compute = compute_dtype_of(cfg)
    if cfg.parallelism == "replicate":
        return ObjectiveModule(model, cfg, autocast_dtype=compute if compute != torch.float32 else None)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("parallelism 'fsdp' needs a process group (trainer/dist.py init_distributed)")
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    param_dtype = compute if compute != torch.float32 else None
    layer_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # The root's forward gets the MiniBatch: its fp32 teacher log-probs must not be cast to bf16.
    root_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    module = ObjectiveModule(model, cfg, autocast_dtype=None)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
    fully_shard(module, mesh=mesh, mp_policy=root_policy)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            # SUM, not FSDP's default mean: each rank's loss is already divided by the global token count.
            # Forced sum reductions keep gloo (which has no PREMUL_SUM) and NCCL on the same code path.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor (a collective for a sharded DTensor: every rank must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def iter_full_state(
    module: ObjectiveModule, dtype: torch.dtype, is_main: bool
) -> Iterator[tuple[str, Tensor]]:
    """(name, CPU tensor in `dtype`) for every entry of the student's state dict, gathered one tensor at a
    time, so a rank never holds more than one full tensor beyond its shards. Names are the Hugging Face
    ones. With FSDP every rank must iterate (each all-gather is a collective); only `is_main` gets tensors.
    """
    for name, t in module.model.state_dict().items():
        whole = full_tensor(t)
        if is_main:
            out = whole.detach().to("cpu")
            yield name, out.to(dtype) if out.is_floating_point() else out


class ModuleWeights:
    """trainer.weight_sync.Weights of the student: specs from the (sharded) state dict's metadata, tensors
    gathered one at a time in the serving dtype (every rank must iterate `tensors` under FSDP)."""

    def __init__(self, module: ObjectiveModule, dtype: torch.dtype, is_main: bool) -> None:
        self.module, self.dtype, self.is_main = module, dtype, is_main

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [
            (name, tuple(t.shape), self.dtype if t.is_floating_point() else t.dtype)
            for name, t in self.module.model.state_dict().items()
        ]

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        return iter_full_state(self.module, self.dtype, self.is_main)


def param_and_optimizer_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds for parameters and optimizer state (local shards under FSDP)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += local_tensor(p).numel() * p.element_size()
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, Tensor) and v.dim() > 0:
                total += local_tensor(v).numel() * v.element_size()
    return total


def grad_norm_value(norm: Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP: its full value)."""
    return float(full_tensor(norm))
