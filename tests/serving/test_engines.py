"""Sampling engines: vLLM behind best-of-N, QAlign and Transfer Q*, and the routing that sends their
sampling to an engine.

Without vLLM (these run in the main suite): a reference engine that decodes every prefix from scratch
with this package's own sampler must reproduce the in-process results exactly (QAlign's chains,
Transfer Q*'s rollouts), so the routing itself changes nothing; the command line refuses what it cannot
do in one line; importing align_decode never imports vLLM.

With vLLM's CPU build (marker `vllm`: `.venv-vllm/bin/python -m pytest -m vllm tests/`), on tiny saved
models: vLLM's sampler draws other tokens than ours for one seed, so sampled results are checked through
their law and invariants, greedy ones token for token against the in-process engine.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from align_decode import AlignedModel, BestOfN, GenARM, PromptedARM, QAlign, Sample, TransferQ
from align_decode.decoding import PromptBatch, left_pad
from align_decode.serving.engines import EnginePolicy, engine_generate
from align_decode.rewards import SequenceReward
from cli_support import assert_one_line_error, invoke, run_ok, save_model, write_jsonl
from enumerate_law import TableReward, bon_law, chi_square_p, response_law
from engine_support import LoopEngine
from tiny import EOS, PAD, tiny_llama, tiny_tokenizer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS = [[2, 10, 11, 12], [2, 20, 21], [2, 30, 31, 32, 33]]
LONG = [2] + [6 + (5 * j) % 50 for j in range(40)]  # longer than one KV block (32): its prefix is cacheable


class IdReward(SequenceReward):
    """A reward of token ids with many ties: (first token mod 3) + (length mod 2) / 2."""

    name = "ids"

    def score_ids(self, prompt_ids, completion_ids):
        return torch.tensor([float((c[0] % 3) + (len(c) % 2) / 2) if c else 0.0 for c in completion_ids])

    def _score(self, prompts, completions):
        raise AssertionError("this reward reads token ids")


def generate(model, strategy, prompts, **kw):
    ids, mask = left_pad(prompts, PAD)
    settings = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, top_k=0, return_dict_in_generate=True)
    return AlignedModel(model, strategy=strategy).generate(input_ids=ids, attention_mask=mask, **{**settings, **kw})


def first_best(rewards) -> int:
    """argmax with the first index winning ties."""
    values = [float(r) for r in rewards]
    return values.index(max(values))


# ------------------------------------------------------------------------- routing, without vLLM
@pytest.fixture(scope="module")
def exact_model():
    return tiny_llama(64, seed=52, dtype=torch.float64)  # cached and from-scratch forwards agree exactly


def test_qalign_through_a_backend_runs_the_same_chains(exact_model):
    def chains(engine):
        strategy = QAlign(IdReward(), beta=0.5, steps=6, chains=3, engine=engine)
        return generate(exact_model, strategy, PROMPTS, do_sample=True, seed=[4, 5, 6], num_return_sequences=3)

    engine = LoopEngine(exact_model)
    ours, theirs = chains(None), chains(engine)
    a, b = ours.alignment["trace"], theirs.alignment["trace"]
    assert engine.calls == 7  # state 0, then one call per step for every chain of every prompt
    assert a["states"] == b["states"] and all(torch.equal(x, y) for x, y in zip(a["indices"], b["indices"]))
    assert torch.equal(a["accepted"], b["accepted"]) and torch.equal(a["rewards"], b["rewards"])
    assert 0 < float(a["accepted"][1:].float().mean()) < 1  # the chains moved, and not always
    assert torch.equal(ours.sequences, theirs.sequences)
    assert b["forward_tokens"] > a["forward_tokens"]  # from scratch recomputes the kept prefixes
    assert QAlign(IdReward(), engine=engine).hyperparameters()["engine"] == "loop"
    assert "engine" not in QAlign(IdReward()).hyperparameters()


def same_chains(a, b):
    """Two QAlign traces are the same chains: every state, cut, proposal, reward and acceptance."""
    assert a["states"] == b["states"] and a["proposals"] == b["proposals"]
    for sa, sb in zip(a["state_logprobs"], b["state_logprobs"], strict=True):  # NaN where vLLM reports none
        assert all(len(x) == len(y) and torch.allclose(torch.tensor(x), torch.tensor(y), rtol=0, atol=0, equal_nan=True)
                   for x, y in zip(sa, sb, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a["indices"], b["indices"]))
    assert all(torch.equal(x, y) for x, y in zip(a["proposal_rewards"], b["proposal_rewards"]))
    assert torch.equal(a["accepted"], b["accepted"]) and torch.equal(a["rewards"], b["rewards"])


class SpreadReward(SequenceReward):
    """A reward of token ids with few ties, 3 * (position-weighted sum of the ids mod 7): chains climb to
    high values and then mostly reject (acceptance about 0.3 here), where pre-fetching has work to do."""

    name = "spread"

    def score_ids(self, prompt_ids, completion_ids):
        return torch.tensor([float(3 * (sum((i + 1) * t for i, t in enumerate(c)) % 7)) for c in completion_ids])

    def _score(self, prompts, completions):
        raise AssertionError("this reward reads token ids")


@pytest.mark.parametrize("length_cap", ["response", "suffix"])
def test_prefetched_qalign_proposals_give_the_one_step_chains(exact_model, length_cap):
    """Pre-fetching draws each chain's next proposals on the all-rejected branch in one engine call: the
    chains must be exactly those drawn one step at a time (and in process), in fewer engine calls, with
    proposals both used after a rejection and discarded after an acceptance."""
    def run(engine, prefetch):
        strategy = QAlign(SpreadReward(), beta=1.0, steps=7, chains=3, engine=engine, prefetch=prefetch,
                          length_cap=length_cap)
        return generate(exact_model, strategy, PROMPTS, do_sample=True, seed=[4, 5, 6], num_return_sequences=3)

    in_process = run(None, 1)
    for prefetch in (2, 3, 8):
        engine = LoopEngine(exact_model)
        out = run(engine, prefetch)
        tr = out.alignment["trace"]
        same_chains(in_process.alignment["trace"], tr)
        assert torch.equal(in_process.sequences, out.sequences)
        accepted = tr["accepted"][1:]
        assert 0 < float(accepted.float().mean()) < 1
        # State 0, then fewer calls than the 7 steps: every chain used a pre-fetched proposal after a
        # rejection somewhere.
        assert 1 < engine.calls < 8
        # Each call, a chain's proposals after its first accepted one are drawn and discarded.
        assert tr["discarded_proposals"] > 0
        assert out.alignment["trace"]["forward_tokens"] > 0
    assert QAlign(IdReward(), engine=engine, prefetch=3).hyperparameters()["prefetch"] == 3
    assert not QAlign(IdReward(), engine=engine, prefetch=3).pipeline
    assert in_process.alignment["trace"]["discarded_proposals"] is None


@pytest.mark.parametrize("kwargs,message", [
    ({"prefetch": 0}, "prefetch .* must be an integer >= 1, got 0"),
    ({"prefetch": 2.0}, "prefetch .* must be an integer >= 1, got 2.0"),
    ({"prefetch": True}, "prefetch .* must be an integer >= 1, got True"),
    ({"prefetch": 2, "pipeline": True}, "does not combine with pipeline=True"),
])
def test_qalign_prefetch_is_checked(exact_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        QAlign(IdReward(), engine=LoopEngine(exact_model), **kwargs)
    with pytest.raises(ValueError, match="prefetch=3 needs an engine"):
        QAlign(IdReward(), prefetch=3)


def test_transfer_q_rollouts_through_a_backend_are_the_same_rollouts(exact_model):
    def run(engine):
        strategy = TransferQ(exact_model, IdReward(), k=3, rollout_len=3, num_rollouts=2, rollout_sampling="sample",
                             rollout_temperature=0.8, alpha=2.0, trace_rollouts=True, engine=engine)
        return generate(exact_model, strategy, PROMPTS, max_new_tokens=5, do_sample=True, seed=[1, 2, 3])

    engine = LoopEngine(exact_model)
    ours, theirs = run(None), run(engine)
    assert engine.calls == 5  # one call per decoding step, every row and candidate together
    assert ours.alignment["trace"] == theirs.alignment["trace"]
    assert torch.equal(ours.sequences, theirs.sequences)
    assert ours.alignment["rollouts"] == theirs.alignment["rollouts"] > 0


def test_strategies_check_their_backend(exact_model):
    tok = tiny_tokenizer()
    for build in (lambda b: BestOfN(IdReward(), engine=b), lambda b: QAlign(IdReward(), engine=b),
                  lambda b: TransferQ(exact_model, IdReward(), engine=b)):
        with pytest.raises(TypeError, match="SamplingEngine"):
            build("vllm")
    proposal = GenARM(PromptedARM(exact_model, tok, "Be kind."), beta=1.0)
    with pytest.raises(ValueError, match="proposal='genarm' runs in process only"):
        BestOfN(IdReward(), proposal=proposal, engine=LoopEngine(exact_model))


def test_the_old_backend_names_work_for_one_release_with_a_warning(exact_model, cli_files):
    import align_decode.serving.engines as engines

    with pytest.warns(DeprecationWarning, match="VLLMBackend is now VLLMEngine"):
        assert engines.VLLMBackend is engines.VLLMEngine
    loop = LoopEngine(exact_model)
    with pytest.warns(DeprecationWarning, match="backend= is now engine="):
        assert QAlign(IdReward(), backend=loop).engine is loop
    with pytest.raises(ValueError, match="not both"):
        BestOfN(IdReward(), engine=loop, backend=loop)
    # --backend is --engine's old name, on the command line and as a config key.
    config = cli_files.root / "old.toml"
    config.write_text('backend = "vllm"\n')
    for extra in (["--backend", "vllm"], ["--config", str(config)]):
        result = invoke("run", "--model", cli_files.policy, "--prompts", cli_files.prompts, "--out",
                        cli_files.root / "old.jsonl", "--method", "sample", "--reward", "none", *extra)
        assert_one_line_error(result, "--engine vllm does not apply to method 'sample'")


def test_engine_generate_needs_only_the_backend(exact_model):
    engine = LoopEngine(exact_model)
    strategy = BestOfN(IdReward(), n=3, engine=engine)
    common = dict(max_new_tokens=6, do_sample=True, seed=[7, 8, 9])
    out = engine_generate(strategy, engine, PROMPTS, eos_token_id=EOS, pad_token_id=PAD, top_k=0, **common)
    # The same as through AlignedModel with a loaded model: the policy's weights were never needed.
    loaded = generate(exact_model, strategy, PROMPTS, **common).alignment
    assert out.extras["candidates"] == loaded["candidates"] and out.extras["seeds"] == loaded["seeds"]
    for b, cands in enumerate(out.extras["candidates"]):
        assert out.extras["chosen"][b] == [first_best(out.extras["rewards"][b])]
        assert out.tokens[b, : out.lengths[b]].tolist() == cands[out.extras["chosen"][b][0]]
    with pytest.raises(ValueError, match="must be built with engine"):
        engine_generate(BestOfN(IdReward(), n=3), engine, PROMPTS, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="weights live in an engine"):
        EnginePolicy(tiny_tokenizer()).start(PromptBatch(*left_pad(PROMPTS, PAD)))


def test_importing_align_decode_and_its_backends_does_not_import_vllm():
    # In a fresh interpreter: other tests in this process may have imported vLLM themselves.
    code = ("import sys, align_decode, align_decode.cli, align_decode.commandline.run, align_decode.serving.engines; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    prompts = write_jsonl(root / "prompts.jsonl", [{"id": "a", "prompt": "w1 w2 w3"}, {"id": "b", "prompt": "w4 w5"}])
    return SimpleNamespace(root=root, policy=save_model(root / "policy", seed=0), prompts=prompts)


@pytest.mark.parametrize("args,fragments", [
    (["--method", "genarm", "--engine", "vllm"],
     ["--engine vllm does not apply to method 'genarm'",
      "beam_search, best_of_n, dvts, particle_filter, pruned_best_of_n, qalign, transfer_q"]),
    (["--method", "sample", "--engine", "vllm"], ["does not apply to method 'sample'"]),
    (["--method", "best_of_n", "--tensor-parallel-size", "2"], ["--tensor-parallel-size", "needs --engine vllm"]),
    (["--method", "qalign", "--engine", "vllm", "--gpu-memory-utilization", "1.5"],
     ["--gpu-memory-utilization must be a number in (0, 1], got 1.5"]),
    (["--method", "qalign", "--engine", "vllm", "--max-model-len", "0"], ["--max-model-len must be an integer >= 1, got 0"]),
    (["--method", "qalign", "--enforce-eager"], ["--enforce-eager", "needs --engine vllm"]),
])
def test_the_command_refuses_what_the_backend_cannot_do_in_one_line(cli_files, args, fragments):
    result = invoke("run", "--model", cli_files.policy, "--prompts", cli_files.prompts,
                    "--out", cli_files.root / "refused.jsonl", "--reward", "length:target=2", *args)
    assert_one_line_error(result, *fragments)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_install_it(cli_files):
    result = invoke("run", "--model", cli_files.policy, "--prompts", cli_files.prompts,
                    "--out", cli_files.root / "none.jsonl", "--method", "best_of_n", "--engine", "vllm")
    assert_one_line_error(result, "--engine vllm needs vLLM", "pip install")


# ---------------------------------------------------------------------------------- real vLLM (CPU)
@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: seconds to start, not ~30
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield mp


@pytest.fixture(scope="module")
def engine(vllm_env, tmp_path_factory):
    from transformers import AutoTokenizer

    from align_decode.serving.engines import VLLMEngine
    from vllm_support import load, save_models

    path = save_models(tmp_path_factory.mktemp("vllm-engine"))["policy"]
    # block_size 32 (the CPU minimum) so that LONG's prefix fills a cacheable block.
    engine = VLLMEngine(path, dtype="float32", max_model_len=128, max_num_seqs=64, enforce_eager=True, block_size=32)
    yield SimpleNamespace(engine=engine, model=load(path), tokenizer=AutoTokenizer.from_pretrained(path), path=path)
    engine.close()


@pytest.mark.vllm
def test_best_of_n_draws_n_seeded_candidates_and_returns_the_first_best(engine):
    from align_decode.decoding import GenerationSettings

    out = generate(engine.model, BestOfN(IdReward(), n=6, engine=engine.engine), PROMPTS, do_sample=True,
                   seed=[11, 12, 13])
    al = out.alignment
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, stop_ids=(EOS,), pad_id=PAD)
    tied = False
    for b, prompt in enumerate(PROMPTS):
        cands, seeds, rewards = al["candidates"][b], al["seeds"][b], al["rewards"][b]
        assert len(cands) == 6 and seeds == [seeds[0] + j for j in range(6)]
        assert len({tuple(c) for c in cands}) > 1  # distinct draws
        # Each candidate is exactly what its seed draws for the prompt alone.
        alone = engine.engine.generate([prompt] * 6, 8, settings, seeds).flat()
        assert [c.tokens for c in alone] == cands
        assert rewards.tolist() == IdReward().score_ids(None, cands).tolist()
        chosen = first_best(rewards)
        tied |= rewards.tolist().count(max(rewards.tolist())) > 1
        assert al["chosen"][b] == [chosen]
        row = out.sequences[b, out.sequences.shape[1] - al["lengths"][b].item():]
        assert al["lengths"][b] == len(cands[chosen]) and row.tolist() == cands[chosen]
    assert tied  # the first-index rule was exercised


@pytest.mark.vllm
def test_greedy_best_of_n_and_rollouts_equal_the_in_process_backend(engine):
    def bon(sampler):
        return generate(engine.model, BestOfN(IdReward(), n=3, engine=sampler), PROMPTS + [LONG], do_sample=False,
                        max_new_tokens=12)

    ours, theirs = bon(None), bon(engine.engine)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert ours.alignment["candidates"] == theirs.alignment["candidates"]

    def tq(sampler):
        strategy = TransferQ(engine.model, IdReward(), baseline_tokenizer=engine.tokenizer, k=4, rollout_len=5,
                             alpha=3.0, trace_rollouts=True, engine=sampler)
        return generate(engine.model, strategy, PROMPTS, do_sample=False, max_new_tokens=6)

    ours, theirs = tq(None), tq(engine.engine)
    assert ours.alignment["trace"] == theirs.alignment["trace"]  # every rollout, reward and Q
    assert torch.equal(ours.sequences, theirs.sequences)
    # Q moved the choice away from the prior's greedy path somewhere: the rollouts mattered.
    plain = generate(engine.model, None, PROMPTS, do_sample=False, max_new_tokens=6)
    assert not torch.equal(plain.sequences, theirs.sequences)


@pytest.mark.vllm
def test_a_prompt_gets_the_same_result_in_a_batch_as_alone(engine):
    prompts, seeds = PROMPTS + [LONG], [21, 22, 23, 24]
    for strategy in (BestOfN(IdReward(), n=4, engine=engine.engine),
                     QAlign(IdReward(), beta=0.5, steps=3, chains=2, engine=engine.engine)):
        m = 2 if isinstance(strategy, QAlign) else 1
        together = generate(engine.model, strategy, prompts, do_sample=True, seed=seeds, num_return_sequences=m)
        for b, (prompt, seed) in enumerate(zip(prompts, seeds)):
            alone = generate(engine.model, strategy, [prompt], do_sample=True, seed=[seed], num_return_sequences=m)
            got, want = together.alignment, alone.alignment
            if isinstance(strategy, QAlign):
                assert [s[2 * b:2 * b + 2] for s in got["trace"]["states"]] == want["trace"]["states"]
            else:
                assert got["candidates"][b] == want["candidates"][0] and got["seeds"][b] == want["seeds"][0]


@pytest.mark.vllm
def test_qalign_chain_bookkeeping_and_prefix_caching(engine):
    steps, chains, cap = 6, 3, 8
    out = generate(engine.model, QAlign(IdReward(), beta=0.5, steps=steps, chains=chains, engine=engine.engine),
                   [LONG], do_sample=True, seed=[3], max_new_tokens=cap, num_return_sequences=chains)
    tr = out.alignment["trace"]
    assert bool(tr["accepted"][0].all()) and 0 < float(tr["accepted"][1:].float().mean()) < 1
    for k in range(1, steps + 1):
        for c in range(chains):
            prop, prev, now = tr["proposals"][k - 1][c], tr["states"][k - 1][c], tr["states"][k][c]
            assert now == (prop if tr["accepted"][k, c] else prev)
            cut = int(tr["indices"][k - 1][c])
            assert prop[:cut] == prev[:cut] and cut < len(prop) <= cap and 0 <= cut < len(prev)
            assert prop[-1] == EOS or len(prop) == cap  # a proposal ends at a stop or at the cap
            assert float(tr["rewards"][k, c]) == float(IdReward().score_ids(None, [now])[0])
    # Every step resubmits the 41-token prompt plus the kept prefix: its first block comes from the cache.
    assert tr["cached_tokens"] >= steps * chains * 32
    for c in range(chains):
        n = int(out.alignment["lengths"][c])
        assert out.sequences[c, len(LONG):len(LONG) + n].tolist() == tr["states"][-1][c]


@pytest.mark.vllm
def test_prefetched_qalign_on_vllm_gives_the_one_step_chains(engine):
    def run(prefetch, length_cap):
        strategy = QAlign(IdReward(), beta=0.5, steps=6, chains=3, engine=engine.engine, prefetch=prefetch,
                          pipeline=False, length_cap=length_cap)
        return generate(engine.model, strategy, PROMPTS + [LONG], do_sample=True, seed=[1, 2, 3, 4],
                        num_return_sequences=3)

    for cap in ("response", "suffix"):
        one = run(1, cap)
        for prefetch in (2, 4):
            out = run(prefetch, cap)
            same_chains(one.alignment["trace"], out.alignment["trace"])
            assert torch.equal(one.sequences, out.sequences)
            tr = out.alignment["trace"]
            assert 0 < float(tr["accepted"][1:].float().mean()) < 1 and tr["discarded_proposals"] > 0
            assert tr["cached_tokens"] >= 6 * 3 * 32  # LONG's chains still hit the prefix cache every step


VOCAB, CAP, PROMPT = 4, 3, [3, 2]


@pytest.mark.vllm
@pytest.mark.parametrize("prefetch", [1, 4])
def test_qalign_through_vllm_samples_the_target_law(vllm_env, tmp_path, prefetch):
    """On an enumerable model (vocab 4, responses of at most 3 tokens), state 0 follows p and the long-run
    state frequencies follow p * exp(r / beta): vLLM's sampler has our law even where its draws differ.
    prefetch=1 runs the pipelined chains (the default with the response cap), 4 lockstep chains with
    pre-fetched proposals."""
    from align_decode.serving.engines import VLLMEngine

    policy = tiny_llama(VOCAB, seed=51, init=0.1)
    policy.save_pretrained(tmp_path / "v4")
    law = response_law(policy, PROMPT, CAP, EOS)
    states = sorted(law)
    g = torch.Generator().manual_seed(5)
    table = {y: float(v) for y, v in zip(states, torch.randn(len(states), generator=g))}
    weights = torch.tensor([law[y] * math.exp(table[y]) for y in states], dtype=torch.float64)  # beta = 1
    target = dict(zip(states, (weights / weights.sum()).tolist()))
    assert 0.5 * sum(abs(law[y] - target[y]) for y in states) > 0.3  # the target is far from p

    engine = VLLMEngine(tmp_path / "v4", dtype="float32", max_model_len=16, max_num_seqs=256, enforce_eager=True,
                          skip_tokenizer_init=True)
    try:
        chains, steps, burn_in = 500, 30, 10
        strategy = QAlign(TableReward(table), beta=1.0, steps=steps, chains=chains, engine=engine, prefetch=prefetch)
        assert strategy.pipeline == (prefetch == 1)
        out = engine_generate(strategy, engine, [PROMPT], max_new_tokens=CAP, do_sample=True, top_k=0,
                              eos_token_id=EOS, pad_token_id=PAD, seed=11, num_return_sequences=chains)
    finally:
        engine.close()
    trace = out.extras["trace"]
    first = collections.Counter(tuple(y) for y in trace["states"][0])
    assert chi_square_p(first, law, chains) > 1e-3
    visits = collections.Counter(tuple(y) for s in trace["states"][burn_in:] for y in s)
    total = sum(visits.values())
    tv = 0.5 * sum(abs(visits.get(y, 0) / total - target[y]) for y in states)
    assert tv < 0.06, tv
    assert (trace["discarded_proposals"] or 0) > 0 if prefetch > 1 else trace["discarded_proposals"] is None


@pytest.mark.vllm
def test_the_command_runs_best_of_n_qalign_and_transfer_q_on_vllm(engine, cli_files, tmp_path):
    common = ["--reward", "length:target=3", "--max-model-len", "64", "--enforce-eager"]
    bon = run_ok(str(engine.path), cli_files.prompts, tmp_path / "bon.jsonl", "--method", "best_of_n", "--n", "4",
                 "--engine", "vllm", *common)
    for line in bon:
        assert line["hyperparameters"]["engine"] == "vllm" and len(line["candidates"]) == 4
        rewards = [c["rewards"]["length:target=3"] for c in line["candidates"]]
        assert line["chosen"] == first_best(rewards) and line["rewards"]["length:target=3"] == max(rewards)
    # Greedy decoding agrees across engines, for best-of-N and for Transfer Q*'s rollouts.
    for method in (["best_of_n", "--n", "1"], ["transfer_q", "--candidate-tokens", "3", "--rollout-len", "3"]):
        greedy = {}
        for kind in ("hf", "vllm"):
            eager = ["--enforce-eager"] if kind == "vllm" else []
            lines = run_ok(str(engine.path), cli_files.prompts, tmp_path / f"{method[0]}-{kind}.jsonl", "--method",
                           *method, "--temperature", "0", "--engine", kind, "--reward", "length:target=3", *eager)
            greedy[kind] = [(line["completion"], line["hyperparameters"].get("engine")) for line in lines]
        assert [(c, "vllm") for c, _ in greedy["hf"]] == greedy["vllm"]
    qalign = run_ok(str(engine.path), cli_files.prompts, tmp_path / "qalign.jsonl", "--method", "qalign", "--steps",
                    "3", "--n", "2", "--engine", "vllm", *common)
    for line in qalign:
        assert line["hyperparameters"]["engine"] == "vllm" and len(line["candidates"]) == 2
        assert len(line["extras"]["acceptance_rate"]) == 2


# ------------------------------------------------------------------ step-level search on an engine
class _PrefixFormula(TableReward):
    """(3 * sum + length) mod 4 of the token ids, defined on partial responses too."""

    def __init__(self):
        super().__init__({})

    def score_ids(self, prompt_ids, completion_ids):
        return torch.tensor([float((3 * sum(c) + len(c)) % 4) for c in completion_ids])


def _search_law_case(search_engine, trials: int):
    from align_decode import StepBeamSearch
    from align_decode.rewards.process import PrefixReward

    policy = tiny_llama(5, seed=41, init=0.5, dtype=torch.float64)
    law = response_law(policy, [3, 4], 2, EOS)
    rewards = {y: float((3 * sum(y) + len(y)) % 4) for y in law}
    engine = search_engine(policy)
    search = StepBeamSearch(PrefixReward(_PrefixFormula()), n=3, beam_width=1, step_delimiter=None, step_tokens=1,
                            engine=engine)
    out = AlignedModel(policy, strategy=search).generate(
        input_ids=torch.tensor([[3, 4]]).expand(trials, -1), max_new_tokens=2, do_sample=True, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD, seed=list(range(trials)), return_dict_in_generate=True)
    a = out.alignment
    counts = collections.Counter(tuple(a["candidates"][r][a["chosen"][r][0]]) for r in range(trials))
    return chi_square_p(counts, bon_law(law, rewards, 3), trials), out, engine


def test_step_search_through_an_engine_keeps_the_law():
    """Beam search with nothing pruned, its steps drawn by an engine: still the exact best-of-n law."""
    p, out, engine = _search_law_case(LoopEngine, 1500)
    assert p > 1e-3
    assert engine.calls == out.alignment["rounds"] and out.alignment["forward_tokens"] > 0


def test_particle_filter_and_pruned_best_of_n_through_an_engine(exact_model):
    from align_decode import ParticleFilter, PrunedBestOfN

    engine = LoopEngine(exact_model)
    pf = ParticleFilter(_PrefixFormula(), n=4, step_delimiter=None, step_tokens=3, engine=engine)
    out = generate(exact_model, pf, PROMPTS, do_sample=True, seed=[1, 2, 3])
    a = out.alignment
    for b in range(3):
        chosen = a["candidates"][b][a["chosen"][b][0]]
        assert out.sequences[b, 5:5 + len(chosen)].tolist() == chosen  # after the left-padded prompts
        assert len(a["log_weights"][b]) == 4
    pruned = PrunedBestOfN(IdReward(), n=6, prune_at=(3,), keep_fraction=0.5, engine=engine)
    out = generate(exact_model, pruned, PROMPTS, do_sample=True, seed=[1, 2, 3])
    for b in range(3):
        assert sum(p is None for p in out.alignment["pruned_at"][b]) == 3
        assert out.alignment["chosen"][b][0] in [j for j, p in enumerate(out.alignment["pruned_at"][b]) if p is None]
    with pytest.raises(ValueError, match="an engine samples the policy itself"):
        PrunedBestOfN(IdReward(), engine=engine, proposal=Sample())


@pytest.mark.vllm
def test_step_search_through_vllm_keeps_the_law(vllm_env, tmp_path):
    """Beam search with nothing pruned, its steps drawn by vLLM (one request per path and step, the prompt
    and path resubmitted): the exact best-of-n law."""
    from align_decode.serving.engines import VLLMEngine

    def build(policy):
        policy.save_pretrained(tmp_path / "v5")
        return VLLMEngine(tmp_path / "v5", dtype="float32", max_model_len=16, max_num_seqs=256, enforce_eager=True,
                          skip_tokenizer_init=True)

    p, out, engine = _search_law_case(build, 1500)
    engine.close()
    assert p > 1e-3
    assert out.alignment["forward_tokens"] > 0


@pytest.mark.vllm
def test_the_command_runs_the_searches_on_vllm(engine, cli_files, tmp_path):
    common = ["--reward", "length:target=3", "--max-model-len", "64", "--enforce-eager", "--temperature", "1.0"]
    for method, extra in (("particle_filter", ["--step-tokens", "2"]), ("pruned_best_of_n", ["--prune-at", "2"])):
        lines = run_ok(str(engine.path), cli_files.prompts, tmp_path / f"{method}.jsonl", "--method", method,
                       "--n", "4", "--engine", "vllm", *common, *extra)
        for line in lines:
            assert line["completion"] == line["candidates"][line["chosen"]]["text"]
            assert line["hyperparameters"]["engine"] == "vllm"
