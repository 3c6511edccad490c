"""Blockwise controlled decoding: its limits (K = 1 is plain sampling draw for draw, M >= the cap is
best-of-K) and the exact law in between (best-of-K over each block from its prefix), by enumeration."""

import collections

import pytest
import torch

from align_decode import AlignedModel, BlockwiseCD, QValueModel, Sample, ScalarValueModel, TokenwiseCD
from align_decode.rewards import CallableReward
from enumerate_law import TableReward, chi_square_p, next_token_probs, response_law
from enumerate_law import bon_law
from test_controlled import tiny_value_head
from tiny import EOS, PAD, tiny_tokenizer
from tiny import tiny_llama64 as tiny_llama

VOCAB, PROMPT = 5, [3, 4]


@pytest.fixture(scope="module")
def toy():
    return tiny_llama(VOCAB, seed=41, init=0.5)


def _prompts():
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [6, 10, 11, 12, 13], [PAD, PAD, PAD, 20, 21]])
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("block_size", [1, 3, 50])
def test_one_candidate_is_plain_sampling_draw_for_draw(block_size):
    policy = tiny_llama(64, seed=1)
    ids, mask = _prompts()
    # Several stop ids so rows end at different blocks, some inside a block.
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=True, top_k=0, temperature=1.5,
              seed=[4, 5, 6], num_return_sequences=2, eos_token_id=[1, 9, 14, 22, 30, 41], pad_token_id=PAD,
              return_dict_in_generate=True)
    plain = AlignedModel(policy, strategy=Sample()).generate(**kw)
    block = AlignedModel(policy, strategy=BlockwiseCD(num_candidates=1, block_size=block_size)).generate(**kw)
    assert torch.equal(plain.sequences, block.sequences)
    assert torch.equal(plain.alignment["lengths"], block.alignment["lengths"])
    assert torch.equal(plain.alignment["stopped"], block.alignment["stopped"])
    assert plain.alignment["stopped"].any() and not plain.alignment["stopped"].all()
    torch.testing.assert_close(plain.alignment["logprobs"], block.alignment["logprobs"], atol=1e-6, rtol=0)
    for row, n in enumerate(block.alignment["lengths"].tolist()):
        assert block.alignment["blocks"][row] == -(-n // block_size)  # ceil: one block per M tokens


def test_one_candidate_with_a_guided_proposal_is_the_proposal():
    """K = 1 over a tokenwise-CD proposal (a cached top-k value model forked across blocks) draws exactly
    what tokenwise CD draws."""
    policy, head = tiny_llama(64, seed=2), tiny_value_head(64, seed=3)
    ids, mask = _prompts()
    proposal = TokenwiseCD(ScalarValueModel(head, k=4), strength=2.0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=True, top_k=0, seed=[1, 2, 3],
              eos_token_id=[1, 9, 14, 22, 30, 41], pad_token_id=PAD)
    direct = AlignedModel(policy, strategy=proposal).generate(**kw)
    block = AlignedModel(policy, strategy=BlockwiseCD(num_candidates=1, block_size=2, proposal=proposal)).generate(**kw)
    assert torch.equal(direct, block)


def _table(law):
    return {y: float((3 * sum(y) + len(y)) % 4) for y in law}


def _draw(policy, strategy, cap, trials):
    out = AlignedModel(policy, strategy=strategy).generate(
        input_ids=torch.tensor([PROMPT]).expand(trials, -1), max_new_tokens=cap, do_sample=True, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD, seed=list(range(trials)), return_dict_in_generate=True)
    lengths = out.alignment["lengths"].tolist()
    return [tuple(out.sequences[i, len(PROMPT):len(PROMPT) + lengths[i]].tolist()) for i in range(trials)], out


def test_block_as_long_as_the_cap_is_best_of_k(toy):
    cap, k, trials = 2, 4, 6000
    law = response_law(toy, PROMPT, cap, EOS)
    table = _table(law)
    exact = bon_law(law, table, k)
    picks, out = _draw(toy, BlockwiseCD(TableReward(table), num_candidates=k, block_size=cap), cap, trials)
    assert all(n == 1 for n in out.alignment["blocks"])
    p = chi_square_p(collections.Counter(picks), exact, trials)
    assert p > 1e-3, p  # fixed seeds, stated threshold
    # The law differs from the policy's: the test can tell the two apart.
    assert chi_square_p(collections.Counter(picks), law, trials) < 1e-6


def _blocks(policy, prefix, size, cap):
    """p(block | prefix) for every block of up to `size` tokens (ending early at EOS or at the cap)."""
    out = {}

    def expand(block, prob):
        resp = prefix + block
        if block and (resp[-1] == EOS or len(block) == size or len(resp) == cap):
            out[tuple(block)] = prob
            return
        p = next_token_probs(policy, PROMPT + resp)
        for tok in range(p.shape[0]):
            expand(block + [tok], prob * float(p[tok]))

    expand([], 1.0)
    return out


def blockwise_law(policy, value, k, size, cap):
    """Exact law of blockwise CD: each block is best-of-K (by value of prefix + block, first index wins
    ties) over the policy's blocks from the current prefix, until EOS or the cap."""
    law = {}

    def expand(prefix, prob):
        if prefix and (prefix[-1] == EOS or len(prefix) == cap):
            law[tuple(prefix)] = law.get(tuple(prefix), 0.0) + prob
            return
        blocks = _blocks(policy, prefix, size, cap)
        scores = {b: value[tuple(prefix) + b] for b in blocks}
        for b, q in bon_law(blocks, scores, k).items():
            if q > 0:
                expand(prefix + list(b), prob * q)

    expand([], 1.0)
    return law


@pytest.mark.parametrize("k,size,cap", [(3, 1, 2), (2, 2, 3)])
def test_intermediate_blocks_follow_the_exact_blockwise_law(toy, k, size, cap):
    # A value for every prefix (a stand-in for V): ties across blocks included.
    law = response_law(toy, PROMPT, cap, EOS)
    value = {}
    for y in law:
        for t in range(1, len(y) + 1):
            value[y[:t]] = float((2 * sum(y[:t]) + 3 * t) % 5)
    exact = blockwise_law(toy, value, k, size, cap)
    assert abs(sum(exact.values()) - 1) < 1e-9
    trials = 4000
    picks, _ = _draw(toy, BlockwiseCD(TableReward(value), num_candidates=k, block_size=size), cap, trials)
    p = chi_square_p(collections.Counter(picks), exact, trials)
    assert p > 1e-3, p
    # Not the whole-response best-of-K law either (a block at a time is a different method).
    whole = bon_law(law, {y: value[y] for y in law}, k)
    assert chi_square_p(collections.Counter(picks), whole, trials) < 1e-6


def test_q_value_model_ranks_the_blocks():
    policy, q = tiny_llama(64, seed=5), tiny_llama(64, seed=6)
    ids, mask = _prompts()
    value = QValueModel(q)
    out = AlignedModel(policy, strategy=BlockwiseCD(value, num_candidates=3, block_size=2)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, seed=[7, 8, 9],
        eos_token_id=EOS, pad_token_id=PAD, return_dict_in_generate=True)
    width = ids.shape[1]
    for row in range(3):
        prompt = ids[row][mask[row].bool()].tolist()
        resp = out.sequences[row, width:width + int(out.alignment["lengths"][row])].tolist()
        for b, values in enumerate(out.alignment["block_values"][row]):
            # The kept block is the best of K; its value is Q(prompt + response so far) from scratch.
            assert len(values) == 3
            upto = resp[: min(2 * (b + 1), len(resp))]
            with torch.no_grad():
                q_last = float(q(input_ids=torch.tensor([prompt + upto[:-1]])).logits[0, -1, upto[-1]])
            assert abs(max(values) - q_last) < 1e-5


def test_text_reward_scorer_reads_prompt_and_partial_response():
    tok = tiny_tokenizer(64)
    policy = tiny_llama(64, seed=7)
    seen = []

    def reward(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return [float(len(c)) for c in completions]

    ids, mask = _prompts()
    out = AlignedModel(policy, tokenizer=tok, strategy=BlockwiseCD(CallableReward(reward, batched=True),
                                                                   num_candidates=2, block_size=3)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=1, eos_token_id=[],
        return_dict_in_generate=True)
    assert len(seen) == 2 and len(seen[0][1]) == 3 * 2
    assert seen[0][0][0] == tok.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    # Second block: each candidate is the kept first block plus three more tokens.
    first = tok.decode(out.sequences[0, 5:8], skip_special_tokens=True)
    assert seen[1][1][0].startswith(first) and seen[1][1][1].startswith(first)


@pytest.mark.parametrize("kwargs,err,msg", [
    ({"num_candidates": 0}, ValueError, "num_candidates"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"num_candidates": 2, "scorer": None}, ValueError, "needs a scorer"),
    ({"scorer": object()}, TypeError, "scorer must be"),
    ({"proposal": object()}, TypeError, "proposal must be"),
])
def test_bad_arguments(kwargs, err, msg):
    kwargs.setdefault("scorer", TableReward({}))
    with pytest.raises(err, match=msg):
        BlockwiseCD(**kwargs)


def test_output_scores_is_refused(toy):
    with pytest.raises(ValueError, match="output_scores"):
        AlignedModel(toy, strategy=BlockwiseCD(TableReward({}), 2, 1)).generate(
            input_ids=torch.tensor([PROMPT]), max_new_tokens=2, output_scores=True, return_dict_in_generate=True)
