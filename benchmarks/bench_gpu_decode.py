"""End-to-end decoding speed on a CUDA GPU: model.generate() against this loop, with the step's
mix-and-sample done by the Triton kernel or by the torch reference (CUDA only).

    python benchmarks/bench_gpu_decode.py                       # batches 1 and 16, 128 new tokens
    python benchmarks/bench_gpu_decode.py --batches 1 --tokens 64 --repeats 2

No weights can be fetched on the GPU machine, so both models are random Llamas built from configs in
bf16: the policy shaped like Llama-3.2-1B (16 layers, hidden 2048, vocabulary 128256) and an ARM shaped
like SmolLM2-360M over the same vocabulary (32 layers, hidden 960): a small ARM guiding a larger policy.
Random weights change nothing about the time of a forward pass; every variant generates exactly
`--tokens` tokens (no EOS is set), variants are interleaved within each repeat, the median is reported.

Variants (tokens per second, all rows together):
  * model.generate(): transformers' own sampling loop (top_k=0, temperature 1);
  * loop, triton / loop, torch: AlignedModel with GenARM at weight 0 (the policy alone);
  * GenARM, triton / GenARM, torch: the ARM mixed in with weight 1 (two forwards per token).
"torch" sets ALIGN_DECODE_DISABLE_TRITON=1, so `kernels.sample_next` uses the torch reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from align_decode import ARM, AlignedModel, GenARM  # noqa: E402
from align_decode.kernels.dispatch import fused_sampler  # noqa: E402

VOCAB = 128256


def random_llama(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, seed: int):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def with_sampler(name: str, fn):
    """fn run with the step's sampler forced to `name` ('triton' or 'torch')."""

    def run():
        old = os.environ.get("ALIGN_DECODE_DISABLE_TRITON")
        os.environ["ALIGN_DECODE_DISABLE_TRITON"] = "1" if name == "torch" else "0"
        fused_sampler.cache_clear()  # the sampler is chosen once per process: choose again
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("ALIGN_DECODE_DISABLE_TRITON")
            else:
                os.environ["ALIGN_DECODE_DISABLE_TRITON"] = old
            fused_sampler.cache_clear()

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_decode.py needs a CUDA GPU; nothing was measured.")
    policy = random_llama(16, 2048, 32, 8, 8192, seed=0)
    arm_model = random_llama(32, 960, 15, 5, 2560, seed=1)
    arm = ARM(arm_model, name="random ARM (SmolLM2-360M shape)")
    genarm, plain = GenARM(arm, weights=[1.0]), GenARM(arm, weights=[0.0])
    aligned = AlignedModel(policy, strategy=plain)
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}, torch {torch.__version__}", file=sys.stderr)
    lines = [f"### End-to-end decoding on {device}: tokens/s (all rows), {args.tokens} new tokens, "
             f"prompt {args.prompt_length}, bf16, median of {args.repeats}\n",
             "| batch | variant | tokens/s | vs model.generate() |", "|---|---|---|---|"]
    for batch in args.batches:
        gen = torch.Generator(device="cuda").manual_seed(batch)
        ids = torch.randint(3, VOCAB, (batch, args.prompt_length), device="cuda", generator=gen)
        mask = torch.ones_like(ids)
        common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=True, top_k=0,
                      temperature=1.0)

        def ours(sampler, strategy):
            return with_sampler(sampler, lambda: aligned.generate(seed=0, strategy=strategy, **common))

        variants = {
            "model.generate()": lambda: policy.generate(**common),
            "loop, triton": ours("triton", plain),
            "loop, torch": ours("torch", plain),
            "GenARM, triton": ours("triton", genarm),
            "GenARM, torch": ours("torch", genarm),
        }
        for fn in variants.values():  # warm-up: kernel compilation, cuBLAS handles, allocator
            fn()
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn))
        base = batch * args.tokens / statistics.median(times["model.generate()"])
        for name, ts in times.items():
            rate = batch * args.tokens / statistics.median(ts)
            print(f"batch {batch} {name}: {rate:.0f} tok/s", file=sys.stderr)
            lines.append(f"| {batch} | {name} | {rate:.0f} | {rate / base:.2f}x |")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
