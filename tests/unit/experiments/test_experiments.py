"""`opd experiment`: variant configs, table aggregation from metrics files, curves, and the diagnostics."""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from experiments import diagnostics
from experiments import paper as experiments
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from launcher.pipeline import check_sections
from services.common.config import load_section
from services.worker.config import WorkerConfig
from trainer.config import TrainerConfig
from trainer.metrics import read_metrics

DEMO = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"


@pytest.fixture(scope="module")
def base() -> dict:
    with open(DEMO, "rb") as fh:
        return tomllib.load(fh)


def test_variant_overrides_seeds_and_budget(base, tmp_path):
    before = json.dumps(base, sort_keys=True)
    v = experiments.Variant("sampled-token OPD", {"trainer": {"objective": "sampled_token"}})
    cfg = experiments.build_variant_config(base, v, run_name="t-x-s3", runs_dir=tmp_path, seed=3, batches=7)
    assert cfg["trainer"]["objective"] == "sampled_token"
    assert cfg["trainer"]["seed"] == cfg["worker"]["seed"] == 3
    assert cfg["trainer"]["max_batches"] == 7
    assert cfg["up"]["name"] == "t-x-s3" and cfg["up"]["out_dir"] == str(tmp_path)
    assert cfg["trainer"]["lr"] == base["trainer"]["lr"]  # untouched keys survive
    assert json.dumps(base, sort_keys=True) == before  # the base dict is not mutated
    kept = experiments.build_variant_config(base, v, run_name="r", runs_dir=tmp_path, seed=0, batches=0)
    assert kept["trainer"]["max_batches"] == base["trainer"]["max_batches"]
    assert kept["trainer"]["eval_every"] == base["trainer"]["eval_every"]
    every = experiments.build_variant_config(
        base, v, run_name="r", runs_dir=tmp_path, seed=0, batches=40, eval_every=10
    )
    assert every["trainer"]["eval_every"] == 10


def test_k_above_the_vocabulary_is_capped(base, tmp_path):
    v = next(v for v in experiments.EXPERIMENTS["ablations"] if v.overrides["trainer"].get("top_k") == 64)
    cfg = experiments.build_variant_config(
        base, v, run_name="r", runs_dir=tmp_path, seed=0, batches=1, vocab_size=18
    )
    assert cfg["trainer"]["top_k"] == cfg["worker"]["top_k"] == 18
    small = experiments.build_variant_config(
        base,
        experiments.Variant("k4", {"trainer": {"top_k": 4}}),
        run_name="r",
        runs_dir=tmp_path,
        seed=0,
        batches=1,
        vocab_size=18,
    )
    assert small["trainer"]["top_k"] == 4 and small["worker"]["top_k"] == base["worker"]["top_k"]
    uncapped = experiments.build_variant_config(base, v, run_name="r", runs_dir=tmp_path, seed=0, batches=1)
    assert uncapped["trainer"]["top_k"] == uncapped["worker"]["top_k"] == 64


def test_variant_consistency_errors(base, tmp_path):
    bad_k = experiments.Variant("k", {"trainer": {"top_k": 64}, "worker": {"top_k": 16}})
    with pytest.raises(ValueError, match="worker.top_k"):
        experiments.build_variant_config(base, bad_k, run_name="r", runs_dir=tmp_path, seed=0, batches=1)
    bad_support = experiments.Variant("s", {"trainer": {"support": "student_topk"}})
    with pytest.raises(ValueError, match="student_topk"):
        experiments.build_variant_config(
            base, bad_support, run_name="r", runs_dir=tmp_path, seed=0, batches=1
        )


