"""The hf engine decodes requests that wait together as one batch: the pipelined worker's G requests of
n = 1 per group cost one decoding loop, not G, and each still gets the samples it would get alone."""

from __future__ import annotations

import asyncio

from experiments.tiny_models import make_tiny_llama
from services.rollout.config import RolloutConfig
from services.rollout.hf_engine import HFEngine
from services.rollout.protocol import GenerateRequest


def test_concurrent_n1_requests_share_decoding_batches(tmp_path):
    engine = HFEngine.load(
        RolloutConfig(model=str(make_tiny_llama(tmp_path / "m", seed=0)), max_batch_size=64)
    )
    G = 8
    group = [
        GenerateRequest(prompts=[[5, 6, 7]], n=1, max_new_tokens=24, seed=3, first_sample_index=j)
        for j in range(G)
    ]
    other = GenerateRequest(prompts=[[9, 9]], n=1, max_new_tokens=7, seed=3)  # other settings: its own batch

    async def run():
        try:
            together = await asyncio.gather(*(engine.generate(r) for r in [*group, other]))
            alone = [await engine.generate(r) for r in group]
            whole = await engine.generate(group[0].model_copy(update={"n": G}))
            return together, alone, whole
        finally:
            await engine.close()

    together, alone, whole = asyncio.run(run())
    # the first request may start before the others arrive; the rest of the group waits and shares a batch
    sizes = engine.batch_sizes[: len(engine.batch_sizes) - G - 1]
    assert sum(sizes) == G + 1 and len(sizes) <= 3 and max(sizes) >= G - 1
    assert [r.samples[0].token_ids for r in together[:G]] == [r.samples[0].token_ids for r in alone]
    assert [r.samples[0].token_ids for r in together[:G]] == [s.token_ids for s in whole.samples]
    assert len(together[G].samples[0].token_ids) <= 7
