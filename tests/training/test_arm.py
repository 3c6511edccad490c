"""ARM training: the GenARM loss, LoRA merging, and a short run that learns the preference."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from align_decode import ARM, AlignedModel, GenARM
from align_decode.training.arm import (
    ARMTrainingConfig,
    arm_loss,
    encode_pair,
    encode_prompt,
    load_preferences,
    response_logprobs,
    save_arm,
    train_arm,
    truncate_layers,
)
from align_decode.training.lora import LoRALinear, add_lora, merge_lora
from tiny import tiny_llama, tiny_tokenizer


def test_loss_matches_the_formula_and_flips_with_the_pair():
    c, r = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    beta, gamma, eps = 0.5, 0.2, 0.1
    delta = c - r - gamma / beta
    expect = -(1 - eps) * torch.log(torch.sigmoid(beta * delta)) - eps * torch.log(torch.sigmoid(-beta * delta))
    torch.testing.assert_close(arm_loss(c, r, beta, gamma, eps), expect)
    # Swapping chosen and rejected flips the sign of the margin (gamma = 0, no smoothing).
    torch.testing.assert_close(arm_loss(c, r, beta), -torch.nn.functional.logsigmoid(beta * (c - r)))
    torch.testing.assert_close(arm_loss(r, c, beta), -torch.nn.functional.logsigmoid(-beta * (c - r)))
    torch.testing.assert_close(arm_loss(c, r, 2.0, loss_type="hinge"), torch.relu(1 - 2.0 * (c - r)))


def test_identical_pair_gives_no_gradient():
    tok = tiny_tokenizer(64)
    model = tiny_llama(64, seed=71)
    cfg = ARMTrainingConfig()
    pair = encode_pair(tok, [7, 8], "w3 w4 w5", cfg)
    c = response_logprobs(model, [pair], tok.pad_token_id)
    r = response_logprobs(model, [pair], tok.pad_token_id)
    arm_loss(c, r, 0.1).sum().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_response_logprobs_sum_only_response_tokens():
    tok = tiny_tokenizer(64)
    model = tiny_llama(64, seed=72)
    ids, start = [7, 8, 9, 10, 11], 2
    got = response_logprobs(model, [(ids, start), ([7, 8], 1)], tok.pad_token_id)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    torch.testing.assert_close(got[0], sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_lora_starts_as_the_base_and_merges_exactly():
    model = tiny_llama(64, seed=73)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = add_lora(model, r=4, alpha=8.0)
    assert names and all(isinstance(m, LoRALinear) for n, m in model.named_modules() if n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0 at the start
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
        adapted = model(input_ids=ids).logits
    assert merge_lora(model) == len(names)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)


def _records():
    # The chosen answer always says w10, the rejected one w20: an ARM must learn to prefer w10.
    prompts = [f"w{i} w{i + 1}" for i in range(30)]
    return [{"prompt": p, "chosen": "w10", "rejected": "w20"} for p in prompts]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_short_training_learns_the_preference_and_saves_a_loadable_arm(tmp_path, lora_r):
    tok = tiny_tokenizer(64)
    model = tiny_llama(64, seed=74)
    cfg = ARMTrainingConfig(beta_r=0.5, lr=3e-3, epochs=4, batch_size=4, lora_r=lora_r, eval_fraction=0.2,
                            chat_template=False)
    metrics = train_arm(model, tok, _records(), cfg)
    assert metrics["train_loss_last"] < 0.1 < metrics["train_loss_first"]
    # Held-out prompts the ARM never saw: the margin grows and most pairs are ranked right.
    assert metrics["eval_after"]["margin"] > metrics["eval_before"]["margin"] + 1.0
    assert metrics["eval_after"]["accuracy"] >= 0.8 > metrics["eval_before"]["accuracy"]
    out = save_arm(model, tok, tmp_path / "arm", metrics)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "arm_training.json").read_text())["train_pairs"] == 24
    # The saved ARM prefers w10 to w20 as the first response token, and steers GenARM there.
    prompt = encode_prompt(tok, "w40 w41", chat_template=False)
    with torch.no_grad():
        lp = torch.log_softmax(loaded(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    assert lp[tok.convert_tokens_to_ids("w10")] > lp[tok.convert_tokens_to_ids("w20")]
    policy = tiny_llama(64, seed=75)
    w10, w20 = tok.convert_tokens_to_ids("w10"), tok.convert_tokens_to_ids("w20")
    first = []
    for beta in (1e9, 0.5):
        out = AlignedModel(policy, tokenizer=tok, strategy=GenARM(ARM(loaded, tok), beta=beta)).generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=1, do_sample=True, top_k=0, seed=0,
            return_dict_in_generate=True, output_scores=True)
        first.append(out.scores[0][0])
    # Guidance moves probability from w20 to w10.
    assert first[1][w10] - first[1][w20] > first[0][w10] - first[0][w20] + 1.0


def test_truncated_arm_keeps_the_first_layers():
    model = truncate_layers(tiny_llama(64, layers=3, seed=76), 1)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    model(input_ids=torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match=r"layers must be an integer in \[1, 1\], got 5"):
        truncate_layers(model, 5)


def test_bad_files_and_settings(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing field\(s\) chosen, rejected"):
        load_preferences(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        load_preferences(bad)
    for kwargs, msg in (({"beta_r": 0}, "beta_r"), ({"loss_type": "ipo"}, "loss_type"), ({"lora_r": -1}, "lora_r"),
                        ({"max_length": 10, "max_prompt_length": 20}, "max_prompt_length")):
        with pytest.raises(ValueError, match=msg):
            ARMTrainingConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta_r": True}, "beta_r must be a finite number > 0, got True"),
    ({"beta_r": "0.1"}, "beta_r must be a finite number > 0, got '0.1'"),
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"epochs": True}, "epochs must be an integer >= 1, got True"),
    ({"batch_size": "4"}, "batch_size must be an integer >= 1, got '4'"),
    ({"grad_accum": 1.5}, "grad_accum must be an integer >= 1, got 1.5"),
    ({"lora_r": True}, "lora_r must be an integer >= 0, got True"),
    ({"label_smoothing": 0.7}, r"label_smoothing must be a number in \[0, 0.5\), got 0.7"),
    ({"eval_fraction": float("nan")}, r"eval_fraction must be a number in \[0, 1\), got nan"),
    ({"eval_fraction": "0.1"}, r"eval_fraction must be a number in \[0, 1\), got '0.1'"),
])
def test_config_refuses_bools_strings_and_non_finite_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ARMTrainingConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": True}, "LoRA rank r must be an integer >= 1, got True"),
    ({"r": "8"}, "LoRA rank r must be an integer >= 1, got '8'"),
    ({"alpha": True}, "LoRA alpha must be a finite number > 0, got True"),
    ({"alpha": "16"}, "LoRA alpha must be a finite number > 0, got '16'"),
    ({"dropout": "0.1"}, r"LoRA dropout must be a number in \[0, 1\), got '0.1'"),
])
def test_lora_refuses_bools_and_strings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(torch.nn.Linear(4, 4), **kwargs)


@pytest.mark.parametrize("layers", [True, "1", 1.0])
def test_truncate_layers_refuses_bools_strings_and_floats(layers):
    with pytest.raises(ValueError, match=r"layers must be an integer in \[1, 3\], got"):
        truncate_layers(tiny_llama(64, layers=3, seed=76), layers)
