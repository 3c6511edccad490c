"""Best-of-N with early pruning: without pruning it is best-of-N draw for draw (hence the exact law);
with pruning the answer is never a pruned candidate and the kept share is as asked."""

import math

import pytest
import torch

from align_decode import AlignedModel, BestOfN, PrunedBestOfN
from enumerate_law import TableReward
from tiny import EOS, PAD, tiny_llama


class ModReward(TableReward):
    def __init__(self):
        super().__init__({})

    def score_ids(self, prompt_ids, completion_ids):
        return torch.tensor([float((3 * sum(c) + len(c)) % 5) for c in completion_ids])


@pytest.fixture(scope="module")
def policy():
    return tiny_llama(7, seed=41, init=0.5, dtype=torch.float64)


def _generate(policy, strategy, prompts=6, cap=6, **kw):
    return AlignedModel(policy, strategy=strategy).generate(
        input_ids=torch.tensor([[3, 4]] * prompts), max_new_tokens=cap, do_sample=True, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD, seed=list(range(100, 100 + prompts)), return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("options", [dict(keep_fraction=1.0, prune_at=(2, 4)), dict(prune_at=())])
def test_without_pruning_it_is_best_of_n_draw_for_draw(policy, options):
    """Same seeds, same candidates, same choice: so it also follows best-of-N's exact law (tested there)."""
    plain = _generate(policy, BestOfN(ModReward(), n=8), num_return_sequences=2)
    pruned = _generate(policy, PrunedBestOfN(ModReward(), n=8, **options), num_return_sequences=2)
    assert pruned.alignment["candidates"] == plain.alignment["candidates"]
    assert pruned.alignment["chosen"] == plain.alignment["chosen"]
    assert torch.equal(pruned.sequences, plain.sequences)
    assert all(p is None for row in pruned.alignment["pruned_at"] for p in row)


def test_pruning_keeps_the_best_share_and_never_returns_a_pruned_candidate(policy):
    n, prompts = 8, 6
    out = _generate(policy, PrunedBestOfN(ModReward(), n=n, prune_at=(2, 4), keep_fraction=0.5), prompts=prompts)
    a = out.alignment
    plain = _generate(policy, BestOfN(ModReward(), n=n), prompts=prompts)
    for b in range(prompts):
        pruned = [j for j in range(n) if a["pruned_at"][b][j] is not None]
        survivors = [j for j in range(n) if a["pruned_at"][b][j] is None]
        assert len(survivors) == math.ceil(math.ceil(n * 0.5) * 0.5)  # 8 -> 4 -> 2
        assert a["chosen"][b][0] in survivors and a["chosen"][b][0] not in pruned
        assert all(math.isnan(a["rewards"][b][j]) for j in pruned)
        # A candidate's tokens are best-of-N's candidate's, up to where it was pruned.
        for j in range(n):
            full = plain.alignment["candidates"][b][j]
            assert a["candidates"][b][j] == full[:len(a["candidates"][b][j])]
            if j in pruned:
                assert len(a["candidates"][b][j]) == min(a["pruned_at"][b][j], len(full))
        # At each point the kept candidates had the highest partial rewards (the earlier one on ties).
        first = a["partial_scores"][b][0]
        kept = sorted(range(n), key=lambda j: (-first[j], j))[:4]
        assert all(a["pruned_at"][b][j] != 2 for j in kept)
    assert a["sampled_tokens"] < plain.sequences.new_tensor(
        [len(c) for row in plain.alignment["candidates"] for c in row]).sum()


def test_argument_errors(policy):
    with pytest.raises(ValueError, match="needs a reward"):
        PrunedBestOfN(None)
    with pytest.raises(ValueError, match="keep_fraction must be"):
        PrunedBestOfN(ModReward(), keep_fraction=0)
    with pytest.raises(ValueError, match=r"prune_at\[0\] must be an integer >= 1"):
        PrunedBestOfN(ModReward(), prune_at=(0,))
    with pytest.raises(ValueError, match="num_return_sequences=3 is more than the n=2"):
        _generate(policy, PrunedBestOfN(ModReward(), n=2), num_return_sequences=3)
