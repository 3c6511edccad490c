"""The command line's cd_tokenwise, cd_blockwise and args methods on tiny saved models: options reach the
strategies, a trained value model folder loads, and bad options are one-line errors."""

from __future__ import annotations

import pytest

from align_decode.training.value import save_value_model
from cli_support import invoke, save_model, write_jsonl
from cli_support import run_ok as cli_run_ok
from tiny import tiny_llama, tiny_tokenizer

PROMPTS = [{"id": "a", "prompt": "w1 w2 w3"}, {"id": "b", "messages": [{"role": "user", "content": "w4 w5"}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cd_models")
    save_model(root / "policy", seed=0)
    save_value_model(tiny_llama(seed=5), root / "value", "q", tiny_tokenizer())
    save_value_model(tiny_llama(seed=6), root / "other", "q", tiny_tokenizer(shift=1))
    return {name: str(root / name) for name in ("policy", "value", "other")}


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def run_ok(models, prompts, out, *extra):
    return cli_run_ok(models["policy"], prompts, out, *extra, max_new_tokens=6)


def one_line_error(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("align-decode: error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_cd_tokenwise_with_a_value_model_folder(models, prompts, tmp_path):
    greedy = ["--temperature", 0, "--reward", "none"]
    plain = run_ok(models, prompts, tmp_path / "plain.jsonl", "--method", "sample", *greedy)
    lines = run_ok(models, prompts, tmp_path / "cd.jsonl", "--method", "cd_tokenwise", "--value-model",
                   models["value"], "--value-weight", 8.0, *greedy)
    hyper = lines[0]["hyperparameters"]
    assert hyper["value_models"] == [models["value"]] and hyper["weights"] == [8.0]
    # A strongly weighted random value model moves greedy decoding.
    assert [p["completion"] for p in plain] != [c["completion"] for c in lines]


def test_cd_tokenwise_with_the_reward_on_the_top_k(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "cd_tokenwise", "--reward",
                   "length:target=2", "--candidate-tokens", 4, "--value-weight", 0.5)
    assert lines[0]["hyperparameters"]["top_k"] == [4] and lines[0]["hyperparameters"]["weights"] == [0.5]


def test_cd_blockwise_options(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "cd_blockwise", "--value-model",
                   models["value"], "--num-candidates", 3, "--block-size", 2, "--reward", "none")
    hyper = lines[0]["hyperparameters"]
    assert hyper["num_candidates"] == 3 and hyper["block_size"] == 2 and hyper["scorer"] == models["value"]


def test_args_official_no_eos_stop(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "args", "--reward", "length:target=2",
                   "--candidate-tokens", 3, "--reward-weight", 2.0, "--stop-at-eos", "false")
    for line in lines:
        assert line["tokens"]["completion"] == 6 and line["finish_reason"] == "length"
        assert line["hyperparameters"]["k"] == 3 and line["hyperparameters"]["weight"] == 2.0
        assert line["hyperparameters"]["stop_at_eos"] is False


@pytest.mark.parametrize("args,fragment", [
    (["--method", "cd_tokenwise", "--reward", "none"], "needs --value-model"),
    (["--method", "cd_blockwise", "--reward", "none"], "needs --value-model"),
    (["--method", "args", "--reward", "none"], "needs a reward"),
    (["--method", "args", "--reward", "length:target=2", "--block-size", 2], "--block-size does not apply"),
    (["--method", "args", "--reward", "length:target=2", "--candidate-tokens", 100],
     "--candidate-tokens 100 is larger than the policy's vocabulary (64 tokens)"),
    (["--method", "cd_tokenwise", "--value-model", "{other}", "--reward", "none"], "does not share"),
    (["--method", "cd_tokenwise", "--value-model", "{policy}", "--reward", "none"], "value_model.json"),
])
def test_bad_options_are_one_line_errors(models, prompts, tmp_path, args, fragment):
    args = [a.format(**models) if isinstance(a, str) else a for a in args]
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                    "--max-new-tokens", 3, "--quiet", *args)
    one_line_error(result, fragment)
