"""`align-decode make-preferences`, `train-arm` and `train-value` in process (CliRunner) on tiny saved models:
what they write, that the decoders load it, and bad input as one-line errors with exit status 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align_decode.training.preferences import PreferenceSettings, pick_pair
from align_decode.rewards.registry import build_reward
from align_decode.training.value import load_value_model
from cli_support import assert_one_line_error as one_line_error
from cli_support import invoke, read_lines, save_model, write_jsonl

PROMPTS = [{"id": f"p{i}", "prompt": f"w{i} w{i + 1} w{i + 2}"} for i in range(6)]
PROMPTS.append({"id": "chat", "messages": [{"role": "user", "content": "w30 w31"}]})
REWARD = "length:target=3"


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("policy") / "policy", seed=0)


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


# ----------------------------------------------------------------------------------- pairing rules
def test_pick_pair_takes_best_and_worst_first_on_ties():
    assert pick_pair([0.1, 0.9, 0.9, -2.0, -2.0], list("abcde")) == (1, 3)
    assert pick_pair([1.0, 1.0], ["a", "b"]) is None  # no margin
    assert pick_pair([0.0, 0.5], ["a", "b"], min_margin=0.5) is None
    assert pick_pair([0.0, 0.6], ["a", "b"], min_margin=0.5) == (1, 0)
    assert pick_pair([0.0, 1.0], ["same", "same"]) is None  # the same text cannot be preferred to itself
    with pytest.raises(ValueError, match="at least 2 samples"):
        pick_pair([1.0], ["a"])


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 1}, "samples must be an integer >= 2"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"min_margin": -1.0}, "min_margin must be a finite number >= 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"samples": True}, "samples must be an integer >= 2, got True"),
    ({"max_rows": "64"}, "max_rows must be an integer >= 1, got '64'"),
    ({"temperature": True}, "temperature must be a finite number > 0, got True"),
    ({"min_margin": "0"}, "min_margin must be a finite number >= 0, got '0'"),
    ({"seed": -1}, r"seed must be an integer in \[0, 9223372036854775808\), got -1"),
])
def test_preference_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceSettings(**kwargs)


# ------------------------------------------------------------------------------- make-preferences
def make(policy, prompts, out, *extra):
    return invoke("make-preferences", "--model", policy, "--prompts", prompts, "--out", out, "--reward", REWARD,
                  "--samples", 4, "--max-new-tokens", 6, "--quiet", *extra)


def test_make_preferences_pairs_best_with_worst(policy, prompts, tmp_path):
    out = tmp_path / "prefs.jsonl"
    result = ok(make(policy, prompts, out, "--json-summary"))
    summary = json.loads(result.stdout)
    lines = read_lines(out)
    assert summary["pairs"] == len(lines) and summary["pairs"] + summary["skipped"] == len(PROMPTS)
    assert len(lines) >= 4  # six-token samples of a random model rarely all have the same length
    reward = build_reward(REWARD)
    by_id = {str(p["id"]): p for p in PROMPTS}
    for line in lines:
        given = by_id[str(line["id"])]
        assert line["prompt"] == given.get("prompt", given.get("messages"))
        assert line["samples"] == 4 and line["chosen"] != line["rejected"]
        assert line["chosen_reward"] > line["rejected_reward"]
        assert line["rejected_reward"] <= line["mean_reward"] <= line["chosen_reward"]
        # The recorded rewards are the reward of the recorded texts.
        again = reward.score(["", ""], [line["chosen"], line["rejected"]]).tolist()
        assert again == pytest.approx([line["chosen_reward"], line["rejected_reward"]])


def test_make_preferences_is_reproducible_whatever_the_batching_and_resumes(policy, prompts, tmp_path):
    whole, single = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ok(make(policy, prompts, whole, "--batch-size", 4))
    ok(make(policy, prompts, single, "--batch-size", 1, "--max-rows", 3))
    assert read_lines(whole) == read_lines(single)
    # Keep the first two pairs; --resume redoes only the missing prompts, with the same draws.
    lines = whole.read_text().splitlines(keepends=True)
    partial = tmp_path / "c.jsonl"
    partial.write_text("".join(lines[:2]))
    ok(make(policy, prompts, partial, "--resume"))
    assert sorted(map(json.dumps, read_lines(partial))) == sorted(map(json.dumps, read_lines(whole)))
    # Without --resume an existing file is refused, not overwritten.
    one_line_error(make(policy, prompts, partial), "already exists")


def test_make_preferences_min_margin_skips_prompts(policy, prompts, tmp_path):
    result = ok(make(policy, prompts, tmp_path / "p.jsonl", "--min-margin", 1000, "--json-summary"))
    summary = json.loads(result.stdout)
    assert summary["pairs"] == 0 and summary["skipped"] == len(PROMPTS)


@pytest.mark.parametrize("extra, fragments", [
    (["--samples", 1], ["samples must be an integer >= 2"]),
    (["--temperature", 0], ["temperature must be a finite number > 0"]),
    (["--reward", "none"], ["--reward is required"]),
    (["--reward", "no_such_reward"], ["unknown reward 'no_such_reward'"]),
])
def test_make_preferences_bad_options(policy, prompts, tmp_path, extra, fragments):
    one_line_error(make(policy, prompts, tmp_path / "p.jsonl", *extra), *fragments)


def test_make_preferences_bad_inputs(policy, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], "{not json"])
    one_line_error(make(policy, bad, tmp_path / "p.jsonl"), "bad.jsonl:2", "not valid JSON")
    good = write_jsonl(tmp_path / "good.jsonl", PROMPTS[:1])
    one_line_error(make(str(tmp_path / "missing"), good, tmp_path / "p.jsonl"), "model folder not found")
    one_line_error(make(policy, str(tmp_path / "none.jsonl"), tmp_path / "p.jsonl"), "prompt file not found")
    assert not (tmp_path / "p.jsonl").exists() or (tmp_path / "p.jsonl").stat().st_size == 0


# --------------------------------------------------------------------------------------- train-arm
def preference_file(tmp_path) -> str:
    # The chosen answer always says w10, the rejected one w20: the ARM must learn to prefer w10.
    rows = [{"prompt": f"w{i} w{i + 1}", "chosen": "w10", "rejected": "w20"} for i in range(30)]
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


def train(policy, prefs, out, *extra):
    return invoke("train-arm", "--model", policy, "--preferences", prefs, "--out", out, "--no-chat-template",
                  "--beta-r", 0.5, "--lr", 3e-3, "--epochs", 4, "--batch-size", 4, "--lora-r", 4,
                  "--eval-fraction", 0.2, "--quiet", *extra)


def test_train_arm_learns_the_preference_and_the_folder_decodes(policy, tmp_path):
    out = tmp_path / "arm"
    result = ok(train(policy, preference_file(tmp_path), out, "--json-summary"))
    metrics = json.loads(result.stdout)
    assert metrics["train_pairs"] == 24 and metrics["eval_pairs"] == 6 and metrics["layers"] == 2
    # Held-out prompts: every pair ranked right after training, by a clearly wider margin than before.
    assert metrics["eval_after"]["accuracy"] == 1.0
    assert metrics["eval_after"]["margin"] > metrics["eval_before"]["margin"] + 1.0
    saved = json.loads((out / "arm_training.json").read_text())
    assert saved["config"]["beta_r"] == 0.5 and saved["config"]["lora_r"] == 4
    # The saved folder is a plain model the genarm method loads as an ARM.
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    ok(invoke("run", "--model", policy, "--method", "genarm", "--arm", out, "--beta", 0.5, "--prompts", prompts,
              "--out", tmp_path / "out.jsonl", "--max-new-tokens", 3, "--reward", "none", "--quiet"))
    assert len(read_lines(tmp_path / "out.jsonl")) == 2


def test_train_arm_truncated_full_fine_tuning(policy, tmp_path):
    result = ok(train(policy, preference_file(tmp_path), tmp_path / "small", "--layers", 1, "--lora-r", 0,
                      "--json-summary"))
    metrics = json.loads(result.stdout)
    assert metrics["layers"] == 1 and metrics["config"]["lora_r"] == 0
    assert json.loads((tmp_path / "small" / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize("beta_r", [0, -1, "nan", "inf"])
def test_train_arm_bad_beta_r(policy, tmp_path, beta_r):
    one_line_error(train(policy, preference_file(tmp_path), tmp_path / "arm", "--beta-r", beta_r), "beta_r must be")
    assert not (tmp_path / "arm").exists()


def test_train_arm_bad_preference_line(policy, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"},
                                                   {"prompt": "w1", "chosen": "w2"}])
    one_line_error(train(policy, prefs, tmp_path / "arm"), "prefs.jsonl:2", "missing field(s) rejected")
    bad_json = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    one_line_error(train(policy, bad_json, tmp_path / "arm"), "bad.jsonl:1", "not valid JSON")


def test_train_arm_missing_model_and_used_output(policy, tmp_path):
    prefs = preference_file(tmp_path)
    one_line_error(train(str(tmp_path / "no_model"), prefs, tmp_path / "arm"), "model folder not found")
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    one_line_error(train(policy, prefs, used), "already exists and is not an empty folder")
    one_line_error(train(policy, prefs, tmp_path / "arm", "--layers", 9), "layers must be an integer in [1, 2], got 9")
    one_line_error(train(policy, prefs, tmp_path / "arm", "--layers", 0), "--layers must be an integer >= 1")


# ------------------------------------------------------------------------------------- train-value
def train_value(policy, prompts, out, *extra):
    return invoke("train-value", "--model", policy, "--prompts", prompts, "--out", out, "--reward", REWARD,
                  "--samples", 4, "--max-new-tokens", 5, "--steps", 40, "--batch-size", 8, "--lr", 1e-2,
                  "--quiet", *extra)


@pytest.mark.parametrize("kind", ["q", "scalar"])
def test_train_value_saves_a_model_cd_decodes_with(policy, prompts, tmp_path, kind):
    out = tmp_path / "value"
    result = ok(train_value(policy, prompts, out, "--kind", kind, "--layers", 1, "--json-summary"))
    info = json.loads(result.stdout)
    assert info["kind"] == kind and info["layers"] == 1 and info["rollouts"] == 4 * len(PROMPTS)
    assert math.isfinite(info["final_loss"]) and info["final_loss"] < info["first_loss"]
    saved = json.loads((out / "value_model.json").read_text())
    assert saved["kind"] == kind and saved["reward"] == REWARD
    value = load_value_model(out, k=3)
    assert type(value).__name__ == ("QValueModel" if kind == "q" else "ScalarValueModel")
    with torch.no_grad():
        assert torch.isfinite(value.score_ids([[7, 8]], [[9, 10]])).all()
    run_prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    ok(invoke("run", "--model", policy, "--method", "cd_tokenwise", "--value-model", out, "--value-weight", 2.0,
              "--candidate-tokens", 3, "--prompts", run_prompts, "--out", tmp_path / "out.jsonl",
              "--max-new-tokens", 3, "--reward", "none", "--quiet"))
    assert len(read_lines(tmp_path / "out.jsonl")) == 2


@pytest.mark.parametrize("extra, fragments", [
    (["--steps", 0], ["--steps must be an integer >= 1"]),
    (["--lr", -1], ["--lr must be a finite number > 0"]),
    (["--reward", "none"], ["--reward is required"]),
    (["--layers", 0], ["--layers must be an integer >= 1"]),
    (["--kind", "table"], ["Invalid value for '--kind'"]),
])
def test_train_value_bad_options(policy, prompts, tmp_path, extra, fragments):
    one_line_error(train_value(policy, prompts, tmp_path / "value", *extra), *fragments)
    assert not (tmp_path / "value").exists()


def test_train_value_missing_model(prompts, tmp_path):
    one_line_error(train_value(str(tmp_path / "none"), prompts, tmp_path / "value"), "model folder not found")
