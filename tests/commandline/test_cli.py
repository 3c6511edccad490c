"""The `align-decode` command in process (click's CliRunner) on tiny saved models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from align_decode.cli import cli
from align_decode.commandline.run import RunFailure
from align_decode.commandline.console import Console
from align_decode.commandline.prompts_file import PromptFileError, parse_shard, read_prompts, shard_records
from align_decode.commandline.results_file import ResultsFile
from align_decode.commandline.methods import METHODS, check_applicable, get_method
from align_decode.rewards import CallableReward, registry
from cli_support import assert_one_line_error, cli_runner, invoke, read_lines, save_model, write_jsonl
from cli_support import run_ok as cli_run_ok
from tiny import tiny_tokenizer

PROMPTS = [
    {"id": "a", "prompt": "w1 w2 w3"},
    {"id": "b", "messages": [{"role": "user", "content": "w4 w5"}]},
    {"id": 3, "prompt": "w6"},
    {"id": "d", "messages": [{"role": "system", "content": "w7"}, {"role": "user", "content": "w8 w9 w10"}]},
    {"id": "e", "prompt": "w11 w12", "answer": "w13"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "policy": save_model(root / "policy", seed=0),
        "arm": save_model(root / "arm", seed=1),
        "arm2": save_model(root / "arm2", seed=2),
        "other_vocab": save_model(root / "other", seed=3, shift=1),
    }


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def run_ok(models, prompts, out, *extra):
    return cli_run_ok(models["policy"], prompts, out, *extra)


# ------------------------------------------------------------------------------------- end to end
# One command line per registered method; a method added to the registry must add its case here.
METHOD_CASES = {
    "sample": [],
    "genarm": ["--arm", "{arm}", "--beta", "0.5"],
    "best_of_n": ["--n", "3", "--reward", "length:target=2"],
    "qalign": ["--steps", "3", "--reward", "length:target=2", "--beta", "0.5"],
    "cd_tokenwise": ["--reward", "length:target=2", "--candidate-tokens", "3"],
    "cd_blockwise": ["--reward", "length:target=2", "--num-candidates", "2", "--block-size", "2"],
    "args": ["--reward", "length:target=2", "--candidate-tokens", "3", "--reward-weight", "2.0"],
    "transfer_q": ["--reward", "length:target=2", "--candidate-tokens", "3", "--rollout-len", "2"],
    "beam_search": ["--n", "4", "--beam-width", "2", "--step-tokens", "2", "--reward", "length:target=2"],
    "dvts": ["--n", "4", "--beam-width", "2", "--step-tokens", "2", "--reward", "length:target=2"],
    "particle_filter": ["--n", "3", "--step-tokens", "2", "--reward", "length:target=2"],
    "pruned_best_of_n": ["--n", "4", "--prune-at", "2", "--reward", "length:target=2"],
}


def test_every_registered_method_has_an_end_to_end_case():
    assert set(METHOD_CASES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_every_method_runs_end_to_end(models, prompts, tmp_path, method):
    extra = [a.format(**models) for a in METHOD_CASES[method]]
    out = tmp_path / "out.jsonl"
    lines = run_ok(models, prompts, out, "--method", method, *extra)
    assert [line["id"] for line in lines] == [p["id"] for p in PROMPTS]
    for line, given in zip(lines, PROMPTS):
        assert line["method"] == method
        assert isinstance(line["completion"], str)
        assert 1 <= line["tokens"]["completion"] <= 5 and line["tokens"]["prompt"] > 0
        assert line["finish_reason"] in ("stop", "length")
        assert line["generation"]["max_new_tokens"] == 5 and line["run_seed"] == 0
        assert isinstance(line["seed"], int) and line["timing"]["batch_prompts"] == len(PROMPTS)
        assert line["prompt"] == given.get("prompt", given.get("messages", [{}])[-1].get("content"))
        assert line.get("messages") == given.get("messages")
    assert lines[4]["meta"] == {"answer": "w13"}


def test_genarm_options_reach_the_strategy_and_change_the_output(models, prompts, tmp_path):
    greedy = ["--temperature", 0, "--max-new-tokens", 8]
    plain = run_ok(models, prompts, tmp_path / "plain.jsonl", "--method", "sample", *greedy)
    two = run_ok(models, prompts, tmp_path / "two.jsonl", "--arm", models["arm"], "--arm", models["arm2"],
                 "--weight", 4.0, "--weight", 2.0, "--temperature-semantics", "model_arithmetic", *greedy)
    hyper = two[0]["hyperparameters"]
    assert hyper["weights"] == [4.0, 2.0] and hyper["beta"] is None
    assert hyper["arms"] == [models["arm"], models["arm2"]] and hyper["temperature_semantics"] == "model_arithmetic"
    # Strongly weighted random ARMs must move greedy decoding somewhere.
    assert [p["completion"] for p in plain] != [t["completion"] for t in two]


def test_genarm_prompted_arm_on_the_policy_by_default(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl")
    assert lines[0]["method"] == "genarm"
    assert lines[0]["hyperparameters"]["arms"] == ["policy prompted: Reply in a warm, kind and positive tone."]
    lines = run_ok(models, prompts, tmp_path / "out2.jsonl", "--arm", models["arm"], "--arm-prompt", "w20 w21")
    assert lines[0]["hyperparameters"]["arm_prompt"] == "w20 w21"
    assert lines[0]["hyperparameters"]["arms"] == [f"{models['arm']} prompted: w20 w21"]


def test_best_of_n_writes_every_candidate_and_answers_with_the_best(models, prompts, tmp_path):
    spec = "length:target=3"
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "best_of_n", "--n", 4,
                   "--temperature", 1.5, "--reward", spec, "--max-new-tokens", 6)
    for line in lines:
        rewards = [c["rewards"][spec] for c in line["candidates"]]
        assert len(rewards) == 4 and line["chosen"] == rewards.index(max(rewards))
        assert line["completion"] == line["candidates"][line["chosen"]]["text"]
        assert line["rewards"][spec] == max(rewards) == -abs(len(line["completion"].split()) - 3)
        assert line["tokens"]["generated"] == sum(c["tokens"] for c in line["candidates"])
        assert line["hyperparameters"]["n"] == 4 and line["hyperparameters"]["aggregate"] == "best"
    assert any(len(set(c["text"] for c in line["candidates"])) > 1 for line in lines)


def test_qalign_chains_and_acceptance_rates(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "qalign", "--n", 2, "--chains", 3,
                   "--steps", 4, "--reward", "length:target=2", "--temperature", 1.0)
    for line in lines:
        assert len(line["candidates"]) == 2 and line["chosen"] == 0
        rates = line["extras"]["acceptance_rate"]
        assert len(rates) == 3 and all(0.0 <= r <= 1.0 for r in rates)
        assert line["hyperparameters"]["chains"] == 3 and line["hyperparameters"]["steps"] == 4


def test_builtin_rewards_from_the_command_line(models, prompts, tmp_path):
    specs = ["keywords:w1,!w2", r"regex:^w\d+$", "length:target=3,unit=tokens", "sentiment:pos"]
    args = [a for spec in specs for a in ("--reward", spec)]
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "sample", "--n", 2, "--temperature", 2.0,
                   "--max-new-tokens", 4, *args)
    for line in lines:
        for c in line["candidates"]:
            text, r = c["text"], c["rewards"]
            assert r["keywords:w1,!w2"] == pytest.approx((("w1" in text) + ("w2" not in text)) / 2)
            assert r[r"regex:^w\d+$"] == float(len(text.split()) == 1 and text.strip().startswith("w"))
            assert r["length:target=3,unit=tokens"] == -abs(len(text.split()) - 3)
            assert r["sentiment:pos"] == 0.0  # made-up words carry no sentiment


def test_reward_builders_parse_their_arguments():
    from align_decode.commandline.prompts_file import PromptRecord

    records = [PromptRecord(id=1, line=1, index=0, prompt="2+3?", meta={"answer": 5}),
               PromptRecord(id=2, line=2, index=1, prompt="10-4?", meta={"answer": "6"})]
    exact = registry.build_reward("exact_match", registry.RewardContext(records=records))
    assert exact.score(["2+3?", "10-4?", "2+3?"], ["so #### 5", "it is 7", "The answer is 5"]).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="needs an \"answer\" field on every prompt; line 3 has none"):
        registry.build_reward("exact_match", registry.RewardContext(records=records + [
            PromptRecord(id=3, line=3, index=2, prompt="x")]))
    sentiment = registry.build_reward("sentiment")
    assert sentiment.score(["", ""], ["what a lovely day", "this is awful"]).tolist()[0] > 0.5
    keywords = registry.build_reward("keywords:Paris,!London")
    assert keywords.score(["", ""], ["Paris", "London and Paris"]).tolist() == [1.0, 0.5]
    assert registry.build_reward("regex:a,b").score([""], ["xa,by"]).tolist() == [1.0]  # commas stay in patterns
    assert registry.build_reward("length:max_length=2").score(["", ""], ["a b", "a b c d"]).tolist() == [0.0, -2.0]
    with pytest.raises(ValueError, match="'length': target='x' is not a valid int"):
        registry.build_reward("length:target=x")
    with pytest.raises(ValueError, match="takes no arguments"):
        registry.build_reward("non_toxicity:strict")


def test_classifier_reward_from_a_local_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer().save_pretrained(tmp_path / "rm")
    reward = registry.build_reward(f"classifier:{tmp_path / 'rm'},reduction=prob,batch_size=2")
    scores = reward.score(["w1", "w2", "w3"], ["w4 w5", "w6", "w7 w8 w9"])
    assert scores.shape == (3,) and bool(((scores > 0) & (scores < 1)).all())
    assert reward.batch_size == 2 and reward.reduction == "prob"


def test_chat_template_is_applied_unless_turned_off(models, tmp_path):
    plain_only = write_jsonl(tmp_path / "p.jsonl", [p for p in PROMPTS if "prompt" in p])
    chat = run_ok(models, plain_only, tmp_path / "chat.jsonl", "--method", "sample")
    raw = run_ok(models, plain_only, tmp_path / "raw.jsonl", "--method", "sample", "--no-chat-template")
    # "w1 w2 w3" is 3 words; the template adds <|user|>, <|end|> and <|assistant|>.
    assert [c["tokens"]["prompt"] for c in chat] == [6, 4, 5]
    assert [r["tokens"]["prompt"] for r in raw] == [3, 1, 2]
    assert chat[0]["generation"]["chat_template"] is True and raw[0]["generation"]["chat_template"] is False


def test_n_candidates_are_all_written(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "sample", "--n", 3, "--temperature", 1.5)
    for line in lines:
        assert len(line["candidates"]) == 3
        assert line["completion"] == line["candidates"][0]["text"]
        assert line["tokens"]["generated"] == sum(c["tokens"] for c in line["candidates"])
    assert any(len({c["text"] for c in line["candidates"]}) > 1 for line in lines)


def test_text_prompt_files_use_line_numbers_as_ids(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2\n\nw3\n")
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "sample")
    assert [(line["id"], line["prompt"]) for line in lines] == [(1, "w1 w2"), (3, "w3")]


# ------------------------------------------------------------------------------------- seeds
def test_a_prompts_output_depends_on_its_seed_not_its_batch_or_shard(models, prompts, tmp_path):
    args = ("--method", "sample", "--temperature", 1.5, "--max-new-tokens", 8)
    whole = run_ok(models, prompts, tmp_path / "whole.jsonl", *args, "--batch-size", 5)
    single = run_ok(models, prompts, tmp_path / "single.jsonl", *args, "--batch-size", 1)
    shard0 = run_ok(models, prompts, tmp_path / "s0.jsonl", *args, "--shard", "0/2", "--batch-size", 2)
    shard1 = run_ok(models, prompts, tmp_path / "s1.jsonl", *args, "--shard", "1/2")
    assert [line["id"] for line in shard0] == ["a", 3, "e"] and [line["id"] for line in shard1] == ["b", "d"]
    by_id = {line["id"]: line["completion"] for line in shard0 + shard1}
    assert [line["completion"] for line in whole] == [line["completion"] for line in single]
    assert [line["completion"] for line in whole] == [by_id[line["id"]] for line in whole]
    other_seed = run_ok(models, prompts, tmp_path / "seed.jsonl", *args, "--seed", 1)
    assert [line["completion"] for line in other_seed] != [line["completion"] for line in whole]


# ------------------------------------------------------------------------------------- resume
def test_resume_skips_done_ids_and_drops_a_partial_last_line(models, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ("--method", "sample", "--temperature", 1.0)
    full = run_ok(models, prompts, out, *args)
    kept = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + '{"id": "d", "compl')  # a crash mid-line of some older writer
    refused = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--reward", "none")
    assert_one_line_error(refused, "already exists", "--resume")
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--max-new-tokens", 5,
                    "--reward", "none", "--quiet", "--resume", *args)
    assert result.exit_code == 0, result.stderr
    assert "dropping an unfinished last line" in result.stderr
    resumed = read_lines(out)
    assert [line["id"] for line in resumed] == [p["id"] for p in PROMPTS]
    assert [line["completion"] for line in resumed] == [line["completion"] for line in full]
    again = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--resume", "--method", "sample")
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    assert read_lines(out) == resumed


def test_resume_refuses_another_method_or_other_settings_naming_old_and_new(models, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    run_ok(models, prompts, out, "--method", "sample", "--shard", "0/2")
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--resume")
    assert_one_line_error(result, "method 'sample'", "'genarm'")

    def resume(*extra, model=models["policy"]):
        return invoke("run", "--model", model, "--prompts", prompts, "--out", out, "--method", "sample",
                      "--max-new-tokens", 5, "--reward", "none", "--resume", *extra)

    # The same model by another spelling of its path is the same model.
    respelled = str(Path(models["policy"]).parent / "." / Path(models["policy"]).name) + "/"
    same = resume("--shard", "1/2", model=respelled)
    assert same.exit_code == 0 and "other settings" not in same.stderr, same.stderr
    assert len(read_lines(out)) == len(PROMPTS)
    kept = out.read_text().splitlines(keepends=True)[:2]
    for extra, fragment in [
        (("--temperature", 0), "generation.temperature 0.7 (now 0.0)"),
        (("--seed", 3), "run_seed 0 (now 3)"),
        (("--max-new-tokens", 4), "generation.max_new_tokens 5 (now 4)"),
    ]:
        out.write_text("".join(kept))
        changed = resume(*extra)
        assert_one_line_error(changed, "was made with other settings", fragment, "another --out")
        assert out.read_text() == "".join(kept)  # nothing appended
    other = resume(model=models["arm"])
    assert_one_line_error(other, "model ")
    assert out.read_text() == "".join(kept)


def test_resume_refuses_a_changed_prompt_under_a_done_id(models, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    run_ok(models, prompts, out, "--method", "sample", "--shard", "0/2")
    done = read_lines(out)[0]["id"]
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    changed_line = next(i for i, r in enumerate(rows, 1) if r["id"] == done)
    rows[changed_line - 1]["prompt"] = "w3 w4 w5 w6 w7"
    edited = write_jsonl(tmp_path / "edited.jsonl", rows)
    result = invoke("run", "--model", models["policy"], "--prompts", edited, "--out", out, "--method", "sample",
                    "--max-new-tokens", 5, "--reward", "none", "--resume")
    assert_one_line_error(result, f"{edited}:{changed_line}", f"prompt id {json.dumps(done)}", "another prompt text")


def test_a_failure_mid_run_keeps_finished_prompts_and_exits_1(models, prompts, tmp_path, monkeypatch):
    (tmp_path / "cli_flaky_reward.py").write_text(
        "calls = []\n"
        "def score(prompts, completions):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise RuntimeError('reward server went away')\n"
        "    return [0.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.jsonl"
    args = ("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--method", "sample",
            "--max-new-tokens", 4, "--batch-size", 2, "--quiet")
    result = invoke(*args, "--reward", "cli_flaky_reward:score")
    assert result.exit_code == 1
    # The reward is named, with what it raised and the prompts it was scoring; no --resume hint, which
    # cannot help until the reward is fixed.
    assert result.stderr.strip().splitlines() == [
        "align-decode: error: reward 'cli_flaky_reward:score' raised RuntimeError: reward server went away "
        f'(scoring prompt(s) 3, "d"); 2 finished prompt(s) are saved in {out}; --debug shows the traceback'
    ]
    assert [line["id"] for line in read_lines(out)] == ["a", "b"]
    resumed = invoke(*args, "--reward", "cli_flaky_reward:score", "--resume")  # the third call succeeds
    assert resumed.exit_code == 0, resumed.stderr
    assert [line["id"] for line in read_lines(out)] == [p["id"] for p in PROMPTS]


def test_debug_shows_the_exception_instead_of_one_line(models, prompts, tmp_path):
    result = cli_runner().invoke(cli, ["run", "--model", models["policy"], "--prompts", prompts,
                                      "--out", str(tmp_path / "o.jsonl"), "--method", "beam", "--debug"])
    assert isinstance(result.exception, ValueError) and "unknown method 'beam'" in str(result.exception)


# ------------------------------------------------------------------------------------- rewards
def test_reward_from_module_function_and_file(models, prompts, tmp_path, monkeypatch):
    (tmp_path / "cli_reward_module.py").write_text(
        "def words(prompts, completions):\n    return [float(len(c.split())) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward_file = tmp_path / "by_path.py"
    reward_file.write_text(
        "from align_decode.rewards import SequenceReward\n"
        "class PromptChars(SequenceReward):\n"
        "    def _score(self, prompts, completions):\n"
        "        return [float(len(p)) for p in prompts]\n"
    )
    out = tmp_path / "out.jsonl"
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--method", "sample",
                    "--n", 2, "--max-new-tokens", 6, "--reward", "cli_reward_module:words",
                    "--reward", f"{reward_file}:PromptChars", "--json-summary", "--quiet")
    assert result.exit_code == 0, result.stderr
    lines = read_lines(out)
    words, chars = "cli_reward_module:words", f"{reward_file}:PromptChars"
    for line in lines:
        assert line["rewards"][words] == len(line["completion"].split())
        assert line["rewards"][chars] == len(line["prompt"])
        assert [c["rewards"][words] for c in line["candidates"]] == [len(c["text"].split()) for c in line["candidates"]]
    summary = json.loads(result.stdout)
    assert summary["mean_reward"][words] == pytest.approx(sum(l["rewards"][words] for l in lines) / len(lines))
    assert summary["prompts"] == len(PROMPTS) and summary["generated_tokens"] == sum(l["tokens"]["generated"] for l in lines)
    assert result.stderr == ""  # --quiet


def test_default_reward_is_used_when_available_and_skipped_when_not(models, prompts, tmp_path, monkeypatch):
    def broken(arg, ctx):
        raise ImportError("no module named fancy_sentiment")

    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))
    registry.register_reward("test_default", "completion length")(
        lambda arg, ctx: CallableReward(lambda p, c: [float(len(x)) for x in c], batched=True))
    registry.register_reward("test_broken", "needs a missing package")(broken)
    monkeypatch.setattr(registry, "DEFAULT_REWARDS", ("test_broken", "test_default"))
    out = tmp_path / "out.jsonl"
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--method", "sample")
    assert result.exit_code == 0, result.stderr
    assert "default reward 'test_broken' is unavailable here: no module named fancy_sentiment" in result.stderr
    assert "mean reward: test_default" in result.stderr
    assert all(line["rewards"] == {"test_default": len(line["completion"])} for line in read_lines(out))
    explicit = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", tmp_path / "o2.jsonl",
                      "--reward", "test_broken")
    assert_one_line_error(explicit, "reward 'test_broken' is unavailable here")


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("suffix", ["toml", "yaml"])
def test_config_file_sets_options_and_flags_override(models, prompts, tmp_path, suffix):
    out = tmp_path / "out.jsonl"
    if suffix == "toml":
        text = f'method = "sample"\nmodel = "{models["policy"]}"\nprompts = "{prompts}"\nout = "{out}"\n' \
               'max-new-tokens = 3\ntemperature = 0\nreward = "none"\nn = 2\n'
    else:
        text = f"method: sample\nmodel: {models['policy']}\nprompts: {prompts}\nout: {out}\n" \
               "max_new_tokens: 3\ntemperature: 0\nreward: [none]\nn: 2\n"
    config = tmp_path / f"run.{suffix}"
    config.write_text(text)
    result = invoke("run", "--config", config, "--max-new-tokens", 4, "--quiet")
    assert result.exit_code == 0, result.stderr
    line = read_lines(out)[0]
    assert line["method"] == "sample" and line["generation"]["do_sample"] is False
    assert line["generation"]["max_new_tokens"] == 4 and line["generation"]["n"] == 2
    assert "rewards" not in line


def test_the_example_config_and_prompt_files_run(models, tmp_path):
    examples = Path(__file__).resolve().parents[2] / "examples"
    out = tmp_path / "out.jsonl"
    result = invoke("run", "--config", examples / "genarm.toml", "--model", models["policy"],
                    "--prompts", examples / "prompts.jsonl", "--out", out, "--max-new-tokens", 2, "--quiet")
    assert result.exit_code == 0, result.stderr
    lines = read_lines(out)
    given = read_lines(examples / "prompts.jsonl")
    assert 5 <= len(given) <= 10 and [line["id"] for line in lines] == [g["id"] for g in given]
    assert {"chat", "plain"} == {"chat" if "messages" in line else "plain" for line in lines}
    assert set(lines[0]["rewards"]) == {"sentiment", "non_toxicity"}
    assert lines[0]["hyperparameters"]["arm_prompt"] == "Reply in a warm, kind and positive tone."
    text = run_ok(models, examples / "prompts.txt", tmp_path / "text.jsonl", "--max-new-tokens", 2)
    assert [line["id"] for line in text] == [1, 2, 3]


def test_config_errors_name_the_file_and_key(models, prompts, tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("max_new_token = 3\n")
    assert_one_line_error(invoke("run", "--config", bad_key), "a.toml", "unknown option 'max-new-token'")
    bad_value = tmp_path / "b.yaml"
    bad_value.write_text("n: lots\n")
    assert_one_line_error(invoke("run", "--config", bad_value), "b.yaml", "n:")
    wrong_method = tmp_path / "c.toml"
    wrong_method.write_text(f'method = "sample"\nbeta = 2.0\nprompts = "{prompts}"\nout = "{tmp_path / "o.jsonl"}"\n')
    assert_one_line_error(invoke("run", "--config", wrong_method), "--beta (set in", "c.toml", "'sample'")


# ------------------------------------------------------------------------------------- bad input
def test_malformed_line_names_file_and_line_or_is_skipped(models, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [PROMPTS[0], '{"id": "x", "prompt": ', PROMPTS[2], '{"id": "y"}'])
    out = tmp_path / "out.jsonl"
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out)
    assert_one_line_error(result, f"{prompts}:2: not valid JSON")
    assert not out.exists() or out.read_text() == ""
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--skip-bad-lines",
                    "--max-new-tokens", 3, "--method", "sample", "--reward", "none")
    assert result.exit_code == 0, result.stderr
    assert f"skipping {prompts}:2: not valid JSON" in result.stderr and f"{prompts}:4: give exactly one" in result.stderr
    assert [line["id"] for line in read_lines(out)] == ["a", 3]


BAD_RUNS = {
    "duplicate id": (["--prompts", "{dup}"], ["dup.jsonl:3: duplicate id \"a\" (first on line 1)"]),
    "unknown method": (["--method", "beam"], ["unknown method 'beam'; available: ", "genarm", "sample"]),
    "option of another method": (["--method", "sample", "--arm", "{arm}"], ["--arm does not apply to method 'sample'"]),
    "missing model folder": (["--model", "{missing}"], ["model folder not found"]),
    "missing arm folder": (["--arm", "{missing}"], ["model folder not found"]),
    "tokenizer mismatch": (["--arm", "{other_vocab}"], ["does not share the policy's tokenizer"]),
    "weights for arms": (["--arm", "{arm}", "--weight", "1", "--weight", "2"], ["--weight has 2 value(s) for 1 ARM(s)"]),
    "beta and weights": (["--arm", "{arm}", "--weight", "1", "--beta", "2"], ["either --beta"]),
    "bad shard": (["--shard", "2/2"], ["--shard i/n needs"]),
    "shard format": (["--shard", "half"], ["--shard must look like i/n"]),
    "missing prompt file": (["--prompts", "{missing}"], ["prompt file not found"]),
    "chat without template": (["--no-chat-template"], ["prompts.jsonl:2: chat messages need a chat template"]),
    "unknown reward": (["--reward", "niceness"], ["unknown reward 'niceness'"]),
    "none and a reward": (["--reward", "none", "--reward", "x:y"], ["cannot be combined"]),
    "bad temperature": (["--temperature", "-1"], ["--temperature must be"]),
    "not a number": (["--n", "many"], ["'many' is not a valid integer"]),
    "unknown flag": (["--frobnicate"], ["No such option", "--frobnicate"]),
    "cuda on cpu": (["--device", "cuda"], ["no CUDA device"]),
    "reward argument": (["--reward", "length:tgt=3"], ["reward 'length' has no argument 'tgt'"]),
    "reward for qalign": (["--method", "qalign", "--reward", "none"], ["method 'qalign' needs a reward"]),
    "qalign answers": (["--method", "qalign", "--chain-answer", "best", "--n", "2", "--reward", "length:target=1"],
                       ["--chain-answer best gives one answer per prompt"]),
    "option of bon": (["--method", "best_of_n", "--steps", "3"], ["--steps does not apply to method 'best_of_n'"]),
    "greedy best-of-n": (["--method", "best_of_n", "--n", "4", "--temperature", "0", "--reward", "length:target=1"],
                         ["--temperature 0 does not work with best_of_n", "one greedy answer repeated"]),
    "greedy qalign": (["--method", "qalign", "--temperature", "0", "--reward", "length:target=1"],
                      ["--temperature 0 does not work with qalign", "the chain never moves"]),
    "greedy blockwise": (["--method", "cd_blockwise", "--temperature", "0", "--reward", "length:target=1"],
                         ["--temperature 0 does not work with cd_blockwise", "the same greedy block"]),
    "method option range": (["--method", "qalign", "--beta", "-1", "--reward", "length:target=1"],
                            ["--beta must be a finite number > 0, got -1.0"]),
    "method option rule": (["--method", "qalign", "--steps", "2", "--burn-in", "3", "--reward", "length:target=1"],
                           ["--burn-in 3 leaves no state of the 2 steps (--steps)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_runs_are_one_line_errors_and_write_nothing(models, prompts, tmp_path, case):
    args, fragments = BAD_RUNS[case]
    dup = write_jsonl(tmp_path / "dup.jsonl", [PROMPTS[0], PROMPTS[2], {"id": "a", "prompt": "w3"}])
    names = {**models, "dup": dup, "missing": tmp_path / "nowhere"}
    out = tmp_path / "new folder" / "out.jsonl"
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", out,
                    *[str(a).format(**names) for a in args])
    if case == "cuda on cpu" and "no CUDA device" not in result.stderr:
        pytest.skip("this machine has a CUDA device")
    assert_one_line_error(result, *fragments)
    assert not out.parent.exists()  # neither the file nor its folder: a failed run leaves nothing behind


def test_greedy_is_fine_where_it_means_something(models, prompts, tmp_path):
    """--temperature 0 is refused only where it defeats the method: one blockwise candidate is plain greedy."""
    for i, extra in enumerate([("--method", "cd_blockwise", "--num-candidates", 1),
                               ("--method", "best_of_n", "--n", 1, "--reward", "length:target=2"),
                               ("--method", "qalign", "--steps", 0, "--reward", "length:target=2")]):
        lines = run_ok(models, prompts, tmp_path / f"o{i}.jsonl", *extra, "--temperature", 0)
        assert len(lines) == len(PROMPTS)


def test_a_reward_failing_before_the_first_result_leaves_no_output(models, prompts, tmp_path, monkeypatch):
    (tmp_path / "cli_broken_reward.py").write_text(
        "def score(prompts, completions):\n    raise KeyError('label')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "results" / "out.jsonl"
    args = ("run", "--model", models["policy"], "--prompts", prompts, "--out", out, "--method", "sample",
            "--max-new-tokens", 3, "--reward", "cli_broken_reward:score")
    result = invoke(*args, "--quiet")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "align-decode: error: reward 'cli_broken_reward:score' raised KeyError: 'label' "
        f'(scoring prompt(s) "a", "b", 3, "d", "e"); 0 finished prompt(s) are saved in {out}; '
        "--debug shows the traceback"
    ]
    assert not out.parent.exists()
    debug = cli_runner().invoke(cli, [str(a) for a in (*args, "--debug")])
    assert isinstance(debug.exception, RunFailure) and isinstance(debug.exception.__cause__, KeyError)


def test_missing_prompts_and_out_options(models, prompts):
    assert_one_line_error(invoke("run", "--out", "x.jsonl"), "no prompt file")
    assert_one_line_error(invoke("run", "--prompts", prompts), "no output file")


# ------------------------------------------------------------------------------------- other commands
def test_models_methods_and_rewards_commands():
    models = invoke("models")
    assert models.exit_code == 0 and "SmolLM2-135M-Instruct (default)" in models.stdout
    assert "add a model: pass --model" in models.stdout
    listed = [json.loads(line) for line in invoke("models", "--json").stdout.splitlines()]
    assert listed[0]["default"] is True and listed[0]["status"] in ("ready", "convertible", "missing")
    methods = invoke("methods").stdout
    assert "genarm (default)" in methods and "--arm-prompt" in methods and "sample:" in methods
    rewards = invoke("rewards").stdout
    assert "module:function" in rewards and "none" in rewards


# ------------------------------------------------------------------------------------- units
def test_prompt_reader_ids_meta_and_duplicates(tmp_path):
    rows = [{"prompt": "no id"}, "not json", {"id": "k", "prompt": "x", "lang": "en"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    warned = []
    records = read_prompts(path, skip_bad_lines=True, warn=warned.append)
    assert [(r.id, r.line, r.index, r.meta) for r in records] == [(1, 1, 0, {}), ("k", 3, 2, {"lang": "en"})]
    assert len(warned) == 1 and f"{path}:2: not valid JSON" in warned[0]
    # The line-number id of line 1 and an explicit "1" are the same prompt for --resume: a duplicate.
    path = write_jsonl(tmp_path / "p.jsonl", rows + [{"id": "1", "prompt": "y"}])
    with pytest.raises(PromptFileError, match=r'p.jsonl:4: duplicate id "1" \(first on line 1\)'):
        read_prompts(path, skip_bad_lines=True)


def test_prompt_reader_shards_by_position_counting_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "x"}, "bad", {"id": "c", "prompt": "x"}, {"id": "d", "prompt": "x"},
    ])
    records = read_prompts(path, skip_bad_lines=True)
    assert [r.index for r in records] == [0, 2, 3]
    assert [r.id for r in shard_records(records, 0, 2)] == ["a", "c"]
    assert [r.id for r in shard_records(records, 1, 2)] == ["d"]
    assert parse_shard(None) == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "a"}', "exactly one of"),
    ('{"id": "a", "prompt": "x", "messages": []}', "exactly one of"),
    ('{"id": true, "prompt": "x"}', "id must be a string or an integer"),
    ('{"id": 1.5, "prompt": "x"}', "id must be a string or an integer"),
    ('{"id": "a", "prompt": "  "}', "non-empty string"),
    ('{"id": "a", "messages": [{"role": "user"}]}', "messages[0] must be"),
    ('{"id": "a", "messages": []}', "non-empty list"),
])
def test_prompt_reader_rejects_malformed_records(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"id": "ok", "prompt": "x"}', line])
    with pytest.raises(PromptFileError) as err:
        read_prompts(path)
    assert str(err.value).startswith(f"{path}:2: ") and problem in str(err.value)


def test_results_file_appends_whole_lines_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with ResultsFile(path) as out:
        out.append({"id": "a", "x": float("nan"), "t": (1, 2)})
        out.append({"id": 2, "text": "é\nnewline inside"})
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert read_lines(path) == [{"id": "a", "x": None, "t": [1, 2]}, {"id": 2, "text": "é\nnewline inside"}]
    with pytest.raises(ValueError, match="already exists and is not empty"):
        ResultsFile(path).open()
    resumed = ResultsFile(path, resume=True).open()
    assert resumed.done == {"a", "2"} and resumed.first["id"] == "a"
    resumed.close()
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2: not a valid result line"):
        ResultsFile(path, resume=True).open()


def test_console_bar_only_on_a_terminal_and_warnings_even_when_quiet():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown = Terminal()
    console = Console(stream=shown)
    console.progress(2, 4, 30)
    console.note("hello")
    assert "[############------------] 2/4 prompts | 30 tokens" in shown.getvalue()
    assert shown.getvalue().endswith("\r\x1b[Kalign-decode: hello\n")  # the bar is cleared before a note
    console.inner("step", 5, 5)
    assert shown.getvalue().endswith("2/4 prompts | 30 tokens | " + shown.getvalue().rsplit("tokens | ", 1)[1])
    assert "| step 5/5\x1b[K" in shown.getvalue()
    assert "\r" not in Terminal().getvalue()
    quiet = Terminal()
    console = Console(quiet=True, stream=quiet)
    console.progress(1, 2, 3)
    console.note("hidden")
    console.warn("shown")
    assert quiet.getvalue() == "align-decode: warning: shown\n"


def test_without_a_terminal_progress_is_a_plain_line_every_few_seconds():
    piped = io.StringIO()
    console = Console(stream=piped, log_interval=3600)
    console.progress(0, 4, 0)  # the start is always shown
    console.inner("candidates", 8, 16)  # within the interval: nothing more
    console.inner("step", 3, 5)
    lines = piped.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("align-decode: progress: 0/4 prompts | 0 tokens")
    assert "\r" not in piped.getvalue() and "\x1b" not in piped.getvalue()  # no bar codes in a log file
    chatty = io.StringIO()
    console = Console(stream=chatty, log_interval=0)
    console.progress(1, 4, 10)
    console.inner("chain step", 2, 16)
    console.inner("step", 3, 5)
    assert chatty.getvalue().splitlines()[-1].endswith("| chain step 2/16 | step 3/5")
    console.inner("chain step", 3, 16)  # a new outer unit restarts the steps under it
    assert chatty.getvalue().splitlines()[-1].endswith("| chain step 3/16")
    quiet = io.StringIO()
    Console(stream=quiet, quiet=True, log_interval=0).progress(1, 4, 10)
    assert quiet.getvalue() == ""


def test_method_registry_checks_applicability():
    sample = get_method("sample")
    check_applicable(sample, {"seed": "the command line", "temperature": "cfg.toml"})
    with pytest.raises(ValueError, match=r"--weight does not apply to method 'sample' \(its options: none\)"):
        check_applicable(sample, {"weight": "the command line"})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_reward_registry_rejects_bad_registrations_and_parses_args():
    with pytest.raises(ValueError, match="reward name"):
        registry.register_reward("a:b", "x")
    assert registry.split_args("x, y,k=v ,") == (["x", "y"], {"k": "v"})
    assert registry.split_args(None) == ([], {})
    assert registry.build_rewards(["none"]) == {}
    with pytest.raises(ValueError, match="given twice"):
        registry.build_rewards(["m:f", "m:f"])


def test_progress_inside_a_batch_and_every_sampled_token_in_the_summary(models, prompts, tmp_path):
    """qalign reports its chain steps while a batch runs, and the summary counts every token drawn
    (proposals included), not only the final answers."""
    from align_decode.commandline.run import RunOptions, run

    stream = io.StringIO()
    config = RunOptions(prompts=prompts, out=str(tmp_path / "q.jsonl"), method="qalign", model=models["policy"],
                       reward=("length:target=2",), max_new_tokens=4, method_values={"steps": 3},
                       given={"steps": "the command line"})
    summary = run(config, Console(stream=stream, log_interval=0))
    assert "| chain step 3/3" in stream.getvalue() and "| chain step 1/3 | step 1/" in stream.getvalue()
    answers = sum(line["tokens"]["completion"] for line in read_lines(tmp_path / "q.jsonl"))
    assert summary.generated_tokens > answers
    assert "tokens sampled (answers and every candidate, proposal or rollout)" in summary.text()
