"""CD-FUDGE: the regression target, its fixed point V*(prefix) = E[r | prefix] by enumeration, and a
trained value model saved, loaded back and decoding."""

import math

import pytest
import torch
from transformers import LlamaConfig

from align_decode import AlignedModel, QValueModel, ScalarValueModel, TokenwiseCD
from align_decode.rewards import CallableReward
from align_decode.training.value import (
    Rollouts,
    fudge_loss,
    group_rollouts,
    load_value_model,
    monte_carlo_values,
    new_value_model,
    prefix_values,
    sample_rollouts,
    train_cd_fudge,
    train_value_model,
)
from enumerate_law import TableReward, next_token_probs, response_law
from tiny import EOS, tiny_tokenizer
from tiny import tiny_llama as _tiny_llama
from tiny import tiny_llama64 as tiny_llama

VOCAB, CAP, PROMPT, SAMPLES = 5, 2, [3, 4], 4000


@pytest.fixture(scope="module")
def toy():
    policy = tiny_llama(VOCAB, seed=41, init=0.5)
    law = response_law(policy, PROMPT, CAP, EOS)
    table = {y: float((3 * sum(y) + len(y)) % 4) for y in law}
    rollouts = sample_rollouts(policy, None, [PROMPT], TableReward(table), samples_per_prompt=SAMPLES,
                               max_new_tokens=CAP, max_rows=SAMPLES)
    return policy, table, rollouts


def exact_value(policy, table, prefix):
    """(V*(prefix), Var[r | prefix]) by enumeration: r itself once the response is complete, else the
    policy's expectation over its completions."""
    if prefix[-1] == EOS or len(prefix) == CAP:
        return table[tuple(prefix)], 0.0
    p = next_token_probs(policy, PROMPT + list(prefix))
    parts = [(float(p[z]),) + exact_value(policy, table, list(prefix) + [z]) for z in range(VOCAB)]
    mean = sum(q * v for q, v, _ in parts)
    second = sum(q * (var + v * v) for q, v, var in parts)
    return mean, second - mean * mean


def _table_values(theta, keys, rollouts):
    """A model free at every prefix: values[i, t] = theta[prefix of response i up to t]."""
    index = {k: j for j, k in enumerate(keys)}
    width = max(len(r) for r in rollouts.responses)
    values = torch.zeros(len(rollouts), width, dtype=torch.float64)
    mask = torch.zeros(len(rollouts), width, dtype=torch.bool)
    rows, cols, slots = [], [], []
    for i, (p, r) in enumerate(zip(rollouts.prompt_ids, rollouts.responses)):
        for t in range(len(r)):
            rows.append(i), cols.append(t), slots.append(index[(tuple(p), tuple(r[: t + 1]))])
    values = values.index_put((torch.tensor(rows), torch.tensor(cols)), theta[torch.tensor(slots)])
    mask[rows, cols] = True
    return values, mask


