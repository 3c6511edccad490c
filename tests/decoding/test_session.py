"""ModelSession: cached decoding, forking, cutting back and compaction equal recomputation from scratch."""

import pytest
import torch

from align_decode.decoding import ModelSession, left_pad
from tiny import PAD
from tiny import tiny_llama64 as tiny_llama
ATOL = 1e-9


def scratch(model, seq):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(seq).unsqueeze(0)).logits[0, -1].float()


def test_cached_steps_equal_recomputation_with_left_padding():
    model = tiny_llama(50, seed=1)
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    ids, mask = left_pad(prompts, PAD)
    s = ModelSession(model)
    logits = s.prefill(ids, mask)
    seqs = [list(p) for p in prompts]
    for step in range(5):
        for b in range(3):
            torch.testing.assert_close(logits[b], scratch(model, seqs[b]), atol=ATOL, rtol=0)
        tok = torch.tensor([(7 * step + 3 * b) % 50 for b in range(3)])
        for b in range(3):
            seqs[b].append(int(tok[b]))
        logits = s.step(tok)
    assert [x.tolist() for x in s.sequences()] == seqs


def test_rows_that_do_not_advance_keep_their_sequence():
    model = tiny_llama(50, seed=2)
    ids, mask = left_pad([[5, 6], [7, 8, 9]], PAD)
    s = ModelSession(model)
    s.prefill(ids, mask)
    s.step(torch.tensor([1, 2]), advance=torch.tensor([True, False]))
    logits = s.step(torch.tensor([3, 4]))
    torch.testing.assert_close(logits[0], scratch(model, [5, 6, 1, 3]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], scratch(model, [7, 8, 9, 4]), atol=ATOL, rtol=0)
    assert s.next_pos.tolist() == [4, 4]


def test_fork_select_and_resume_at_equal_recomputation():
    model = tiny_llama(50, seed=3)
    ids, mask = left_pad([[5, 6, 7], [8, 9]], PAD)
    s = ModelSession(model)
    s.prefill(ids, mask)
    for tok in ([10, 11], [12, 13], [14, 15]):
        s.step(torch.tensor(tok))
    fork = s.fork(torch.tensor([1, 0, 1]))
    assert s.batch_size == 2 and fork.batch_size == 3
    # Cut rows back to different lengths (prompt included) and continue from there.
    logits = fork.resume_at(torch.tensor([3, 5, 5]))
    expect = [[8, 9, 11], [5, 6, 7, 10, 12], [8, 9, 11, 13, 15]]
    for b, seq in enumerate(expect):
        torch.testing.assert_close(logits[b], scratch(model, seq), atol=ATOL, rtol=0)
        assert fork.sequences()[b].tolist() == seq
    logits = fork.step(torch.tensor([20, 21, 22]))
    for b, seq in enumerate(expect):
        torch.testing.assert_close(logits[b], scratch(model, seq + [[20, 21, 22][b]]), atol=ATOL, rtol=0)
    # The parent session is untouched by its fork.
    torch.testing.assert_close(s.step(torch.tensor([1, 1]))[0], scratch(model, [5, 6, 7, 10, 12, 14, 1]), atol=ATOL,
                               rtol=0)


def test_resume_inside_the_prompt_and_compaction():
    model = tiny_llama(50, seed=4)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], PAD)
    s = ModelSession(model)
    s.prefill(ids, mask)
    for t in range(30):  # grow, then cut back hard: the cache gets compacted
        s.step(torch.tensor([t % 50, (t + 1) % 50]))
    physical = s.mask.shape[1]
    logits = s.resume_at(torch.tensor([2, 3]))
    assert s.mask.shape[1] < physical
    torch.testing.assert_close(logits[0], scratch(model, [5, 6]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], scratch(model, [9, 10, 1]), atol=ATOL, rtol=0)