@pytest.mark.parametrize("name", sorted(experiments.EXPERIMENTS))
def test_every_variant_is_a_valid_pipeline_config(base, tmp_path, name):
    labels = [v.label for v in experiments.EXPERIMENTS[name]]
    assert len(set(labels)) == len(labels) and len({v.slug for v in experiments.EXPERIMENTS[name]}) == len(
        labels
    )
    for v in experiments.EXPERIMENTS[name]:
        cfg = experiments.build_variant_config(
            base, v, run_name=f"{name}-{v.slug}-s0", runs_dir=tmp_path, seed=0, batches=5
        )
        path = tmp_path / f"{v.slug}.toml"
        path.write_text(tomli_w.dumps(cfg))
        check_sections(path)  # the pipeline's own cross-process checks
        # Each process's typed config accepts its section (the pipeline adds URLs through the environment).
        trainer = load_section(TrainerConfig, path, rollout_urls=["http://127.0.0.1:1"])
        worker = load_section(WorkerConfig, path)
        assert worker.top_k >= trainer.top_k
        if trainer.support == "student_topk":
            assert worker.support == "student_topk"
        for section, values in v.overrides.items():
            for key, value in values.items():
                assert cfg[section][key] == value


def test_ablation_grid_covers_the_paper():
    ab = experiments.EXPERIMENTS["ablations"]
    ks = {v.overrides.get("trainer", {}).get("top_k", 16) for v in ab}
    assert ks == {4, 16, 64}  # K = 1 renormalised is a zero loss: refused, and said so in the table
    assert "identically 0" in experiments.K_ONE_NOTE
    supports = {v.overrides.get("trainer", {}).get("support", "teacher_topk") for v in ab}
    assert supports == {"teacher_topk", "student_topk", "teacher_topk_plus_sampled"}
    assert any(v.overrides.get("trainer", {}).get("renormalize") is False for v in ab)
    assert any(v.overrides.get("worker", {}).get("top_p") == 1.0 for v in ab)
    table = experiments.EXPERIMENTS["table"]
    assert {
        (v.overrides["trainer"]["objective"], v.overrides["trainer"]["special_token_masking"]) for v in table
    } == {("sampled_token", False), ("sampled_token", True), ("lsm", False), ("lsm", True)}