def test_the_loss_is_minimised_at_the_monte_carlo_means(toy):
    _, _, rollouts = toy
    mc = monte_carlo_values(rollouts)
    keys = list(mc)
    means = torch.tensor([mc[k][0] for k in keys], dtype=torch.float64)
    theta = means.clone().requires_grad_(True)
    values, mask = _table_values(theta, keys, rollouts)
    loss = fudge_loss(values, rollouts.rewards.double(), mask)
    (grad,) = torch.autograd.grad(loss, theta)
    assert float(grad.abs().max()) < 1e-12  # stationary at the per-prefix Monte-Carlo means
    # and a minimum: moving any one prefix's value off its mean costs exactly count * delta^2 / 2 / total
    total = int(mask.sum())
    for j in (0, len(keys) // 2, len(keys) - 1):
        bumped = means.clone()
        bumped[j] += 0.3
        v, _ = _table_values(bumped, keys, rollouts)
        extra = float((fudge_loss(v, rollouts.rewards.double(), mask) - loss).detach())
        assert math.isclose(extra, mc[keys[j]][1] * 0.09 / 2 / total, rel_tol=1e-9)
    # Merging identical responses (what the trainer does) keeps the gradient, at any values.
    grouped, counts = group_rollouts(rollouts)
    assert len(grouped) < 30 and int(counts.sum()) == len(rollouts)
    theta = torch.randn(len(keys), dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    rv, rm = _table_values(theta, keys, rollouts)
    raw = torch.autograd.grad(fudge_loss(rv, rollouts.rewards.double(), rm), theta)[0]
    gv, gm = _table_values(theta, keys, grouped)
    merged = torch.autograd.grad(fudge_loss(gv, grouped.rewards, gm, counts), theta)[0]
    torch.testing.assert_close(raw, merged, atol=1e-12, rtol=1e-9)


def test_monte_carlo_means_approach_the_exact_value(toy):
    policy, table, rollouts = toy
    mc = monte_carlo_values(rollouts)
    checked = 0
    for (_, prefix), (mean, count) in mc.items():
        v, var = exact_value(policy, table, list(prefix))
        if count >= 100:
            checked += 1
            assert abs(mean - v) <= 4 * math.sqrt(var / count) + 1e-9, (prefix, mean, v, count)
    assert checked >= 6
    # The values are not all equal: the check can tell prefixes apart.
    assert len({round(exact_value(policy, table, [z])[0], 3) for z in range(VOCAB)}) >= 3


def _small_config():
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                       eos_token_id=EOS, bos_token_id=2, pad_token_id=None)


@pytest.mark.parametrize("kind", ["q", "scalar"])
def test_trained_value_reaches_the_fixed_point(toy, kind):
    policy, table, rollouts = toy
    torch.manual_seed(0)
    model = new_value_model(kind=kind, config=_small_config())
    losses = train_value_model(model, rollouts, kind, steps=300, batch_size=64, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    mc = monte_carlo_values(rollouts)
    keys = [k for k, (_, count) in mc.items() if count >= 50]
    prompts, prefixes = [list(k[0]) for k in keys], [list(k[1]) for k in keys]
    with torch.no_grad():
        values, _ = prefix_values(model, kind, prompts, prefixes)
    trained = values[torch.arange(len(keys)), torch.tensor([len(p) - 1 for p in prefixes])]
    # What the decoder reads from the same model (positions must agree with the trainer's).
    decoder = QValueModel(model) if kind == "q" else ScalarValueModel(model)
    torch.testing.assert_close(decoder.score_ids(prompts, prefixes), trained, atol=1e-5, rtol=0)
    for j, key in enumerate(keys):
        mean, count = mc[key]
        v, var = exact_value(policy, table, list(key[1]))
        assert abs(float(trained[j]) - mean) < 0.1, (key, float(trained[j]), mean)
        assert abs(float(trained[j]) - v) < 0.1 + 4 * math.sqrt(var / count), (key, float(trained[j]), v)


def test_cd_fudge_end_to_end_saves_a_model_the_decoder_loads(tmp_path):
    tok = tiny_tokenizer(64)
    policy = _tiny_llama(64, seed=51)
    reward = CallableReward(lambda prompt, completion: float(completion.count("w3")))
    result = train_cd_fudge(policy, tok, ["w1 w2", "w5"], reward, tmp_path / "value", kind="q",
                            samples_per_prompt=4, max_new_tokens=4, steps=3, batch_size=4, lr=1e-3)
    assert len(result.rollouts) == 8 and len(result.losses) == 3
    value = load_value_model(tmp_path / "value")
    assert isinstance(value, QValueModel) and value.tokenizer is not None
    ids = tok(["w1 w2", "w5"], return_tensors="pt", padding=True)
    prompts = [[7, 8], [11]]
    torch.testing.assert_close(value.score_ids(prompts, [[9, 10], [12]]),
                               QValueModel(result.model).score_ids(prompts, [[9, 10], [12]]), atol=1e-6, rtol=0)
    out = AlignedModel(policy, tokenizer=tok, strategy=TokenwiseCD(value, strength=3.0)).generate(
        **ids, max_new_tokens=3, do_sample=True, top_k=0, seed=1, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        prompt = ids["input_ids"][0][ids["attention_mask"][0].bool()]
        logp = torch.log_softmax(policy(input_ids=prompt[None]).logits[0, -1], -1)
        q = result.model(input_ids=prompt[None]).logits[0, -1]
    torch.testing.assert_close(out.scores[0][0], torch.log_softmax(logp + 3.0 * q, -1), atol=1e-4, rtol=0)
    # A scalar value model initialised from the policy's weights, saved and loaded back.
    scalar = train_cd_fudge(policy, tok, ["w1 w2"], reward, tmp_path / "scalar", kind="scalar",
                            samples_per_prompt=2, max_new_tokens=3, steps=2, batch_size=2)
    loaded = load_value_model(tmp_path / "scalar", k=3)
    assert isinstance(loaded, ScalarValueModel) and loaded.k == 3
    in_memory = ScalarValueModel(scalar.model)
    torch.testing.assert_close(loaded.score_ids([[7, 8]], [[9]]), in_memory.score_ids([[7, 8]], [[9]]),
                               atol=1e-6, rtol=0)


def test_a_copy_of_the_policy_starts_with_zero_values_and_untied_head(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = _tiny_llama(64, seed=52).config
    cfg.tie_word_embeddings = True  # as SmolLM2: the head is the input embedding
    torch.manual_seed(52)
    policy = LlamaForCausalLM(cfg).eval()
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    q = new_value_model(policy, "q")
    assert float(q.get_output_embeddings().weight.detach().abs().max()) == 0
    assert torch.equal(q.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    q.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert float(back.lm_head.weight.detach().abs().max()) == 0
    assert torch.equal(back.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    scalar = new_value_model(policy, "scalar", zero_head=False)
    assert torch.equal(scalar.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)


def test_bad_input():
    policy = _tiny_llama(VOCAB)
    rollouts = Rollouts([[3, 4]], [[2]], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="kind must be"):
        train_value_model(new_value_model(policy, "q"), rollouts, "v")
    with pytest.raises(ValueError, match="steps must be"):
        train_value_model(new_value_model(policy, "q"), rollouts, "q", steps=0)
    with pytest.raises(ValueError, match="every rollout is empty"):
        train_value_model(new_value_model(policy, "q"), Rollouts([[3]], [[]], torch.tensor([1.0])), "q")
    with pytest.raises(ValueError, match="needs the policy"):
        new_value_model(None, "q")
    with pytest.raises(ValueError, match="non-finite"):
        sample_rollouts(policy, None, [[3, 4]], _InfReward(), samples_per_prompt=2, max_new_tokens=1)


class _InfReward:
    name = "inf"

    def score_ids(self, prompt_ids, completion_ids):
        return torch.full((len(completion_ids),), float("inf"))


def test_loading_a_folder_that_is_not_a_value_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="value_model.json"):
        load_value_model(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": True}, "steps must be an integer >= 1, got True"),
    ({"batch_size": "8"}, "batch_size must be an integer >= 1, got '8'"),
    ({"lr": True}, "lr must be a finite number > 0, got True"),
    ({"lr": "1e-3"}, "lr must be a finite number > 0, got '1e-3'"),
])
def test_train_value_model_refuses_bools_and_strings(kwargs, message):
    rollouts = Rollouts([[3, 4]], [[2]], torch.tensor([1.0]))
    with pytest.raises(ValueError, match=message):
        train_value_model(new_value_model(_tiny_llama(VOCAB), "q"), rollouts, "q", **kwargs)
