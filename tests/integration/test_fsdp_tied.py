"""FSDP2 with a tied LM head (the input embedding is the head weight): 2 gloo ranks, each on its shard of a
mini-batch, give the single process's gradients for every parameter, the tied one included."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaForCausalLM

from experiments.synthetic import synthetic_records
from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from trainer import parallel
from trainer.config import TrainerConfig
from trainer.data import collate, sequences_of, split_even
from trainer.dist import DistContext, shutdown

pytestmark = pytest.mark.integration

TOK = build_char_tokenizer()


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(len(TOK), tokenizer=TOK)
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.train()


def _sequences():
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(tiny_llama_config(len(TOK), tokenizer=TOK)).eval()
    records = synthetic_records(
        _model().eval(),
        teacher,
        n_records=4,
        group_size=2,
        top_k=4,
        behaviour_top_k=4,
        special_ids=sorted(set(TOK.all_special_ids)),
        eos_id=TOK.eos_token_id,
        completion_len=(3, 20),
        seed=2,
    )
    return sequences_of(records)


def _cfg(**kw) -> TrainerConfig:
    return TrainerConfig(model="unused", top_k=4, diagnostics_every=0, **kw)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: parallel.full_tensor(p.grad).detach().clone() for n, p in module.named_parameters()}


def _rank(rank: int, world: int, store: str, out: str, compute_dtype: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"))
    try:
        seqs = _sequences()
        module = parallel.wrap_model(_model(), _cfg(parallelism="fsdp", compute_dtype=compute_dtype), ctx)
        s, e = split_even(len(seqs), world)[rank]
        mb = collate(seqs[s:e], support="teacher_topk", top_k=4, max_seq_len=64)
        total = collate(seqs, support="teacher_topk", top_k=4, max_seq_len=64).num_loss_tokens
        loss, _ = module(mb, denom_tokens=float(total))
        loss.backward()
        grads = _grads(module)  # full_tensor: a collective on every rank
        if rank == 0:
            torch.save(grads, out)
        del module, loss
        shutdown(ctx)  # barrier first: a rank that tears gloo down while its peer reads aborts it
    except BaseException:
        shutdown(ctx, clean=False)
        raise


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_fsdp2_tied_head_gradients_equal_one_process(tmp_path: Path, compute_dtype: str) -> None:
    out = str(tmp_path / "grads.pt")
    store = tempfile.mktemp(dir=tmp_path)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank, args=(2, store, out, compute_dtype), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)

    seqs = _sequences()
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    module = parallel.wrap_model(_model(), _cfg(compute_dtype=compute_dtype), ctx)
    loss, _ = module(collate(seqs, support="teacher_topk", top_k=4, max_seq_len=64))
    loss.backward()
    single = _grads(module)
    assert "model.model.embed_tokens.weight" in sharded  # the tied weight, under its one name
    assert sharded.keys() == single.keys()
    # bf16 compute: both sides round the same matmuls, in different orders across ranks
    tol = dict(rtol=1e-4, atol=1e-6) if compute_dtype == "float32" else dict(rtol=5e-2, atol=2e-3)
    for name, g in single.items():
        torch.testing.assert_close(sharded[name], g, **tol, msg=lambda m, n=name: f"{n}: {m}")
