"""ClassifierReward on a tiny seeded LlamaForSequenceClassification and the word-level test tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from align_decode.rewards import ClassifierReward
from tiny import BOS, EOS, PAD, tiny_tokenizer

PROMPTS = ["w1 w2", "w3", "w4 w5 w6 w7 w8 w9", "w10", "w11 w12 w13", "w2", "w14 w15"]
COMPLETIONS = ["w3", "w9 w10 w11 w12", "w1", "w2 w2", "w16", "w17 w18 w19 w20 w21 w22 w23", "w24 w25"]


def tiny_rm(num_labels: int = 1, seed: int = 0, **overrides) -> LlamaForSequenceClassification:
    kwargs = dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.3,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, num_labels=num_labels,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**kwargs)).eval()


def chat_ids(tok, prompt: str, completion: str) -> list[int]:
    """The tiny chat template rendered by hand: <|user|> x <|end|> <|assistant|> y <|end|>."""
    tokens = ["<|user|>", *prompt.split(), "<|end|>", "<|assistant|>", *completion.split(), "<|end|>"]
    return tok.convert_tokens_to_ids(tokens)


def direct(model, ids: list[int]) -> torch.Tensor:
    """The model's logits for one unpadded row."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_rm()


def test_single_pair_matches_hand_rendered_forward(model, tok):
    rm = ClassifierReward(model, tok)
    assert rm.chat_template is not None  # picked up from the tokenizer
    assert rm.format("w1 w2", "w3") == "<|user|> w1 w2 <|end|> <|assistant|> w3 <|end|> "
    assert rm.encode("w1 w2", "w3") == chat_ids(tok, "w1 w2", "w3")
    got = rm.score(["w1 w2"], ["w3"])
    assert got.shape == (1,) and got.dtype == torch.float32
    assert got.item() == pytest.approx(direct(model, chat_ids(tok, "w1 w2", "w3"))[0].item(), abs=1e-6)