def test_concat_keeps_each_rows_sequence():
    model = tiny_llama(50, seed=5)
    a, b = ModelSession(model), ModelSession(model)
    a.prefill(*left_pad([[5, 6, 7, 8, 9, 10]], PAD))
    b.prefill(*left_pad([[11], [12, 13]], PAD))
    both = ModelSession.concat([a, b])
    logits = both.step(torch.tensor([1, 2, 3]))
    for row, seq in enumerate([[5, 6, 7, 8, 9, 10, 1], [11, 2], [12, 13, 3]]):
        torch.testing.assert_close(logits[row], scratch(model, seq), atol=ATOL, rtol=0)


def test_empty_prompt_and_bad_cuts_are_refused():
    model = tiny_llama(50)
    s = ModelSession(model)
    with pytest.raises(ValueError, match="empty prompt in row"):
        s.prefill(torch.tensor([[PAD, PAD], [3, 4]]), torch.tensor([[0, 0], [1, 1]]))
    s.prefill(torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match="keep_prefix"):
        s.keep_prefix(torch.tensor([5]))


def test_vocab_width_is_cut():
    model = tiny_llama(50)
    s = ModelSession(model, vocab_size=40)
    assert s.prefill(torch.tensor([[3, 4]])).shape == (1, 40)


def test_merge_rows_takes_each_row_from_the_chosen_session():
    model = tiny_llama(50, seed=6)
    a = ModelSession(model)
    a.prefill(*left_pad([[5, 6], [7], [8, 9, 10]], PAD))
    b = a.fork(torch.arange(3))
    b.resume_at(torch.tensor([1, 1, 2]))
    b.step(torch.tensor([20, 21, 22]))
    merged = ModelSession.merge_rows(a, b, torch.tensor([True, False, True]))
    logits = merged.step(torch.tensor([1, 2, 3]))
    for row, seq in enumerate([[5, 20, 1], [7, 2], [8, 9, 22, 3]]):
        assert merged.sequences()[row].tolist() == seq
        torch.testing.assert_close(logits[row], scratch(model, seq), atol=ATOL, rtol=0)


def test_parked_rows_come_back_in_order_ready_to_continue():
    from align_decode.decoding import decode
    from align_decode.kernels import SamplingRows

    model = tiny_llama(50, seed=7)
    prompts = [[5, 6], [7], [8, 9, 10], [11]]
    s = ModelSession(model)
    logits = s.prefill(*left_pad(prompts, PAD))
    out = decode(s, logits, sampling=SamplingRows.build(4, seed=torch.arange(4)), max_new_tokens=torch.tensor([2, 5, 1, 4]),
                 pad_id=PAD, prune_finished="park")
    assert out.lengths.tolist() == [2, 5, 1, 4]
    nxt = s.step(torch.tensor([3, 3, 3, 3]))
    for row, p in enumerate(prompts):
        seq = p + out.tokens[row, : int(out.lengths[row]) - 1].tolist()
        assert s.sequences()[row].tolist() == seq + [3]
        torch.testing.assert_close(nxt[row], scratch(model, seq + [3]), atol=ATOL, rtol=0)


def test_sliding_window_models_fork_and_cut_like_recomputation():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=4, initializer_range=0.3)
    model = MistralForCausalLM(cfg).to(torch.float64).eval()
    s = ModelSession(model)
    s.prefill(*left_pad([[5, 6, 7], [8]], PAD))
    for t in range(7):  # well past the window
        s.step(torch.tensor([10 + t, 20 + t]))
    fork = s.fork(torch.tensor([0, 1, 0]))
    logits = fork.resume_at(torch.tensor([6, 3, 9]))
    for b, seq in enumerate([[5, 6, 7, 10, 11, 12], [8, 20, 21], [5, 6, 7, 10, 11, 12, 13, 14, 15]]):
        torch.testing.assert_close(logits[b], scratch(model, seq), atol=ATOL, rtol=0)
    logits = fork.step(torch.tensor([1, 2, 3]))
    torch.testing.assert_close(logits[2], scratch(model, [5, 6, 7, 10, 11, 12, 13, 14, 15, 3]), atol=ATOL, rtol=0)
