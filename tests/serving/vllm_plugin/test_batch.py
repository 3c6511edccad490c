"""The engine-independent core of the vLLM plugin: guide caches per request and the mixing rule.

Runs without vLLM. Every step is checked against the guides run from scratch on each request's whole
prefix, through arrivals, departures, absences, chunked-prefill pauses and rebuilds.
"""

import random

import pytest
import torch

from align_decode.decoding.prompts import left_pad
from align_decode.serving.vllm_plugin.bank import GuideBank, LoadedGuide
from align_decode.serving.vllm_plugin.batch import GuidedBatch
from align_decode.serving.vllm_plugin.config import GuideSpec, RequestGuidance

from tiny import tiny_llama

V = 64  # shared tokenizer width
LOGITS = 70  # vLLM's logits may be wider than the tokenizer (padded head)


@pytest.fixture(scope="module")
def bank():
    a = tiny_llama(vocab_size=V, seed=11)
    b = tiny_llama(vocab_size=72, seed=12)  # a guide with padding rows past the tokenizer
    return GuideBank({
        "a": LoadedGuide(GuideSpec("a", "/unused"), a, V),
        "b": LoadedGuide(GuideSpec("b", "/unused", kind="qhead"), b, V),
    })


class Lists:
    """TokenSource over plain lists (handle = the request's token list)."""

    def __init__(self):
        self.prefix_calls = 0

    def prefix(self, reqs, lengths, device):
        self.prefix_calls += 1
        return left_pad([r.handle[:n] for r, n in zip(reqs, lengths)], 0, device=device)

    def last(self, reqs, lengths, device):
        return torch.tensor([r.handle[n - 1] for r, n in zip(reqs, lengths)], device=device)


@torch.no_grad()
def reference_scores(model, tokens):
    return model(input_ids=torch.tensor([tokens])).logits[0, -1, :V].float()


def expected_row(bank, base_row, req, n):
    row = base_row.clone()
    for name, w in req.guidance.weights:
        row[:V] += req.scale * w * reference_scores(bank[name].model, req.handle[:n])
    row[V:] = float("-inf")
    return row


def test_mixing_matches_guides_run_from_scratch_through_a_changing_batch(bank):
    rng = random.Random(0)
    torch.manual_seed(0)
    batch, source = GuidedBatch(bank), Lists()
    kinds = [(("a", 1.0),), (("b", -0.5),), (("a", 0.7), ("b", 2.0))]
    live = {}  # request -> current length
    checked = 0
    for step in range(14):
        # Arrivals (with prompts of different lengths and temperatures).
        for _ in range(rng.randint(0, 2) if step else 3):
            toks = [2] + [rng.randrange(6, V) for _ in range(rng.randint(1, 6))]
            scale = rng.choice([1.0, 0.5, 1.7])
            req = batch.add(RequestGuidance(rng.choice(kinds)), scale, handle=toks)
            live[req] = len(toks)
        # Departures.
        for req in list(live):
            if rng.random() < 0.12:
                batch.remove(req)
                del live[req]
        # Each live request: usually one new token; sometimes absent, paused (need 0), jumping
        # ahead (need > 1: rebuild) or cut back (need < 0: rebuild).
        in_step, lengths = [], []
        for req in live:
            event = rng.random()
            if event < 0.1:
                req.row = -1  # not scheduled this step
                continue
            if event < 0.2:
                n = live[req]
            elif event < 0.27:
                n = live[req] + 3
            elif event < 0.32 and live[req] > 3:
                n = live[req] - 1
            else:
                n = live[req] + 1
            while len(req.handle) < n:
                req.handle.append(rng.randrange(6, V))
            live[req] = n
            in_step.append(req)
            lengths.append(n)
        rows = list(range(len(in_step) + 2))
        rng.shuffle(rows)  # rows move around, and two rows belong to unguided requests
        for req, row in zip(in_step, rows):
            req.row = row
        batch.sync(in_step, lengths, source)
        logits = torch.randn(len(rows), LOGITS)
        before = logits.clone()
        out = batch.mix(logits)
        assert out is logits  # in place
        guided_rows = set()
        for req, n in zip(in_step, lengths):
            torch.testing.assert_close(out[req.row], expected_row(bank, before[req.row], req, n),
                                       rtol=1e-4, atol=1e-4)
            guided_rows.add(req.row)
            checked += 1
        for row in set(range(len(rows))) - guided_rows:
            assert torch.equal(out[row], before[row])  # unguided rows untouched, bit for bit
    assert checked > 40
    # Caches hold exactly the live requests that were ever built.
    for rows in batch.rows.values():
        assert all(r in live for r in rows.requests)


def test_a_step_reads_one_token_per_request_and_batches_new_rows(bank):
    batch, source = GuidedBatch(bank), Lists()
    reqs = [batch.add(RequestGuidance((("a", 1.0), ("b", 1.0))), 1.0, handle=[2, 7 + i, 9]) for i in range(3)]
    batch.sync(reqs, [3, 3, 3], source)
    assert source.prefix_calls == 1  # one batched prefill for three new requests and both guides
    assert batch.rows["a"].session.batch_size == 3 and batch.rows["b"].session.batch_size == 3
    for r in reqs:
        r.handle.append(20)
    batch.sync(reqs, [4, 4, 4], source)
    assert source.prefix_calls == 1  # advanced incrementally, no re-run over the prefix
    assert all(r.fed == 4 for r in reqs)
    assert batch.rows["a"].session.forward_tokens == 3 * 3 + 3


def test_removed_requests_leave_the_caches(bank):
    batch, source = GuidedBatch(bank), Lists()
    reqs = [batch.add(RequestGuidance((("a", 1.0),)), 1.0, handle=[2, 8, 9]) for _ in range(3)]
    batch.sync(reqs, [3] * 3, source)
    batch.remove(reqs[1])
    batch.sync([reqs[0], reqs[2]], [3, 3], source)
    assert batch.rows["a"].requests == [reqs[0], reqs[2]]
    assert batch.rows["a"].session.batch_size == 2
    for r in (reqs[0], reqs[2]):
        batch.remove(r)
    batch.flush()
    assert batch.rows["a"].session is None and len(batch) == 0
    assert batch.mix(torch.zeros(2, LOGITS)).eq(0).all()  # nothing guided: returned untouched


def test_add_validates_its_arguments(bank):
    batch = GuidedBatch(bank)
    with pytest.raises(ValueError, match="at least one nonzero"):
        batch.add(RequestGuidance(()), 1.0)
    with pytest.raises(KeyError, match="not loaded"):
        batch.add(RequestGuidance((("zzz", 1.0),)), 1.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        batch.add(RequestGuidance((("a", 1.0),)), 0.0)
