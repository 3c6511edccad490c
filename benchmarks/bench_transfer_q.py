"""Transfer Q* speed: rollouts batched on forked KV caches against the official code's pattern.

Both variants decode greedily with SmolLM2-135M-Instruct as prior and baseline, k candidates per step,
one greedy rollout of H tokens per candidate, scored by the VADER sentiment reward on text:

- official pattern: for each candidate, `model.generate()` from scratch on the full prefix + candidate
  (max_new_tokens=H, greedy), decode, score the text; one reward call per candidate. The prior's own
  forward keeps a KV cache (generous to the baseline: the official loop does no better).
- align-decode: `TransferQ` through `AlignedModel.generate()`: per step, the baseline's prefix cache is
  forked k times and all k rollouts run as one batched decode; one reward call over the k texts.

EOS is set to a token the model never emits here, so every variant generates exactly the same number of
tokens (rollouts all H long). Variants alternate within each repeat (the order flips every repeat) so
machine noise hits both alike; medians over repeats and prompts are reported, with how many generated
tokens the two variants agreed on.

The "short" context is single-turn chat prompts (~36 tokens); "long" is a multi-turn dialogue (~250
tokens), the prefix size of HH-RLHF prompts, which the official pattern runs again for every candidate.

    python benchmarks/bench_transfer_q.py --threads 1 --tokens 4 --repeats 3 --prompts 1 --contexts short long
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from align_decode import AlignedModel, TransferQ
from align_decode.models import load_model
from align_decode.rewards import SentimentReward
from align_decode.transformers_compat import forward_with_cache

PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of rainy days?",
    "Write a note to a friend who moved away.",
    "Describe your favourite meal.",
]
# A multi-turn conversation (~250 tokens with the chat template), the size of an HH-RLHF dialogue: the
# prefix every from-scratch rollout runs again.
DIALOGUE = [
    ("user", "Hi! I am planning a trip to the mountains next month with two friends, and none of us has "
             "hiked much before. We want to stay three days. Where should we start with the planning?"),
    ("assistant", "That sounds like a lovely trip! Start with the route: pick trails marked easy or moderate, "
                  "check how long each takes, and plan shorter days than you think you need. Then look at "
                  "where you will sleep, whether huts need booking, and what the weather usually is then."),
    ("user", "Good points. One of my friends is worried about the weather changing quickly up there, and "
             "the other one does not own proper boots yet. What gear is really essential for beginners?"),
    ("assistant", "Essentials are broken-in hiking boots, layers you can add or remove, a waterproof jacket, "
                  "a map and a charged phone, a small first-aid kit, sun protection, and plenty of water "
                  "and snacks. Your friend should buy boots soon and wear them on a few walks before."),
    ("user", "Thanks. Last question: how do we keep everyone motivated if the hike gets hard?"),
]
CONTEXTS = {
    "short": [[{"role": "user", "content": text}] for text in PROMPTS],
    "long": [[{"role": role, "content": text} for role, text in DIALOGUE]],
}
NEVER = 49151  # a token SmolLM2 does not emit in these runs: every variant generates the full length


@torch.no_grad()
def official_pattern(model, tok, reward, prompt_ids, prompt_text, tokens, k, horizon, alpha):
    """The released code's step, batch size 1: top-k of the prior's logits, then per candidate one
    from-scratch generate() of H greedy tokens and one reward call; take argmax(logit + alpha * r)."""
    ids = prompt_ids
    out, cache = forward_with_cache(model, None, input_ids=ids)
    logits = out.logits[0, -1].float()
    generated = []
    for _ in range(tokens):
        top = logits.topk(k)
        scores = []
        for logit, cand in zip(top.values.tolist(), top.indices.tolist()):
            seq = torch.cat([ids, torch.tensor([[cand]])], dim=1)
            rollout = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), max_new_tokens=horizon,
                                     do_sample=False, eos_token_id=NEVER, pad_token_id=tok.pad_token_id)
            text = tok.decode(rollout[0, prompt_ids.shape[1]:], skip_special_tokens=True)
            scores.append(logit + alpha * float(reward.score([prompt_text], [text])[0]))
        chosen = top.indices[max(range(k), key=scores.__getitem__)].view(1, 1)
        generated.append(int(chosen))
        ids = torch.cat([ids, chosen], dim=1)
        out, cache = forward_with_cache(model, cache, input_ids=chosen)
        logits = out.logits[0, -1].float()
    return generated


def bench_context(args, model, tok, reward, aligned, name):
    encoded = []
    for chat in CONTEXTS[name][: args.prompts]:
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        encoded.append((tok(text, return_tensors="pt", add_special_tokens=False).input_ids, text))

    def ours(ids, text):
        out = aligned.generate(input_ids=ids, max_new_tokens=args.tokens, do_sample=False, eos_token_id=NEVER,
                               pad_token_id=tok.pad_token_id, prompt_texts=[text], return_dict_in_generate=True)
        return out.sequences[0, ids.shape[1]:].tolist(), out.alignment

    def official(ids, text):
        return official_pattern(model, tok, reward, ids, text, args.tokens, args.k, args.horizon, args.alpha), None

    variants = {"official pattern": official, "align-decode (forked, batched)": ours}
    times = {v: [] for v in variants}
    outputs: dict = {}
    accounting = None
    for rep in range(args.repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for p, (ids, text) in enumerate(encoded):
            for v in order:
                t0 = time.perf_counter()
                tokens, extras = variants[v](ids, text)
                times[v].append((time.perf_counter() - t0) / len(tokens))
                outputs[(v, p)] = tokens
                accounting = extras or accounting
                assert len(tokens) == args.tokens

    agree = sum(a == b for p in range(len(encoded))
                for a, b in zip(outputs[("official pattern", p)], outputs[("align-decode (forked, batched)", p)]))
    lengths = "/".join(str(ids.shape[1]) for ids, _ in encoded)
    print(f"\n## {name} context: prompt(s) of {lengths} tokens, {args.tokens} tokens x {len(encoded)} prompt(s) "
          f"x {args.repeats} repeat(s)")
    print("| variant | median s / token | min | max | speed-up (medians) |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["official pattern"])
    for v, ts in times.items():
        med = statistics.median(ts)
        print(f"| {v} | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | {base / med:.1f}x |")
    print(f"generated tokens identical in both variants: {agree}/{args.tokens * len(encoded)}")
    keys = ("rollouts", "rollout_tokens", "reward_calls", "reward_pairs", "baseline_forward_tokens",
            "prior_forward_tokens")
    print("align-decode accounting (last call): " + ", ".join(f"{key} {accounting[key]}" for key in keys))


def run(args):
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    reward = SentimentReward()
    strategy = TransferQ(model, reward, baseline_tokenizer=tok, alpha=args.alpha, k=args.k, rollout_len=args.horizon)
    aligned = AlignedModel(model, tokenizer=tok, strategy=strategy)
    print(f"# Transfer Q*, k={args.k}, H={args.horizon}, one greedy rollout per candidate, SmolLM2-135M-Instruct "
          f"(float32) as prior and baseline, SentimentReward; {args.threads} thread(s); "
          f"{platform.machine()}, torch {torch.__version__}")
    for name in args.contexts:
        bench_context(args, model, tok, reward, aligned, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=8, help="generated tokens per prompt")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per context (at most those it has)")
    parser.add_argument("--contexts", nargs="+", default=["short", "long"], choices=sorted(CONTEXTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
