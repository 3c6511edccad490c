"""Core engine speed: plain model.generate() against this loop (weight 0), GenARM, and a naive GenARM.

SmolLM2-135M-Instruct is the policy. The ARM is a prompted SmolLM2, either the policy object itself
(its rows then share the policy's batched forward) or a separate copy of the model (as a trained
SmolLM2-sized ARM would be: two forwards per token). Every variant samples the same number of new tokens
(EOS is set to a token the model never emits here), variants are interleaved within each repeat so
machine noise hits them alike, and the median is reported.

    python benchmarks/bench_core.py --threads 1 --tokens 64 --batches 1 8 --naive-tokens 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from align_decode import AlignedModel, GenARM, PromptedARM
from align_decode.models import load_model

from chat_prompts import PROMPTS  # beside this script

INSTRUCTION = "Answer with warmth, joy and enthusiasm."
NEVER = 49151  # a token SmolLM2 does not emit in these runs: every variant generates the full length


class NaiveGenARM(LogitsProcessor):
    """GenARM the obvious way: re-run the ARM over the whole prefix at every step (no ARM cache)."""

    def __init__(self, arm_model, arm: PromptedARM, batch, weight: float):
        self.model, self.weight = arm_model, weight
        self.arm_ids, self.arm_mask = arm.guide_prompts(batch)
        self.prompt_width = batch.input_ids.shape[1]

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_width:]
        ids = torch.cat([self.arm_ids, generated], dim=1)
        mask = torch.cat([self.arm_mask, torch.ones_like(generated)], dim=1)
        with torch.no_grad():
            arm_logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        return torch.log_softmax(scores, -1) + self.weight * torch.log_softmax(arm_logits.float(), -1)


def _encode(tok, batch_size):
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch_size)]
    tok.padding_side = "left"
    return tok.apply_chat_template(chats, add_generation_prompt=True, return_dict=True, return_tensors="pt",
                                   padding=True)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args):
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    arm = PromptedARM(model, tok, INSTRUCTION)
    genarm = GenARM(arm, beta=1.0)
    separate = GenARM(PromptedARM(copy.deepcopy(model), tok, INSTRUCTION), beta=1.0)
    aligned = AlignedModel(model, tokenizer=tok, strategy=genarm)
    rows = []
    for batch_size in args.batches:
        enc = _encode(tok, batch_size)
        common = dict(do_sample=True, top_k=0, eos_token_id=NEVER, pad_token_id=tok.pad_token_id)
        from align_decode.decoding import PromptBatch

        variants = {
            "model.generate()": lambda n: model.generate(**enc, max_new_tokens=n, **common),
            "loop, weight 0": lambda n: aligned.generate(**enc, max_new_tokens=n, seed=0,
                                                         strategy=genarm.with_weights([0.0]), **common),
            "GenARM, prompted policy (shared forward)": lambda n: aligned.generate(**enc, max_new_tokens=n, seed=0,
                                                                                  **common),
            "GenARM, separate ARM model": lambda n: aligned.generate(**enc, max_new_tokens=n, seed=0,
                                                                     strategy=separate, **common),
            "naive GenARM processor": lambda n: model.generate(
                **enc, max_new_tokens=n,
                logits_processor=LogitsProcessorList(
                    [NaiveGenARM(model, arm, PromptBatch(enc["input_ids"], enc["attention_mask"]), 1.0)]),
                **common),
        }
        naive_pair = ["GenARM, separate ARM model", "naive GenARM processor"]
        for tokens, names in ((args.tokens, list(variants)[:4]), (args.naive_tokens, naive_pair)):
            for name in names:  # warm-up
                variants[name](4)
            times = {name: [] for name in names}
            for _ in range(args.repeats):
                for name in names:
                    dt, out = _timed(lambda: variants[name](tokens))
                    assert out.shape[1] == enc["input_ids"].shape[1] + tokens, (name, out.shape)
                    times[name].append(dt)
            for name in names:
                med = statistics.median(times[name])
                rows.append((batch_size, tokens, name, med, 1000 * med / tokens))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--naive-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = run(args)
    print(f"threads={args.threads}, repeats={args.repeats} (median), torch {torch.__version__}\n")
    print("| batch | new tokens | variant | wall s | ms / step | vs model.generate() | vs naive |")
    print("|---|---|---|---|---|---|---|")
    base = {(b, n): t for b, n, name, t, _ in rows if name == "model.generate()"}
    naive = {(b, n): t for b, n, name, t, _ in rows if name.startswith("naive")}
    for b, n, name, t, ms in rows:
        vs_base = f"{t / base[(b, n)]:.2f}x" if (b, n) in base else ""
        vs_naive = f"{naive[(b, n)] / t:.2f}x faster" if (b, n) in naive and not name.startswith("naive") else ""
        print(f"| {b} | {n} | {name} | {t:.2f} | {ms:.1f} | {vs_base} | {vs_naive} |")


if __name__ == "__main__":
    main()