def _write_metrics(path: Path, evals: list[float], lengths: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for b, (e, n) in enumerate(zip(evals, lengths, strict=True)):
        rows.append({"batch": b * 10, "eval/pass@1": e})
        rows.append({"batch": b * 10 + 1, "response/length": n, "grad/norm": 1.0 + b})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_aggregates_seeds_from_metrics_files(tmp_path):
    finals = {"A": [0.5, 0.7, 0.6], "B": [0.1, 0.1, 0.4]}
    results = {}
    for label, values in finals.items():
        results[label] = []
        for seed, final in enumerate(values):
            path = tmp_path / label / f"s{seed}" / "metrics.jsonl"
            _write_metrics(path, [0.2, 0.9, final], [40.0, 41.0, 50.0 + seed])
            results[label].append(experiments.summarize_run(read_metrics(path.parent)))
    s = results["A"][1]
    assert s["pass@1_before"] == 0.2 and s["pass@1_final"] == 0.7
    assert "pass@1_max" not in s and "pass@1_selected" not in s  # no best-of-test; no validation eval here
    assert s["response/length"] == 51.0 and s["batches"] == 21 and s["last_eval_batch"] == 20
    table = experiments.results_table(results)
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "pass@1 last eval" in lines[0] and "HF" not in lines[0]  # no post-hoc columns
    assert "| 20 |" in lines[2]  # the batch of the last eval
    for label, values in finals.items():
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert f"{mean:.3f} ± {std:.3f}" in row
        assert "| 3 |" in row
    one = experiments.results_table({"C": [{"pass@1_before": 0.1, "pass@1_final": 0.25}]})
    assert "0.250 ± 0.000" in one


def test_resume_keeps_finished_runs_and_runs_the_rest(base, tmp_path, monkeypatch):
    base_path = tmp_path / "base.toml"
    base_path.write_text(tomli_w.dumps(base))
    runs = tmp_path / "out" / "table" / "runs"
    variant = experiments.EXPERIMENTS["table"][0]
    names = [f"table-{variant.slug}-s{seed}" for seed in range(4)]

    def finish(run_dir: Path, final: float, config_text: str) -> None:  # what a finished `opd up` leaves
        _write_metrics(run_dir / "metrics.jsonl", [0.2, 0.5, final], [40.0, 41.0, 42.0])
        (run_dir / "config.toml").write_text(config_text)
        (run_dir / "report.md").write_text("# report\n")

    def config_text(seed: int) -> str:
        cfg = experiments.build_variant_config(
            base, variant, run_name=names[seed], runs_dir=runs, seed=seed, batches=20
        )
        return tomli_w.dumps(cfg)

    finish(runs / names[0], 0.6, config_text(0))  # finished: kept
    finish(runs / names[1], 0.7, config_text(1))  # interrupted: no report.md
    (runs / names[1] / "report.md").unlink()
    finish(runs / names[2], 0.8, config_text(2).replace("seed = 2", "seed = 9"))  # another config
    launched = []

    def fake_up(argv: list[str]) -> int:
        path = Path(argv[-1])
        launched.append(path.stem)
        finish(runs / path.stem, 0.3, path.read_text())
        return 0

    monkeypatch.setattr(experiments.subprocess, "call", fake_up)
    out = tmp_path / "out"
    res = experiments.run_experiment(
        "table", base_path, [0, 1, 2, 3], 20, out, 0, only=[variant.slug], resume=True
    )
    assert launched == names[1:]
    finals = [r["pass@1_final"] for r in res[variant.label]]
    assert finals == [0.6, 0.3, 0.3, 0.3] and [r["seed"] for r in res[variant.label]] == [0, 1, 2, 3]
    assert "wall_s" not in res[variant.label][0] and "wall_s" in res[variant.label][1]
    # A second resume runs nothing; the rows come from the metrics again (a rewritten metrics file shows),
    # the post-hoc eval is made once per avg@n and reused, and the wall time of a run made here is kept.
    launched.clear()
    posthoc_calls = []

    def fake_posthoc(run_dir: Path, cfg: dict, n: int) -> dict[str, float]:
        posthoc_calls.append((run_dir.name, n))
        return {"pass@1": 0.1, "pass@1_lenient": 0.2, "avg@n": 0.3 + n, "avg@n_lenient": 0.4}

    monkeypatch.setattr(experiments, "posthoc_eval", fake_posthoc)
    _write_metrics(runs / names[0] / "metrics.jsonl", [0.2, 0.5, 0.65], [40.0, 41.0, 42.0])
    for n, expected_calls in ((4, names[:2]), (4, []), (2, names[:2])):
        posthoc_calls.clear()
        again = experiments.run_experiment(
            "table", base_path, [0, 1], 20, out, n, only=[variant.slug], resume=True
        )
        assert launched == [] and [c[0] for c in posthoc_calls] == expected_calls
        rows = again[variant.label]
        assert rows[0]["pass@1_final"] == 0.65 and rows[0]["posthoc/avg@n"] == 0.3 + n
        assert "wall_s" not in rows[0] and rows[1]["wall_s"] == res[variant.label][1]["wall_s"]
    saved = json.loads((runs / names[1] / "experiment.json").read_text())
    assert saved["posthoc"]["avg_n"] == 2 and saved["wall_s"] == res[variant.label][1]["wall_s"]
    # Without --resume every run runs again.
    experiments.run_experiment("table", base_path, [0], 20, out, 0, only=[variant.slug])
    assert launched == [names[0]]
    table = (out / "table" / "table.md").read_text()
    assert "seeds [0]" in table


def test_checkpoint_selection_reads_validation_only(base, tmp_path):
    # test pass@1 peaks at batch 10, validation at batch 20 (tied again at 30: the earliest wins)
    test = [0.2, 0.9, 0.5, 0.4]
    val = [0.1, 0.3, 0.6, 0.6]
    rows = [
        {"batch": 10 * i, "eval/pass@1": t, "eval/pass@1_lenient": t + 0.05, "val/pass@1": v}
        for i, (t, v) in enumerate(zip(test, val, strict=True))
    ]
    s = experiments.summarize_run(rows)
    assert s["pass@1_selected"] == 0.5 and s["selected_batch"] == 20 and s["val_pass@1_selected"] == 0.6
    assert s["pass@1_lenient_final"] == pytest.approx(0.45)
    # Any change to the test scores leaves the choice alone; a change to validation moves it.
    for i in range(len(rows)):
        shuffled = [dict(r, **{"eval/pass@1": 1.0 if j == i else 0.0}) for j, r in enumerate(rows)]
        assert experiments.select_checkpoint(shuffled)["batch"] == 20
    rows[1]["val/pass@1"] = 0.7
    assert experiments.summarize_run(rows)["pass@1_selected"] == 0.9
    table = experiments.results_table({"A": [s]})
    assert "pass@1 of val-selected ckpt" in table and "best" not in table
    # K = 1 with renormalisation would train on a zero loss: refused with the reason
    k1 = experiments.Variant("k1", {"trainer": {"top_k": 1}})
    with pytest.raises(ValueError, match="identically 0"):
        experiments.build_variant_config(base, k1, run_name="r", runs_dir=tmp_path, seed=0, batches=1)
    k1_raw = experiments.Variant("k1", {"trainer": {"top_k": 1, "renormalize": False}})
    experiments.build_variant_config(base, k1_raw, run_name="r", runs_dir=tmp_path, seed=0, batches=1)


def test_summarize_needs_an_eval():
    with pytest.raises(ValueError, match="eval"):
        experiments.summarize_run([{"batch": 1, "grad/norm": 1.0}])


def test_mean_curve_and_plot(tmp_path):
    seed0 = [{"batch": 0, "x": 1.0}, {"batch": 1, "x": 2.0}, {"batch": 2, "x": 5.0}]
    seed1 = [{"batch": 0, "x": 3.0}, {"batch": 2, "x": 7.0}]
    xs, mean, std = experiments.mean_curve([seed0, seed1], "x")
    assert xs == [0.0, 2.0] and mean == [2.0, 6.0]
    assert std == pytest.approx([statistics.stdev([1, 3]), statistics.stdev([5, 7])])
    assert experiments.mean_curve([seed0], "missing") == ([], [], [])
    runs = {"A": [[{"batch": b, "eval/pass@1": b / 10, "grad/norm": 1.0} for b in range(5)]]}
    out = experiments.plot_curves(runs, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_rejects_unknown_experiment(capsys):
    assert experiments.main(["nope"]) == 2
    assert "usage" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ diagnostics


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    tok = build_char_tokenizer()
    student = make_tiny_llama(d / "student", seed=1, tokenizer=tok)
    teacher = make_tiny_llama(d / "teacher", seed=2, tokenizer=tok)
    return student, teacher


def test_completion_logprobs_match_unpadded_reference(tiny_pair):
    model, tok = diagnostics.load_checkpoint_model(str(tiny_pair[0]))
    prompt = tok("12+3=")["input_ids"]
    comps = [tok("15")["input_ids"], tok("1a2b3c")["input_ids"] + [tok.eos_token_id]]
    got = diagnostics.completion_logprobs(model, prompt, comps, tok.pad_token_id)
    for c, lp in zip(comps, got, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + c])).logits[0].float()
        ref = torch.tensor(
            [torch.log_softmax(logits[len(prompt) + t - 1], -1)[tok_id] for t, tok_id in enumerate(c)]
        )
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)


