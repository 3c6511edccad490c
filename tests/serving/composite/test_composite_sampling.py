"""Sampled outputs of the composite engine follow the GenARM law, checked by a chi-square test.

Tiny random models (256-token vocabulary, 2 layers) built from configs; each request draws a
two-token continuation with its own seed, and the pair frequencies are tested against the exact law
computed on the full vocabulary from the Hugging Face models:

    p(t1, t2) = q(t1 | x) q(t2 | x, t1),    q(. | h) = softmax( s(h) / T + w * log_softmax(g(h)) )

with policy logits s, guide logits g and the request's own weight w (`vllm_plugin.batch`: the
processor adds T * w * g before vLLM divides by T). Two weights are drawn in one batch; the same
statistic must reject the unguided policy's law and the other weight's law, so the test has power.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

import torch  # noqa: E402

from vllm_support import guided, load, shutdown  # noqa: E402

pytestmark = pytest.mark.vllm

VOCAB = 256
PROMPT = [2, 10, 11, 12]
TEMPERATURE = 0.8
WEIGHTS = (1.5, 0.5)
DRAWS = 3000  # per weight


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    from vllm import LLM

    from align_decode.serving.composite.spec import build_composite
    from tiny import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("law-models")
    for name, seed in (("policy", 0), ("arm", 1)):
        tiny_llama(vocab_size=VOCAB, seed=seed).save_pretrained(root / name)
        tiny_tokenizer(vocab_size=VOCAB).save_pretrained(root / name)
    build_composite(root / "policy", {"arm": root / "arm"}, root / "composite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.delenv("ALIGN_DECODE_GUIDES", raising=False)
        llm = LLM(model=str(root / "composite"), dtype="float32", max_model_len=64, max_num_seqs=256,
                  enforce_eager=True, seed=0)
        try:
            # Both weights interleaved in one batch: each row must get its own weight.
            params = [guided({"arm": WEIGHTS[i % 2]}, temperature=TEMPERATURE, seed=i, max_tokens=2,
                             ignore_eos=True) for i in range(2 * DRAWS)]
            outs = llm.generate([{"prompt_token_ids": PROMPT}] * len(params), params, use_tqdm=False)
        finally:
            shutdown(llm)
    pairs = [tuple(o.outputs[0].token_ids) for o in outs]
    assert all(len(p) == 2 for p in pairs)
    samples = {w: [p for i, p in enumerate(pairs) if WEIGHTS[i % 2] == w] for w in WEIGHTS}
    return samples, load(root / "policy"), load(root / "arm")


@torch.no_grad()
def pair_law(policy, arm, weight: float) -> torch.Tensor:
    """The exact two-token law [VOCAB, VOCAB] (float64), every first token's continuation computed."""

    def step(ids: torch.Tensor) -> torch.Tensor:
        s = policy(input_ids=ids).logits[:, -1].double()
        g = torch.log_softmax(arm(input_ids=ids).logits[:, -1].double(), -1)
        return torch.softmax(s / TEMPERATURE + weight * g, -1)

    first = step(torch.tensor([PROMPT]))[0]
    ids = torch.cat([torch.tensor([PROMPT]).expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    return first[:, None] * step(ids)


def chi_square_p(samples, law: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test of the pair counts against `law`; cells expected below `min_expected` times are
    pooled into one cell (over the whole vocabulary, so the law's full mass is tested)."""
    from scipy.stats import chi2

    n = len(samples)
    counts = torch.zeros_like(law)
    for a, b in samples:
        counts[a, b] += 1
    expected = n * law
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    if bool((obs[~keep] > 0).any()):
        return 0.0  # a draw the law gives probability 0
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def test_sampled_pairs_follow_the_mixed_law_for_each_requests_weight(drawn):
    samples, policy, arm = drawn
    for w in WEIGHTS:
        p = chi_square_p(samples[w], pair_law(policy, arm, w))
        assert p > 1e-3, (w, p)


def test_the_same_statistic_rejects_the_unguided_law_and_the_other_weights_law(drawn):
    """The test above has power: the policy's own law, and the law of the other weight in the batch,
    are rejected by the same statistic on the same draws."""
    samples, policy, arm = drawn
    for w in WEIGHTS:
        assert chi_square_p(samples[w], pair_law(policy, arm, 0.0)) < 1e-9, w
    a, b = WEIGHTS
    assert chi_square_p(samples[a], pair_law(policy, arm, b)) < 1e-9
    assert chi_square_p(samples[b], pair_law(policy, arm, a)) < 1e-9
