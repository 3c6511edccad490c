"""Top-k guides: the draw is restricted to the policy's top-k tokens and reweighted by the guide."""

import torch

from align_decode import AlignedModel
from align_decode.decoding import TokenStrategy
from align_decode.decoding.guides import TopKGuide
from tiny import tiny_llama64 as tiny_llama


class ParityGuide(TopKGuide):
    """Score(v) = (v + length of the prefix) mod 3: depends on the candidate and on the prefix."""

    name = "parity"

    def score_candidates(self, state, candidates):
        lengths = torch.tensor([len(p) for p in state.prefixes()])
        return ((candidates + lengths[:, None]) % 3).float()


class Guided(TokenStrategy):
    def __init__(self, guide, weight):
        self.guide, self.weight = guide, weight

    def guides(self):
        return [self.guide]

    def mixing(self, settings):
        return settings.temperature, [self.weight]


def test_step_law_is_the_reweighted_top_k_of_the_policy():
    model = tiny_llama(40, seed=61)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = AlignedModel(model, strategy=Guided(ParityGuide(k=6), 1.7)).generate(
        input_ids=ids, max_new_tokens=4, do_sample=True, temperature=0.8, top_k=0, seed=[1, 2],
        return_dict_in_generate=True, output_scores=True, eos_token_id=[])
    for row in range(2):
        for t, s in enumerate(out.scores):
            prefix = out.sequences[row, : 3 + t]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=prefix[None]).logits[0, -1].float(), -1)
            top = logp.topk(6).indices
            z = torch.full_like(logp, float("-inf"))
            z[top] = logp[top] / 0.8 + 1.7 * ((top + len(prefix)) % 3).float()
            torch.testing.assert_close(s[row], torch.log_softmax(z, -1), atol=1e-5, rtol=0)
            assert int(torch.isfinite(s[row]).sum()) == 6


def test_weight_zero_gives_the_base_policy():
    model = tiny_llama(40, seed=62)
    ids = torch.tensor([[5, 6, 7]])
    base = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    out = AlignedModel(model, strategy=Guided(ParityGuide(k=3), 0.0)).generate(input_ids=ids, max_new_tokens=6)
    assert torch.equal(base, out)