def test_diagnostics_on_tiny_models(tiny_pair, tmp_path):
    student, tok = diagnostics.load_checkpoint_model(str(tiny_pair[0]))
    teacher, _ = diagnostics.load_checkpoint_model(str(tiny_pair[1]))
    data = diagnostics.collect_token_data(student, teacher, tok, ["1+2=", "33+4="], n=2, max_new_tokens=8)
    n = len(data.gap_N)
    assert 0 < n <= 2 * 2 * 8
    assert data.student_lp_N.shape == data.teacher_lp_N.shape == data.position_N.shape == (n,)
    assert (data.student_lp_N <= 0).all() and (data.position_N < 8).all()
    xs, means, _, counts = diagnostics.gap_by_position(data)
    assert sum(counts) == n and xs == sorted(set(data.position_N.tolist()))
    assert means[0] == pytest.approx(float(data.gap_N[data.position_N == xs[0]].mean()), abs=1e-6)
    s = diagnostics.summary(data)
    assert s["tokens"] == n and 0 <= s["confident_rejected_share"] <= 1
    for p in diagnostics.plot_diagnostics(data, tmp_path):
        assert p.exists() and p.stat().st_size > 1000
    # a student checkpoint dir without ckpt-* is an error, not a silent fallback to the base weights
    with pytest.raises(FileNotFoundError):
        diagnostics.load_checkpoint_model(str(tiny_pair[0]), tmp_path / "empty")


