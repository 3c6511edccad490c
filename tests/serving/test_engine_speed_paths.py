"""The engines' request API (submit / poll) and the sequence methods' fast paths on it (issue 20).

Pipelined QAlign (each chain submits its next proposal as its last returns) must run exactly the chains of
the lockstep path whatever order requests complete in, and best-of-N with its candidates scored per prompt
as requests complete (and drawn in chunks for a large n) must return the candidates, seeds, rewards and
choice of one plain `generate` call. Without vLLM: a reference engine that completes requests out of
order. With vLLM's CPU build (marker `vllm`): the same identities on a tiny saved model.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from align_decode import AlignedModel, BestOfN, QAlign
from align_decode.decoding import GenerationSettings, left_pad
from align_decode.decoding.engine import Finished
from align_decode.rewards import SequenceReward
from engine_support import LoopEngine
from tiny import EOS, PAD, tiny_llama

PROMPTS = [[2, 10, 11, 12], [2, 20, 21], [2, 30, 31, 32, 33]]
LONG = [2] + [6 + (5 * j) % 50 for j in range(40)]


class IdReward(SequenceReward):
    name = "ids"

    def __init__(self):
        super().__init__()
        self.calls = []

    def score_ids(self, prompt_ids, completion_ids):
        self.calls.append(len(completion_ids))
        return torch.tensor([float((c[0] % 3) + (len(c) % 2) / 2) if c else 0.0 for c in completion_ids])

    def _score(self, prompts, completions):
        raise AssertionError("this reward reads token ids")


class ShuffledEngine(LoopEngine):
    """A request queue that completes a random few of the pending requests per poll (often none): requests
    come back out of order and at different times, as on a real engine."""

    def __init__(self, model, seed=0):
        super().__init__(model)
        self.rng = random.Random(seed)
        self.queue: list = []
        self.max_flying = 0

    def submit(self, key, prefix, max_tokens, settings, seed, n=1, first_draw=0):
        self.queue.append((key, list(prefix), max_tokens, settings, seed, n, first_draw))
        self.max_flying = max(self.max_flying, sum(q[5] for q in self.queue))

    def pending(self):
        return len(self.queue)

    def poll(self):
        items, self.queue = self.queue, []
        self.rng.shuffle(items)
        count = self.rng.randint(0, min(2, len(items)))
        self.queue = items[count:]
        done = []
        for key, prefix, budget, settings, seed, n, first in items[:count]:
            out = self.generate([prefix], budget, settings, [seed], n=first + n)
            done.append(Finished(key, out.completions[0][first:], out.forward_tokens, 0))
        return done


def generate(model, strategy, prompts, **kw):
    ids, mask = left_pad(prompts, PAD)
    settings = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, top_k=0, return_dict_in_generate=True)
    return AlignedModel(model, strategy=strategy).generate(input_ids=ids, attention_mask=mask, **{**settings, **kw})


def same_trace(a, b):
    assert a["states"] == b["states"] and a["proposals"] == b["proposals"]
    assert all(torch.equal(x, y) for x, y in zip(a["indices"], b["indices"]))
    assert torch.equal(a["accepted"], b["accepted"]) and torch.equal(a["rewards"], b["rewards"])
    assert all(torch.equal(x, y) for x, y in zip(a["proposal_rewards"], b["proposal_rewards"]))
    assert a["state_logprobs"] == b["state_logprobs"] or all(
        torch.allclose(torch.tensor(x), torch.tensor(y), equal_nan=True)
        for sx, sy in zip(a["state_logprobs"], b["state_logprobs"]) for x, y in zip(sx, sy))


@pytest.fixture(scope="module")
def exact_model():
    return tiny_llama(64, seed=52, dtype=torch.float64)


# ------------------------------------------------------------------------------ without vLLM
def test_the_default_request_queue_draws_what_generate_draws(exact_model):
    engine = LoopEngine(exact_model)
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, stop_ids=(EOS,), pad_id=PAD, top_k=0)
    whole = engine.generate(PROMPTS, 6, settings, [5, 6, 7], n=4).completions
    for i, p in enumerate(PROMPTS):
        engine.submit(("a", i), p, 6, settings, [5, 6, 7][i], n=2)
        engine.submit(("b", i), p, 6, settings, [5, 6, 7][i], n=2, first_draw=2)
    assert engine.pending() == 6
    done = {f.key: f.completions for f in engine.poll()}
    assert engine.pending() == 0 and engine.poll() == []
    for i in range(3):
        assert done[("a", i)] + done[("b", i)] == whole[i]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipelined_qalign_runs_the_lockstep_chains_whatever_the_completion_order(exact_model, seed):
    def run(engine, pipeline):
        strategy = QAlign(IdReward(), beta=0.5, steps=6, chains=3, engine=engine, pipeline=pipeline)
        return generate(exact_model, strategy, PROMPTS, do_sample=True, seed=[4, 5, 6], num_return_sequences=3)

    lockstep = run(LoopEngine(exact_model), False)
    shuffled = run(ShuffledEngine(exact_model, seed), True)
    same_trace(lockstep.alignment["trace"], shuffled.alignment["trace"])
    assert torch.equal(lockstep.sequences, shuffled.sequences)
    assert 0 < float(lockstep.alignment["trace"]["accepted"][1:].float().mean()) < 1
    # And both are the in-process chains (the engine path never changed them).
    ours = run(None, True)
    same_trace(ours.alignment["trace"], lockstep.alignment["trace"])


def test_qalign_pipelines_by_default_where_suffix_budgets_differ(exact_model):
    engine = LoopEngine(exact_model)
    assert QAlign(IdReward(), engine=engine).pipeline
    assert not QAlign(IdReward(), engine=engine, length_cap="suffix").pipeline
    assert QAlign(IdReward(), engine=engine, length_cap="suffix", pipeline=True).pipeline


def test_pipelined_qalign_with_the_official_suffix_cap_and_a_vote(exact_model):
    def run(engine, pipeline):
        strategy = QAlign(IdReward(), beta=1.0, steps=5, chains=2, engine=engine, pipeline=pipeline,
                          length_cap="suffix", answer="best")
        return generate(exact_model, strategy, PROMPTS, do_sample=True, seed=[1, 2, 3], max_new_tokens=5)

    a, b = run(LoopEngine(exact_model), False), run(ShuffledEngine(exact_model, 3), True)
    same_trace(a.alignment["trace"], b.alignment["trace"])
    assert a.alignment["chosen"] == b.alignment["chosen"] and torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("max_in_flight", [1, 3, 5, 64])
def test_best_of_n_scored_as_requests_complete_is_one_generate_call(exact_model, max_in_flight):
    reference = generate(exact_model, BestOfN(IdReward(), n=5, engine=LoopEngine(exact_model)), PROMPTS,
                         do_sample=True, seed=[7, 8, 9]).alignment
    engine, reward = ShuffledEngine(exact_model, max_in_flight), IdReward()
    out = generate(exact_model, BestOfN(reward, n=5, engine=engine, max_in_flight=max_in_flight), PROMPTS,
                   do_sample=True, seed=[7, 8, 9]).alignment
    assert out["candidates"] == reference["candidates"] and out["seeds"] == reference["seeds"]
    assert torch.equal(out["rewards"], reference["rewards"]) and out["chosen"] == reference["chosen"]
    assert engine.max_flying <= max(max_in_flight, 1)  # memory-bounded: never more candidates in flight
    assert sum(reward.calls) == 15 and all(c % 5 == 0 for c in reward.calls)  # whole prompts, as they complete


def test_best_of_n_max_in_flight_is_checked():
    with pytest.raises(ValueError, match="max_in_flight"):
        BestOfN(IdReward(), max_in_flight=0)


# ------------------------------------------------------------------------------------ real vLLM
@pytest.fixture(scope="module")
def vengine(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")
    from transformers import AutoTokenizer

    from align_decode.serving.engines import VLLMEngine
    from vllm_support import load, save_models

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        path = save_models(tmp_path_factory.mktemp("vllm-speed"))["policy"]
        # No block_size given: on CPU the engine picks 32 itself, so prefixes above 32 tokens are cached.
        engine = VLLMEngine(path, dtype="float32", max_model_len=128, max_num_seqs=64, enforce_eager=True)
        yield SimpleNamespace(engine=engine, model=load(path), tokenizer=AutoTokenizer.from_pretrained(path))
        engine.close()


@pytest.mark.vllm
def test_vllm_submit_and_poll_draw_what_generate_draws(vengine):
    engine = vengine.engine
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size == 32
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, stop_ids=(EOS,), pad_id=PAD, top_k=0)
    prompts = PROMPTS + [LONG]
    whole = engine.generate(prompts, 8, settings, [3, 4, 5, 6], n=4)
    for i, p in enumerate(prompts):
        engine.submit((i, 0), p, 8, settings, [3, 4, 5, 6][i], n=3)
        engine.submit((i, 3), p, 8, settings, [3, 4, 5, 6][i], n=1, first_draw=3)
    engine.submit("empty", PROMPTS[0], 0, settings, 1, n=2)
    with pytest.raises(RuntimeError, match="pending"):
        engine.generate(PROMPTS, 8, settings, [1, 2, 3])
    got, cached = {}, 0
    while engine.pending():
        for f in engine.poll():
            got[f.key] = f.completions
            cached += f.cached_tokens
    assert [c.tokens for c in got["empty"]] == [[], []]
    for i in range(len(prompts)):
        assert [c.tokens for c in got[(i, 0)] + got[(i, 3)]] == [c.tokens for c in whole.completions[i]]
        assert [c.seed for c in got[(i, 0)] + got[(i, 3)]] == [c.seed for c in whole.completions[i]]
    assert cached >= 32  # LONG's first block, computed by generate(), served to the later requests
    greedy = GenerationSettings(max_new_tokens=8, do_sample=False, stop_ids=(EOS,), pad_id=PAD)
    engine.submit("g", LONG, 8, greedy, 0, n=3)
    while engine.pending():
        (g,) = engine.poll() or [None]
    assert [c.tokens for c in g.completions] == [c.tokens for c in engine.generate([LONG], 8, greedy, [0], n=3).flat()]


@pytest.mark.vllm
def test_vllm_best_of_n_scored_as_requests_complete_and_chunked(vengine):
    prompts, seeds = PROMPTS + [LONG], [11, 12, 13, 14]
    runs = {}
    for flight in (1024, 5):
        strategy = BestOfN(IdReward(), n=6, engine=vengine.engine, max_in_flight=flight)
        runs[flight] = generate(vengine.model, strategy, prompts, do_sample=True, seed=seeds).alignment
    a, b = runs[1024], runs[5]
    assert a["candidates"] == b["candidates"] and a["seeds"] == b["seeds"]
    assert torch.equal(a["rewards"], b["rewards"]) and a["chosen"] == b["chosen"]
    for cands, seed_list in zip(a["candidates"], a["seeds"]):
        assert len(cands) == 6 and seed_list == [seed_list[0] + j for j in range(6)]


@pytest.mark.vllm
def test_vllm_pipelined_qalign_runs_the_lockstep_chains(vengine):
    def run(pipeline, length_cap):
        strategy = QAlign(IdReward(), beta=0.5, steps=5, chains=3, engine=vengine.engine, pipeline=pipeline,
                          length_cap=length_cap)
        return generate(vengine.model, strategy, PROMPTS + [LONG], do_sample=True, seed=[1, 2, 3, 4],
                        num_return_sequences=3)

    for cap in ("response", "suffix"):
        lockstep, pipelined = run(False, cap), run(True, cap)
        same_trace(lockstep.alignment["trace"], pipelined.alignment["trace"])
        assert torch.equal(lockstep.sequences, pipelined.sequences)
        tr = pipelined.alignment["trace"]
        assert 0 < float(tr["accepted"][1:].float().mean()) < 1
        assert tr["cached_tokens"] >= 5 * 3 * 32  # LONG's chains hit the cache every step
