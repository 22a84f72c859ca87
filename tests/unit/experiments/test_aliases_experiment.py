"""The +alias rows of `opd experiment table`: configs and the run summary of how samples ended."""

import pytest

from experiments.paper import EXPERIMENTS, build_variant_config, results_table, summarize_run

BASE = {
    "teacher": {"model": "runs/toy/models/teacher"},
    "worker": {"top_k": 16},
    "trainer": {"top_k": 16, "special_token_masking": True},
}


@pytest.mark.parametrize(
    ("slug", "objective"), [("sampled-token-opd-alias", "sampled_token"), ("lsm-alias", "lsm")]
)
def test_alias_rows_configure_both_processes(tmp_path, slug, objective):
    (variant,) = [v for v in EXPERIMENTS["table"] if v.slug == slug]
    cfg = build_variant_config(BASE, variant, run_name="r", runs_dir=tmp_path, seed=1, batches=60)
    trainer, worker = cfg["trainer"], cfg["worker"]
    assert trainer["objective"] == objective and trainer["special_token_masking"] is False
    assert trainer["token_aliases"] == worker["token_aliases"] == [["</s>", "<|im_end|>"]]
    assert trainer["teacher_tokenizer"] == worker["teacher_tokenizer"] == "runs/toy/models/teacher"
    assert "token_aliases" not in BASE["trainer"]  # the base dict is not modified


def test_summary_averages_how_samples_ended_over_the_run():
    rows = [
        {"batch": 0, "eval/pass@1": 0.3},
        {"batch": 1, "response/ends_own_eos": 1.0, "response/other_special": 0.0, "response/length_cap": 0.0},
        {
            "batch": 2,
            "response/ends_own_eos": 0.5,
            "response/other_special": 0.25,
            "response/length_cap": 0.5,
            "eval/pass@1": 0.4,
        },
    ]
    s = summarize_run(rows)
    assert s["run/ends_own_eos"] == 0.75 and s["run/other_special"] == 0.125 and s["run/length_cap"] == 0.25
    assert "ends with own eos (run)" in results_table({"LSM + alias": [s]})