def test_evaluate_model_scores_with_the_verifier(tiny_pair, tmp_path):
    from services.common.verifiers import completion_text, ends_with_own_marker, own_end_ids

    model, tok = diagnostics.load_checkpoint_model(str(tiny_pair[0]))
    prompts = [f"{i}+1=" for i in range(3)]
    _, greedy = diagnostics.sample_completions(model, tok, prompts, greedy=True, max_new_tokens=6)
    texts = [completion_text(tok, c[0]) for c in greedy]
    # answers: the greedy texts themselves for the first two prompts, something else for the third
    answers = [texts[0], texts[1], texts[2] + "x"]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers, strict=True))
    )
    same = lambda completion, answer: float(completion == answer)  # noqa: E731
    out = diagnostics.evaluate_model(model, tok, str(eval_file), same, n=3, max_new_tokens=6)
    assert out["pass@1_lenient"] == pytest.approx(2 / 3)
    # strict: only the accepted greedy completions that stopped at the model's own eos
    own = [ends_with_own_marker(tok, c[0], own_end_ids(tok)) for c in greedy]
    assert out["pass@1"] == pytest.approx((own[0] + own[1]) / 3)
    # avg@n: the mean over prompts of the share of the n samples accepted, checked against a count by hand
    _, sampled = diagnostics.sample_completions(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0)
    assert all(len(cs) == 3 for cs in sampled)
    nonempty = lambda completion, answer: float(len(completion) > 0)  # noqa: E731
    got = diagnostics.evaluate_model(model, tok, str(eval_file), nonempty, n=3, max_new_tokens=6)
    ref = sum(sum(len(completion_text(tok, c)) > 0 for c in cs) / 3 for cs in sampled) / 3
    assert got["avg@n_lenient"] == pytest.approx(ref)
    ref = sum(
        sum(len(completion_text(tok, c)) > 0 and ends_with_own_marker(tok, c, own_end_ids(tok)) for c in cs)
        / 3
        for cs in sampled
    )
    assert got["avg@n"] == pytest.approx(ref / 3)


def test_run_report_shows_strict_lenient_and_the_val_selected_eval(tmp_path):
    from experiments.report import write_report

    rows = [
        {"batch": 0, "eval/pass@1": 0.1, "eval/pass@1_lenient": 0.3, "val/pass@1": 0.2},
        {"batch": 5, "eval/pass@1": 0.6, "eval/pass@1_lenient": 0.7, "val/pass@1": 0.5},
        {"batch": 10, "eval/pass@1": 0.8, "eval/pass@1_lenient": 0.9, "val/pass@1": 0.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path).read_text()
    assert "| before (student at start) | 0.100 | 0.300 |" in text
    assert "| after (10 batches) | 0.800 | 0.900 |" in text
    assert "| selected on validation (batch 5, val 0.500) | 0.600 | 0.700 |" in text
