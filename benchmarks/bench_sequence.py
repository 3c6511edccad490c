"""Sequence-level methods' speed: best-of-N sampling and QAlign's prefix reuse.

1. Best-of-N candidates per second (before scoring) against model.generate(num_return_sequences=N):
   both sample N full-length candidates per prompt (EOS set to a token SmolLM2 never emits here).
2. QAlign with prefix reuse (each chain keeps its KV cache; a proposal continues a cut-back copy)
   against regenerating (prompt and kept prefix re-run from scratch each step, like calling generate()
   again). Both run the same chains (same seeds): the drawn tokens agree until a float32 rounding
   difference flips an inverse-CDF draw to a neighbouring token (reported; see `chain_agreement`).
   Reported per MH step: wall time and token positions run through the model.

    python benchmarks/bench_sequence.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from align_decode import AlignedModel, QAlign, Sample
from align_decode.decoding import GenerationSettings, Policy, PromptBatch
from align_decode.decoding.candidates import sample_candidates
from align_decode.models import load_model
from align_decode.rewards import SentimentReward

from chat_prompts import PROMPTS  # beside this script

NEVER = 49151


def _encode(tok, n):
    tok.padding_side = "left"
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    return tok.apply_chat_template(chats, add_generation_prompt=True, return_dict=True, return_tensors="pt",
                                   padding=True)


def bench_best_of_n(model, tok, prompts, n, tokens, repeats):
    enc = _encode(tok, prompts)
    batch = PromptBatch(enc["input_ids"], enc["attention_mask"])
    settings = GenerationSettings(max_new_tokens=tokens, do_sample=True, top_k=0, stop_ids=(NEVER,),
                                  pad_id=tok.pad_token_id, seeds=torch.arange(prompts))
    policy = Policy(model, tok)
    ours = lambda: sample_candidates(Sample(), policy, batch, settings, n, max_rows=prompts * n)  # noqa: E731
    hf = lambda: model.generate(**enc, max_new_tokens=tokens, do_sample=True, top_k=0,  # noqa: E731
                                num_return_sequences=n, eos_token_id=NEVER, pad_token_id=tok.pad_token_id)
    ours(), hf()  # warm-up
    times = {"model.generate(num_return_sequences=N)": [], "BestOfN candidates": []}
    for _ in range(repeats):
        for name, fn in (("model.generate(num_return_sequences=N)", hf), ("BestOfN candidates", ours)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            rows = out.shape[0] if torch.is_tensor(out) else out.tokens.shape[0]
            assert rows == prompts * n
    return {k: prompts * n / statistics.median(v) for k, v in times.items()}


def bench_qalign(model, tok, chains_prompts, chains, steps, tokens, repeats):
    enc = _encode(tok, chains_prompts)
    reward = SentimentReward()
    results = {}
    runs = {}
    for _ in range(repeats):
        for reuse in (False, True):
            aligned = AlignedModel(model, tokenizer=tok, strategy=QAlign(reward, beta=0.5, steps=steps, chains=chains,
                                                                         reuse_prefix=reuse))
            base = AlignedModel(model, tokenizer=tok, strategy=QAlign(reward, beta=0.5, steps=0, chains=chains,
                                                                      reuse_prefix=reuse))
            kw = dict(**enc, max_new_tokens=tokens, do_sample=True, top_k=0, seed=list(range(chains_prompts)),
                      return_dict_in_generate=True)
            t0 = time.perf_counter()
            start = base.generate(**kw)
            t1 = time.perf_counter()
            out = aligned.generate(**kw)
            t2 = time.perf_counter()
            tr, tr0 = out.alignment["trace"], start.alignment["trace"]
            runs.setdefault(reuse, []).append(((t2 - t1) - (t1 - t0), tr["forward_tokens"] - tr0["forward_tokens"], tr))
    results["_agreement"] = chain_agreement(runs[False][0][2], runs[True][0][2])
    tr = runs[True][0][2]
    new_tokens = sum(len(p) - int(c) for props, cuts in zip(tr["proposals"], tr["indices"]) for p, c in zip(props, cuts.tolist()))
    for reuse in (False, True):
        wall = statistics.median(r[0] for r in runs[reuse]) / steps
        fwd = runs[reuse][0][1] / steps
        results["prefix reuse" if reuse else "regenerate"] = (wall, fwd)
    results["_suffix_tokens_per_step"] = new_tokens / steps
    results["_acceptance"] = float(tr["acceptance_rate"].mean())
    return results


def chain_agreement(a: dict, b: dict) -> dict:
    """How far two traces of the same chains (same seeds) agree: the share of chain states that are
    identical, and the largest difference of the per-token policy log-probs over the tokens both states
    share from the start.

    Reusing the cache and recomputing from scratch give the same logits up to float32 rounding (other
    matmul shapes and padding), about 1e-6. An inverse-CDF draw whose uniform falls that close to the
    boundary between two tokens can take the neighbour instead, and the chains then go apart: rare per
    token, but likely somewhere over thousands of 49152-way draws. A wrong cache would show up as large
    log-prob differences on the shared tokens instead; the benchmark stops on those."""
    same = total = 0
    worst = 0.0
    for states_a, states_b, lps_a, lps_b in zip(a["states"], b["states"], a["state_logprobs"], b["state_logprobs"]):
        for ya, yb, la, lb in zip(states_a, states_b, lps_a, lps_b):
            total += 1
            same += ya == yb
            shared = next((i for i, (x, y) in enumerate(zip(ya, yb)) if x != y), min(len(ya), len(yb)))
            worst = max([worst] + [abs(x - y) for x, y in zip(la[:shared], lb[:shared])])
    if worst > 1e-3:
        raise AssertionError(f"prefix reuse changed the policy's log-probs of shared tokens by {worst:.2e}")
    return {"identical": same / total, "max_logprob_diff": worst}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bon-n", type=int, default=16)
    p.add_argument("--bon-prompts", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--qalign-prompts", type=int, default=4)
    p.add_argument("--qalign-chains", type=int, default=2)
    p.add_argument("--qalign-steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    print(f"threads={args.threads}, repeats={args.repeats} (median), torch {torch.__version__}\n")
    print(f"Best-of-N sampling, N={args.bon_n}, {args.tokens} new tokens per candidate\n")
    print("| prompts | model.generate(num_return_sequences=N) samples/s | BestOfN candidates samples/s | ratio |")
    print("|---|---|---|---|")
    for prompts in args.bon_prompts:
        r = bench_best_of_n(model, tok, prompts, args.bon_n, args.tokens, args.repeats)
        hf, ours = r["model.generate(num_return_sequences=N)"], r["BestOfN candidates"]
        print(f"| {prompts} | {hf:.2f} | {ours:.2f} | {ours / hf:.2f}x |")
    q = bench_qalign(model, tok, args.qalign_prompts, args.qalign_chains, args.qalign_steps, args.tokens, args.repeats)
    print(f"\nQAlign, {args.qalign_prompts} prompts x {args.qalign_chains} chains, {args.qalign_steps} steps, "
          f"max_new_tokens={args.tokens}, sentiment reward, beta=0.5; mean new suffix tokens per chain-step "
          f"{q['_suffix_tokens_per_step'] / (args.qalign_prompts * args.qalign_chains):.1f}, acceptance {q['_acceptance']:.2f}; "
          f"chain states identical between the two variants: {q['_agreement']['identical']:.0%}, largest policy "
          f"log-prob difference on shared tokens {q['_agreement']['max_logprob_diff']:.1e}\n")
    print("| variant | wall s / step | token positions forwarded / step | wall vs regenerate |")
    print("|---|---|---|---|")
    base_wall = q["regenerate"][0]
    for name in ("regenerate", "prefix reuse"):
        wall, fwd = q[name]
        print(f"| {name} | {wall:.3f} | {fwd:.0f} | {wall / base_wall:.2f}x |")


if __name__ == "__main__":
    main()