def test_batched_padded_equals_one_by_one(model, tok):
    rm = ClassifierReward(model, tok, batch_size=3)
    batched = rm.score(PROMPTS, COMPLETIONS)
    single = torch.stack([rm.score([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)])
    independent = torch.stack([direct(model, chat_ids(tok, p, c))[0] for p, c in zip(PROMPTS, COMPLETIONS)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched, independent, atol=1e-5)
    assert batched.std() > 0.1  # the scores really differ, so a mix-up of rows would show
    whole = ClassifierReward(model, tok, batch_size=len(PROMPTS)).score(PROMPTS, COMPLETIONS)
    assert torch.allclose(whole, independent, atol=1e-5)
    assert rm.tokens_scored == 2 * sum(len(chat_ids(tok, p, c)) for p, c in zip(PROMPTS, COMPLETIONS))


def test_plain_text_with_separator(model, tok):
    rm = ClassifierReward(model, tok, chat_template=False, separator=" ", batch_size=2)
    assert rm.format("w1 w2", "w3") == "w1 w2 w3"
    expected = torch.stack(
        [direct(model, tok.convert_tokens_to_ids(f"{p} {c}".split()))[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    )
    assert torch.allclose(rm.score(PROMPTS, COMPLETIONS), expected, atol=1e-5)


def test_custom_template_string(model, tok):
    template = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
    rm = ClassifierReward(model, tok, chat_template=template)
    ids = tok.convert_tokens_to_ids(["w1", "</s>", "w3", "w4", "</s>"])
    assert rm.encode("w1", "w3 w4") == ids
    assert rm.score(["w1"], ["w3 w4"]).item() == pytest.approx(direct(model, ids)[0].item(), abs=1e-6)


def test_truncation_cuts_prompt_from_the_left(model, tok):
    rm = ClassifierReward(model, tok, max_length=6)
    # 4 template tokens + 1 completion token leave room for the last prompt token only
    ids = rm.encode("w1 w2 w3 w4", "w5")
    assert tok.convert_ids_to_tokens(ids) == ["<|user|>", "w4", "<|end|>", "<|assistant|>", "w5", "<|end|>"]
    wider = ClassifierReward(model, tok, max_length=8)
    assert tok.convert_ids_to_tokens(wider.encode("w1 w2 w3 w4", "w5"))[:4] == ["<|user|>", "w2", "w3", "w4"]
    assert wider.encode("w1", "w5") == chat_ids(tok, "w1", "w5")  # short pairs are untouched
    got = rm.score(["w1 w2 w3 w4"], ["w5"]).item()
    assert got == pytest.approx(direct(model, chat_ids(tok, "w4", "w5"))[0].item(), abs=1e-6)


def test_truncation_of_a_completion_that_alone_is_too_long(model, tok):
    long = "w5 w6 w7 w8 w9"
    left = ClassifierReward(model, tok, max_length=6)
    right = ClassifierReward(model, tok, max_length=6, truncation_side="right")
    # the prompt is dropped entirely first: <|user|> <|end|> <|assistant|> w5..w9 <|end|> is 9 tokens
    assert tok.convert_ids_to_tokens(left.encode("w1", long)) == ["w5", "w6", "w7", "w8", "w9", "<|end|>"]
    head = ["<|user|>", "<|end|>", "<|assistant|>", "w5", "w6", "w7"]
    assert tok.convert_ids_to_tokens(right.encode("w1", long)) == head


def test_truncated_batch_equals_one_by_one(model, tok):
    rm = ClassifierReward(model, tok, max_length=7, batch_size=4)
    batched = rm.score(PROMPTS, COMPLETIONS)
    expected = torch.stack([direct(model, rm.encode(p, c))[0] for p, c in zip(PROMPTS, COMPLETIONS)])
    assert all(len(rm.encode(p, c)) <= 7 for p, c in zip(PROMPTS, COMPLETIONS))
    assert torch.allclose(batched, expected, atol=1e-5)


def test_pads_with_the_model_config_pad_id(tok):
    # The config's pad id (63, the token 'w57') differs from the tokenizer's (0). transformers pools
    # at the last token != config pad id, so padding with the tokenizer's id would read a pad position.
    model = tiny_rm(pad_token_id=63, seed=1)
    rm = ClassifierReward(model, tok, batch_size=len(PROMPTS))
    assert rm.pad_token_id == 63
    expected = torch.stack([direct(model, chat_ids(tok, p, c))[0] for p, c in zip(PROMPTS, COMPLETIONS)])
    assert torch.allclose(rm.score(PROMPTS, COMPLETIONS), expected, atol=1e-5)


def test_missing_config_pad_id_is_set_from_tokenizer(tok):
    model = tiny_rm(pad_token_id=None, seed=2)
    # with no pad id, transformers reads the last position of an unpadded row
    expected = torch.stack([direct(model, chat_ids(tok, p, c))[0] for p, c in zip(PROMPTS, COMPLETIONS)])
    with pytest.warns(UserWarning, match="no pad_token_id; using 0"):
        rm = ClassifierReward(model, tok, batch_size=4)
    assert model.config.pad_token_id == 0
    assert torch.allclose(rm.score(PROMPTS, COMPLETIONS), expected, atol=1e-5)


def test_multi_label_heads(tok):
    names = {"bad": 0, "meh": 1, "good": 2}
    model = tiny_rm(num_labels=3, seed=3, id2label={i: n for n, i in names.items()}, label2id=names)
    logits = torch.stack([direct(model, chat_ids(tok, p, c)) for p, c in zip(PROMPTS, COMPLETIONS)])
    by_index = ClassifierReward(model, tok, label=2, batch_size=3).score(PROMPTS, COMPLETIONS)
    by_name = ClassifierReward(model, tok, label="good", batch_size=3).score(PROMPTS, COMPLETIONS)
    prob = ClassifierReward(model, tok, label="meh", reduction="prob").score(PROMPTS, COMPLETIONS)
    logp = ClassifierReward(model, tok, label=0, reduction="log_prob").score(PROMPTS, COMPLETIONS)
    assert torch.allclose(by_index, logits[:, 2], atol=1e-5)
    assert torch.allclose(by_name, logits[:, 2], atol=1e-5)
    e = logits.exp()
    assert torch.allclose(prob, e[:, 1] / e.sum(1), atol=1e-5)
    assert torch.allclose(logp, (e[:, 0] / e.sum(1)).log(), atol=1e-5)
    with pytest.raises(ValueError, match=r"3 labels: say which is the reward with label="):
        ClassifierReward(model, tok)
    with pytest.raises(ValueError, match="label 'great' is not in the model's label2id"):
        ClassifierReward(model, tok, label="great")
    with pytest.raises(ValueError, match=r"label must be an index in \[0, 2\]"):
        ClassifierReward(model, tok, label=3)


def test_single_label_prob_and_log_prob(model, tok):
    logit = ClassifierReward(model, tok).score(PROMPTS, COMPLETIONS)
    prob = ClassifierReward(model, tok, reduction="prob").score(PROMPTS, COMPLETIONS)
    logp = ClassifierReward(model, tok, reduction="log_prob").score(PROMPTS, COMPLETIONS)
    assert torch.allclose(prob, 1 / (1 + (-logit).exp()), atol=1e-6)
    assert torch.allclose(logp, -torch.log1p((-logit).exp()), atol=1e-5)


def test_load_from_local_folder_and_dtype(model, tok, tmp_path):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from_obj = ClassifierReward(model, tok).score(PROMPTS, COMPLETIONS)
    from_dir = ClassifierReward(str(tmp_path), batch_size=2).score(PROMPTS, COMPLETIONS)
    assert torch.allclose(from_obj, from_dir, atol=1e-5)
    as_f64 = ClassifierReward(tmp_path, dtype="float64")
    assert next(as_f64.model.parameters()).dtype == torch.float64
    assert torch.allclose(as_f64.score(PROMPTS, COMPLETIONS), from_obj, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="only from a local folder.*'org/some-rm' is not a directory"):
        ClassifierReward("org/some-rm")


def test_default_max_length_from_config(model, tok):
    assert ClassifierReward(model, tok).max_length == 256  # the tokenizer has no limit; the model has 256


def test_constructor_validation(model, tok):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        ClassifierReward(model, tok, batch_size=0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1 or None, got 0"):
        ClassifierReward(model, tok, max_length=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ClassifierReward(model, tok, reduction="softmax")
    with pytest.raises(ValueError, match="truncation_side must be one of left, right, got 'middle'"):
        ClassifierReward(model, tok, truncation_side="middle")
    with pytest.raises(ValueError, match="dtype must be a torch.dtype"):
        ClassifierReward(model, tok, dtype="fp8")
    with pytest.raises(ValueError, match="tokenizer is required"):
        ClassifierReward(model)
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template=True but the tokenizer has no chat template"):
        ClassifierReward(model, bare, chat_template=True)
    assert ClassifierReward(model, bare).chat_template is None  # auto: plain text
    with pytest.raises(ValueError, match="encodes to no tokens"):
        ClassifierReward(model, bare).score([""], [""])


def test_device_argument_moves_model_and_returns_cpu_float32(tok):
    rm = ClassifierReward(tiny_rm(), tok, device="cpu", dtype=torch.float32)
    out = rm.score(PROMPTS[:2], COMPLETIONS[:2])
    assert out.device.type == "cpu" and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tok):
    cpu = ClassifierReward(tiny_rm(), tok).score(PROMPTS, COMPLETIONS)
    rm = ClassifierReward(tiny_rm(), tok, device="cuda", batch_size=3)
    assert next(rm.model.parameters()).device.type == "cuda"
    out = rm.score(PROMPTS, COMPLETIONS)
    assert out.device.type == "cpu"
    assert torch.allclose(out, cpu, atol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"batch_size": "8"}, "batch_size must be an integer >= 1, got '8'"),
    ({"max_length": True}, "max_length must be an integer >= 1 or None, got True"),
    ({"max_length": "64"}, "max_length must be an integer >= 1 or None, got '64'"),
])
def test_constructor_refuses_bools_and_strings(model, tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierReward(model, tok, **kwargs)
