"""Worker + teacher with token_aliases over loopback (real redis-server, teacher gRPC, rollout HTTP; tiny
random Llamas): alias ids are scored in the same Score call as the top-K, the records carry them, multi-token
spellings are folded from the rewritten sequence, and the trainer accepts and rewrites the records."""

import numpy as np
import pytest
import torch

from services.common.config import ConfigError
from services.common.experience import decode
from services.common.hf_models import load_causal_lm
from services.common.redis_keys import RECORD_FIELD, connect, experience_stream
from services.worker.aliasing import spell_out
from services.worker.config import WorkerConfig
from services.worker.loop import RolloutWorker
from tests.integration.stack import loopback_stack
from trainer.aliases import TrainerAliases
from trainer.data import check_record, collate, sequences_of

pytestmark = pytest.mark.integration

PROMPTS = [("12+34=", "46"), ("5+7=", "12"), ("90+9=", "99")]
SINGLE = ["</s>", "<|im_end|>"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with loopback_stack(tmp_path_factory.mktemp("aliases"), prompts=PROMPTS) as s:
        yield s


def run_worker(stack, run: str, **kw) -> tuple[RolloutWorker, list, float]:
    cfg = WorkerConfig(
        run=run,
        redis_url=stack.redis_url,
        rollout_url=stack.rollout_url,
        teacher=[stack.handle.address],
        prompts=str(stack.prompts),
        tokenizer=str(stack.student),
        teacher_tokenizer=str(stack.teacher),
        group_size=3,
        max_new_tokens=10,
        top_k=4,
        max_records=len(PROMPTS),
        concurrency=1,
        **kw,
    )
    registry = stack.handle.metrics.registry
    calls_before = registry.get_sample_value("opd_teacher_requests_total", {"code": "OK"}) or 0.0
    worker = RolloutWorker(cfg, stack.rollout, stack.teacher_client, connect(stack.redis_url))
    assert worker.run()["records"] == len(PROMPTS)
    calls = registry.get_sample_value("opd_teacher_requests_total", {"code": "OK"}) - calls_before
    r = connect(stack.redis_url)
    records = [decode(f[RECORD_FIELD]) for _, f in r.xrange(experience_stream(run))]
    return worker, records, calls


@torch.no_grad()
def teacher_rows(model_dir, seq: list[int], score_from: int) -> torch.Tensor:
    model = load_causal_lm(model_dir, dtype=torch.float32).eval()
    logits = model(torch.tensor([seq])).logits[0].float()
    return torch.log_softmax(logits[score_from - 1 : -1], -1)  # [R, V]


@pytest.mark.parametrize("support", ["teacher_topk", "student_topk"])
def test_alias_candidates_ride_in_the_same_score_call(stack, support):
    worker, records, calls = run_worker(stack, f"single-{support}", support=support, token_aliases=[SINGLE])
    vocab = stack.tok.get_vocab()
    alias_ids = sorted([vocab["</s>"], vocab["<|im_end|>"]])
    # One Score RPC per sample (the worker scores each as soon as it finishes), as without aliases.
    assert calls == sum(len(r.samples) for r in records)
    fired = 0
    for rec in records:
        for s in rec.samples:
            n = len(s)
            beh = 4 if support == "student_topk" else 0
            assert s.teacher_candidate_ids.shape == (n, beh + 2)
            assert (s.teacher_candidate_ids[:, beh:] == alias_ids).all()
            if beh:
                np.testing.assert_array_equal(s.teacher_candidate_ids[:, :beh], s.behaviour_top_ids)
            lq = teacher_rows(
                stack.teacher, rec.prompt_ids.tolist() + s.completion_ids.tolist(), len(rec.prompt_ids)
            )
            expected = lq.gather(1, torch.as_tensor(s.teacher_candidate_ids, dtype=torch.long)).numpy()
            np.testing.assert_allclose(s.teacher_candidate_logprobs, expected, atol=1e-4)
            fired += int((s.completion_ids == vocab["</s>"]).sum())
    assert (
        worker.metrics.registry.get_sample_value("opd_worker_alias_fired_total", {"alias": "<_s>"}) or 0
    ) == fired

    # The trainer accepts these records and rewrites them; a trainer with aliases refuses records without.
    aliases = TrainerAliases.from_config([SINGLE], stack.tok, str(stack.teacher))
    for rec in records:
        check_record(
            rec, support=support, top_k=4, vocab_size=len(stack.tok), max_seq_len=64, aliases=aliases
        )
    mb = collate(sequences_of(records), support=support, top_k=4, max_seq_len=64, aliases=aliases)
    if support == "teacher_topk":  # the teacher's marker is reported as the student's
        assert not (mb.support_ids_B_T_K[mb.support_mask_B_T_K] == vocab["<|im_end|>"]).any()


def test_records_without_alias_candidates_are_refused_by_an_alias_trainer(stack):
    _, records, _ = run_worker(stack, "plain")
    aliases = TrainerAliases.from_config([SINGLE], stack.tok, str(stack.teacher))
    with pytest.raises(ValueError, match="alias ids"):
        check_record(
            records[0],
            support="teacher_topk",
            top_k=4,
            vocab_size=len(stack.tok),
            max_seq_len=64,
            aliases=aliases,
        )


def test_multi_token_spelling_is_scored_on_the_rewritten_sequence(stack):
    vocab = stack.tok.get_vocab()
    # digits are frequent in prompts; "+" is in every prompt, so every record goes through the rewrite
    spelling = ["a", "b", "c"]
    _, records, calls = run_worker(stack, "multi", token_aliases=[["+", spelling]])
    assert calls == sum(len(r.samples) for r in records)
    spellings = {vocab["+"]: tuple(vocab[c] for c in spelling)}
    for rec in records:
        for s in rec.samples:
            sp = spell_out(rec.prompt_ids.tolist(), s.completion_ids.tolist(), spellings)
            lq = teacher_rows(stack.teacher, sp.token_ids, sp.score_from)  # [R, V]
            tgt = lq.gather(1, torch.tensor(sp.token_ids[sp.score_from :])[:, None])[:, 0]
            expected = [
                tgt[r : r + n].sum().item()
                for r, n in zip(sp.first_row_L.tolist(), sp.span_L.tolist(), strict=True)
            ]
            np.testing.assert_allclose(s.teacher_target_logprobs, expected, atol=1e-4)
            plain = s.completion_ids != vocab["+"]
            top_v, top_i = lq[sp.first_row_L[plain]].topk(4, dim=-1)
            np.testing.assert_array_equal(s.teacher_topk_ids[plain], top_i.numpy())


def test_a_teacher_without_candidates_is_a_clear_startup_error(stack):
    from services.worker.aliasing import WorkerAliases

    aliases = WorkerAliases.from_config([SINGLE], stack.tok, str(stack.teacher))
    info = stack.teacher_client.info()
    aliases.check_teacher(info, 0)
    info_vllm = type(info)()
    info_vllm.CopyFrom(info)
    info_vllm.supports_candidates = False
    info_vllm.backend = "vllm"
    with pytest.raises(ConfigError, match="backend 'vllm' does not"):
        aliases.check_teacher(info_vllm, 0)
    multi_only = WorkerAliases.from_config([["+", ["a", "b"]]], stack.tok, str(stack.teacher))
    multi_only.check_teacher(info_vllm, 0)  # spellings need no candidates
