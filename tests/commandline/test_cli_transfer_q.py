"""The command line's transfer_q method on tiny saved models: options reach the strategy, alpha = 0 is
plain decoding, indirect transfer takes the second --reward, and bad options are one-line errors."""

from __future__ import annotations

import pytest

from cli_support import invoke, save_model, write_jsonl
from cli_support import run_ok as cli_run_ok

PROMPTS = [{"id": "a", "prompt": "w1 w2 w3"}, {"id": "b", "messages": [{"role": "user", "content": "w4 w5"}]}]
TQ = ("--method", "transfer_q", "--candidate-tokens", 3, "--rollout-len", 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tq_models")
    return {name: save_model(root / name, seed=seed, shift=shift)
            for name, seed, shift in (("policy", 0, 0), ("baseline", 7, 0), ("other", 8, 1))}


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def run_ok(models, prompts, out, *extra):
    return cli_run_ok(models["policy"], prompts, out, "--temperature", 0, *extra, max_new_tokens=4)


def one_line_error(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("align-decode: error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_options_reach_the_strategy(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "tq.jsonl", *TQ, "--baseline", models["baseline"], "--alpha", 4.0,
                   "--prior", "baseline", "--reward", "length:target=3")
    hyper = lines[0]["hyperparameters"]
    assert (hyper["alpha"], hyper["k"], hyper["rollout_len"], hyper["prior"], hyper["transfer"]) == \
        (4.0, 3, 2, "baseline", "direct")
    assert hyper["num_rollouts"] == 1 and hyper["rollout_sampling"] == "greedy"
    assert [line["id"] for line in lines] == ["a", "b"]


def test_alpha_zero_is_plain_decoding_and_a_large_alpha_is_not(models, prompts, tmp_path):
    plain = run_ok(models, prompts, tmp_path / "plain.jsonl", "--method", "sample", "--reward", "none")
    zero = run_ok(models, prompts, tmp_path / "zero.jsonl", *TQ, "--alpha", 0, "--reward", "keywords:w30")
    assert [line["completion"] for line in zero] == [line["completion"] for line in plain]
    # Long rollouts that reward one word: with a large alpha a candidate reaching it wins.
    steered = run_ok(models, prompts, tmp_path / "steered.jsonl", "--method", "transfer_q", "--candidate-tokens", 64,
                     "--rollout-len", 0, "--alpha", 50, "--reward", "keywords:w30")
    assert all("w30" in line["completion"] for line in steered)
    assert not all("w30" in line["completion"] for line in plain)


def test_indirect_transfer_takes_the_second_reward(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "ind.jsonl", *TQ, "--transfer", "indirect", "--importance-weights",
                   "raw", "--beta", 2.0, "--reward", "length:target=3", "--reward", "keywords:w4")
    hyper = lines[0]["hyperparameters"]
    assert (hyper["transfer"], hyper["normalize_weights"], hyper["beta"]) == ("indirect", False, 2.0)
    assert hyper["reward"] == "length" and hyper["baseline_reward"] == "keywords"


@pytest.mark.parametrize("extra, fragment", [
    (("--transfer", "indirect", "--reward", "length:target=3"), "needs two rewards"),
    (("--num-rollouts", 2, "--reward", "length:target=3"), "greedy rollouts repeats"),
    (("--candidate-tokens", 500, "--reward", "length:target=3"), "--candidate-tokens 500 is larger than the policy's vocabulary"),
    (("--baseline", "{other}", "--reward", "length:target=3"), "does not share the policy's tokenizer"),
])
def test_bad_options_are_one_line_errors(models, prompts, tmp_path, extra, fragment):
    extra = [e.format(**models) if isinstance(e, str) else e for e in extra]
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                    "--method", "transfer_q", *extra)
    one_line_error(result, fragment)


def test_transfer_q_options_are_refused_by_other_methods(models, prompts, tmp_path):
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                    "--method", "sample", "--rollout-len", 3)
    one_line_error(result, "--rollout-len")
