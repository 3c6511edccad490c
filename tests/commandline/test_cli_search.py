"""The command line's step-level searches (beam_search, dvts, particle_filter) and pruned_best_of_n on tiny
saved models: every scorer source (--prm, --value-model, --reward), options reaching the strategies, the
layout of candidates, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForTokenClassification

from align_decode.training.value import save_value_model
from cli_support import invoke, save_model, write_jsonl
from cli_support import run_ok as cli_run_ok
from test_cli_controlled import one_line_error
from tiny import tiny_llama, tiny_tokenizer

PROMPTS = [{"id": "a", "prompt": "w1 w2 w3"}, {"id": "b", "prompt": "w4 w5"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_models")
    save_model(root / "policy", seed=0)
    save_value_model(tiny_llama(seed=5), root / "value", "q", tiny_tokenizer())
    torch.manual_seed(0)
    prm = LlamaForTokenClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                  pad_token_id=0, num_labels=2))
    prm.save_pretrained(root / "prm")
    tiny_tokenizer().save_pretrained(root / "prm")
    return {name: str(root / name) for name in ("policy", "value", "prm")}


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def run_ok(models, prompts, out, *extra):
    return cli_run_ok(models["policy"], prompts, out, "--temperature", 1.5, *extra, max_new_tokens=8)


@pytest.mark.parametrize("method, extra", [
    ("beam_search", ["--beam-width", 2, "--prm", "prm", "--prm-marker", r" w9"]),
    ("dvts", ["--beam-width", 2, "--value-model", "value"]),
    ("particle_filter", ["--reward", "length:target=3", "--weight-temperature", 0.5, "--gibbs-iterations", 2]),
])
def test_step_searches_with_each_scorer(models, prompts, tmp_path, method, extra):
    extra = [models.get(a, a) if isinstance(a, str) else a for a in extra]
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", method, "--n", 4, "--step-tokens", 3,
                   "--step-delimiter", "none", *extra)
    for line in lines:
        texts = [c["text"] for c in line["candidates"]]
        assert line["completion"] == texts[line["chosen"]]
        # DVTS: one answer per subtree; beam search: every beam that completed (at least the n of the last round)
        if method == "beam_search":
            assert len(texts) >= 4
        else:
            assert len(texts) == {"dvts": 2, "particle_filter": 4}[method]
        h = line["hyperparameters"]
        assert h["n"] == 4 and h["step_tokens"] == 3 and h["step_delimiter"] is None
    if method == "particle_filter":
        assert h["temperature"] == 0.5 and h["iterations"] == 2 and h["scorer"].startswith("prefix:length")


def test_pruned_best_of_n_answers_with_a_surviving_candidate(models, prompts, tmp_path):
    lines = run_ok(models, prompts, tmp_path / "out.jsonl", "--method", "pruned_best_of_n", "--n", 8,
                   "--prune-at", 2, "--prune-at", 4, "--keep-fraction", 0.5, "--reward", "length:target=3")
    for line in lines:
        assert len(line["candidates"]) == 8
        assert line["hyperparameters"]["prune_at"] == [2, 4]
        chosen = line["candidates"][line["chosen"]]
        assert line["completion"] == chosen["text"]
        assert chosen["tokens"] == 8 or chosen["finish_reason"] == "stop"  # survivors run to the end


@pytest.mark.parametrize("args, fragment", [
    (["--method", "dvts", "--n", 6, "--beam-width", 4, "--reward", "length:target=3"], "n must be a multiple of it"),
    (["--method", "beam_search", "--n", 2, "--beam-width", 3, "--reward", "length:target=3"], "--beam-width 3 is more than"),
    (["--method", "beam_search", "--n", 4, "--reward", "none"], "needs a scorer of partial responses"),
    (["--method", "beam_search", "--n", 4, "--prm-marker", "x", "--reward", "length:target=3"], "--prm-marker goes with --prm"),
    (["--method", "particle_filter", "--n", 2, "--resampling", "residual", "--reward", "length:target=3"], "residual"),
    (["--method", "pruned_best_of_n", "--n", 4, "--keep-fraction", 0, "--reward", "length:target=3"], "--keep-fraction must"),
    (["--method", "particle_filter", "--n", 4, "--temperature", 0, "--reward", "length:target=3"], "needs sampled steps"),
    (["--method", "particle_filter", "--n", 4, "--step-tokens", 0, "--reward", "length:target=3"], "--step-tokens must"),
    (["--method", "best_of_n", "--n", 4, "--beam-width", 2, "--reward", "length:target=3"], "--beam-width does not apply"),
])
def test_bad_options_are_one_line_errors(models, prompts, tmp_path, args, fragment):
    result = invoke("run", "--model", models["policy"], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                    "--quiet", *args)
    if fragment == "residual":
        assert result.exit_code == 2 and "residual" in result.stderr
        return
    one_line_error(result, fragment)
