"""GenARM with the guides run inside vLLM (composite model) against plain vLLM and the processor path.

One process per comparison: each child process builds two in-process V1 engines
(VLLM_ENABLE_V1_MULTIPROCESSING=0), plain vLLM and one variant, and times them in interleaved rounds
(round r runs both, in an order that alternates each round), so machine-load drift hits both alike;
the figure reported is the median over rounds of the per-round ratio variant / plain. Each generate is
also timed in process CPU time (time.process_time, all threads of the process): on a shared machine
whose load exceeds its cores, wall time includes waiting for a core and CPU time does not, so the CPU-time
ratio is the steadier measure of what guidance costs (both are reported). Two engines of
1 GiB KV cache each (VLLM_CPU_KVCACHE_SPACE=1) per process keep a run within a few GiB: the earlier
four-engine design filled the 23 GiB machine. Greedy, fixed length (ignore_eos), the same prompts for
every variant, every engine on the same torch thread count (--threads, OMP_NUM_THREADS).

    plain           vLLM on the policy folder with align-decode's logits-processor entry point hidden
                    from vLLM's loader: vLLM as it is without the plugin
    composite       the composite folder (policy + same-size guide inside vLLM), every request guided
    composite-q     the composite folder with a guide of a quarter of the policy's parameters, guided
    processor       the old path: the policy folder, $ALIGN_DECODE_GUIDES names the same-size guide, which
                    the logits processor runs as a Hugging Face model beside vLLM; every request guided
    idle-plugin     the policy folder with the plugin installed (no guides configured), no request opts in
    idle-composite  the same-size composite folder, no request opts in
    plain-aa        a second plain engine (A/A control: what two identical engines in one process differ by)

Each comparison runs in --passes processes; odd passes build the variant's engine before the plain one,
so an engine-build-order effect cancels in the pooled per-round ratios (each pass is also listed).

Default models: SmolLM2-135M-Instruct (the bundled default) as the policy and, standing in for a
same-size ARM, as the same-size guide (a guide's values do not change its speed; its shapes do). The
quarter-size guide: SmolLM2 ships no smaller model with this tokenizer, so it is a random-init Llama
with the policy's vocabulary and tokenizer, head size and KV-head count, narrowed and shortened to a
quarter of the parameters (see `quarter_config`; its exact size is printed and recorded).

    .venv-vllm/bin/python benchmarks/bench_vllm_composite.py --prompts 8 --tokens 64 --rounds 15 --passes 2 \
        --comparisons composite composite-q processor idle-plugin idle-composite plain-aa
    .venv-vllm/bin/python benchmarks/bench_vllm_composite.py --rounds 2 --passes 1 --profile \
        --comparisons composite composite-q processor
    .venv-vllm/bin/python benchmarks/bench_vllm_composite.py --summarize benchmarks/out/bench_vllm_composite.json

--profile wraps the composite model's parts (policy forward, guide forwards, logits, the processor's
mixing) and the processor path's processor with timers and prints where each engine's time goes; a
profiled run is not a throughput measurement (wrappers cost a little, and it prints more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import PROMPTS  # noqa: E402

COMPARISONS = ["composite", "composite-q", "processor", "idle-plugin", "idle-composite", "plain-aa"]
GUIDED = {"composite", "composite-q", "processor"}


def default_model() -> str:
    from align_decode.models import default_model_path

    path = default_model_path(convert=False)
    if not (path / "config.json").exists():
        raise SystemExit(f"the default model is not converted yet ({path}); convert it once from the main "
                         "environment (.venv/bin/python -c 'from align_decode.models import default_model_path; "
                         "default_model_path()') or pass --policy")
    return str(path)


# ----------------------------------------------------------------------------------- model folders
def quarter_config(policy_cfg: dict) -> dict:
    """The quarter-size guide's config: the policy's architecture, vocabulary, head size and KV-head count,
    with width and depth cut so that its parameter count is about a quarter of the policy's.

    For SmolLM2-135M (576 wide, 30 layers, 9 heads / 3 KV heads of 64, MLP 1536, tied 49152-row
    embedding; 134.5M parameters) this is 384 wide, 6 heads / 3 KV heads of 64, MLP 1024, 9 layers:
    33.6M parameters (0.25x), of which the tied embedding is 18.9M. Compute per token scales the same
    way: the tied embedding is also the output head, which costs vocab x width per token."""
    cfg = dict(policy_cfg)
    heads, kv, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim")
    head_dim = head_dim or cfg["hidden_size"] // heads
    # Two thirds of the width, in whole groups of query heads per KV head (keeps head_dim and KV heads).
    group = heads // kv
    new_heads = max(kv, (heads * 2 // 3) // kv * kv) if group > 1 else max(1, heads * 2 // 3)
    cfg["num_attention_heads"] = new_heads
    cfg["hidden_size"] = new_heads * head_dim
    cfg["head_dim"] = head_dim
    cfg["intermediate_size"] = int(round(cfg["intermediate_size"] * cfg["hidden_size"] / policy_cfg["hidden_size"]))
    target = param_count(policy_cfg) / 4
    best = min(range(1, cfg["num_hidden_layers"] + 1),
               key=lambda n: abs(param_count({**cfg, "num_hidden_layers": n}) - target))
    cfg["num_hidden_layers"] = best
    cfg.pop("_model_name_or_path", None)
    return cfg


def param_count(cfg: dict) -> int:
    """Parameters of a Llama-style decoder from its config (tied or untied output head, no biases)."""
    h, inter, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2
    mlp = 3 * h * inter
    layer = attn + mlp + 2 * h
    emb = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return n * layer + emb + h


def quarter_guide(policy: str, out: Path) -> dict:
    """Write the random-init quarter-size guide (seed 0) with the policy's tokenizer; return its facts."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pcfg = json.loads((Path(policy) / "config.json").read_text())
    qcfg = quarter_config(pcfg)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim")
    config = AutoConfig.from_pretrained(policy)
    for k in keys:
        setattr(config, k, qcfg[k])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    in_memory = sum(p.numel() for p in model.parameters())  # tied weights counted once
    del model
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        in_file = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"path": str(out), "config": {k: qcfg.get(k) for k in keys},
            "policy_config": {k: pcfg.get(k) for k in keys},
            "params": in_memory, "params_in_file": in_file, "params_from_config": param_count(qcfg),
            "policy_params": param_count(pcfg), "fraction": in_memory / param_count(pcfg)}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------- child
PROFILE: dict[str, float] = {}


def _timed(label: str, fn):
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PROFILE[label] = PROFILE.get(label, 0.0) + time.perf_counter() - start
    return wrapper


def _model_of(llm):
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    return runner.model


def _profile_engine(llm, tag: str) -> None:
    """Timers on this engine's model parts (instance attributes: the other engine is untouched)."""
    model = _model_of(llm)
    if hasattr(model, "guides"):  # the composite model
        model.policy.forward = _timed(f"{tag}: policy forward", model.policy.forward)
        model.policy.compute_logits = _timed(f"{tag}: policy logits (lm head)", model.policy.compute_logits)
        for name, guide in model.guides.items():
            guide.forward = _timed(f"{tag}: guide forward", guide.forward)
            guide.compute_logits = _timed(f"{tag}: guide logits (lm head)", guide.compute_logits)
        model.forward = _timed(f"{tag}: composite forward (total)", model.forward)
        model.compute_logits = _timed(f"{tag}: composite compute_logits (total)", model.compute_logits)
    else:
        model.forward = _timed(f"{tag}: policy forward", model.forward)
        model.compute_logits = _timed(f"{tag}: policy logits (lm head)", model.compute_logits)


def _profile_processor() -> None:
    from align_decode.serving.vllm_plugin import processor as proc

    P = proc.GuidanceLogitsProcessor
    P.apply = _timed("processor apply (mixing; processor path: incl. the HF guide forward)", P.apply)
    P.update_state = _timed("processor update_state", P.update_state)
    try:
        from align_decode.serving.composite import handoff

        handoff.publish = _timed("handoff publish", handoff.publish)
        handoff.take = _timed("handoff take", handoff.take)
    except Exception:
        pass


def child(args) -> None:
    variant = args.child
    folders = json.loads(args.folders)
    os.environ.pop("ALIGN_DECODE_GUIDES", None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.policy)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for t in texts]

    import torch
    import vllm.v1.sample.logits_processor as lp
    from vllm import LLM, SamplingParams

    if args.profile:
        _profile_processor()

    def engine(folder):
        return LLM(model=folder, dtype="float32", max_model_len=args.max_model_len, max_num_seqs=args.prompts,
                   enforce_eager=True, seed=0)

    built, engines = {}, {}
    folder = {"composite": folders.get("same"), "idle-composite": folders.get("same"),
              "composite-q": folders.get("quarter")}.get(variant, folders["policy"])

    def build_plain(name):
        # The plugin hidden from vLLM's entry-point loader while this engine is built (restored after):
        # vLLM as it is without align-decode.
        loader = lp._load_logitsprocs_plugins
        lp._load_logitsprocs_plugins = lambda: []
        try:
            return engine(folders["policy"])
        finally:
            lp._load_logitsprocs_plugins = loader

    def build_variant():
        if variant == "plain-aa":
            return build_plain(variant)
        if variant == "processor":
            # Left set: the processor reads it when built, and request admission reads it per request.
            os.environ["ALIGN_DECODE_GUIDES"] = json.dumps({"arm": {"path": args.guide, "kind": "arm"}})
        return engine(folder)

    steps = [("plain", lambda: build_plain("plain")), (variant, build_variant)]
    for name, make in (steps[::-1] if args.variant_first else steps):
        start = time.perf_counter()
        engines[name] = make()
        built[name] = time.perf_counter() - start
    if args.profile:
        for name, llm in engines.items():
            _profile_engine(llm, name)

    extra = {"align_decode": {"guides": {"arm": args.weight}}}
    params = {"plain": SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True),
              variant: SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                      extra_args=extra if variant in GUIDED else None)}
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def once(name):
        outs = engines[name].generate(inputs, params[name], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    threads = torch.get_num_threads()
    info = {"variant": variant, "folder": folder, "torch_threads": threads, "build_s": built,
            "built_first": "variant" if args.variant_first else "plain",
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                                                   "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                                   "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD")}}
    print("INFO " + json.dumps(info), flush=True)
    outputs = {name: once(name) for name in (variant, "plain")}  # warm-up; outputs compared by the parent
    PROFILE.clear()
    order = ["plain", variant]
    for r in range(args.rounds):
        seconds, cpu = {}, {}
        for name in (order if r % 2 == 0 else order[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            got = once(name)
            seconds[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
            tokens = sum(len(o) for o in got)
            print("RESULT " + json.dumps({"comparison": variant, "pass": args.pass_index, "engine": name,
                                          "round": r, "tokens": tokens, "seconds": seconds[name],
                                          "tok_s": tokens / seconds[name], "cpu_seconds": cpu[name],
                                          "tok_per_cpu_s": tokens / cpu[name], "load1": os.getloadavg()[0]}),
                  flush=True)
        # Same token count for both engines: the ratio of times is the ratio of tokens/s.
        print("RATIO " + json.dumps({"comparison": variant, "pass": args.pass_index, "round": r,
                                     "ratio": seconds["plain"] / seconds[variant],
                                     "cpu_ratio": cpu["plain"] / cpu[variant]}), flush=True)
    if args.profile:
        print("PROFILE " + json.dumps(PROFILE), flush=True)
    # Whether a composite model ran or skipped its guides (counters of a model that has them; None
    # where the code measured has no idle skip).
    steps = {name: {k: getattr(_model_of(llm), k, None) for k in ("guided_steps", "skipped_steps")}
             for name, llm in engines.items() if hasattr(_model_of(llm), "guides")}
    if steps:
        print("STEPS " + json.dumps(steps), flush=True)
    print("OUTPUTS " + json.dumps(outputs), flush=True)


# -------------------------------------------------------------------------------------- orchestrator
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="policy folder (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--guide", default=None, help="same-size guide folder (default: the policy)")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per comparison (after a warm-up)")
    ap.add_argument("--comparisons", nargs="+", default=COMPARISONS, choices=COMPARISONS,
                    help="variants, each compared with plain vLLM in its own process")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (torch threads) for every engine")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE per engine (GiB)")
    ap.add_argument("--passes", type=int, default=2,
                    help="processes per comparison; odd passes build the variant's engine first")
    ap.add_argument("--child-timeout", type=int, default=1500, help="seconds per comparison process")
    ap.add_argument("--profile", action="store_true", help="time the model parts (not a throughput run)")
    ap.add_argument("--work", default="benchmarks/out/composite")
    ap.add_argument("--out", default="benchmarks/out/bench_vllm_composite.json")
    ap.add_argument("--child", choices=COMPARISONS, help=argparse.SUPPRESS)
    ap.add_argument("--folders", help=argparse.SUPPRESS)
    ap.add_argument("--variant-first", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pass-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="JSON", help="reprint the tables of a saved run (its --out file)")
    args = ap.parse_args()
    if args.summarize:
        print("\n".join(report(json.loads(Path(args.summarize).read_text()))[0]))
        return
    args.policy = args.policy or default_model()
    args.guide = args.guide or args.policy
    if args.child:
        child(args)
        return

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from align_decode.serving.composite.spec import build_composite

    folders = {"policy": args.policy}
    built = {}
    if {"composite", "idle-composite"} & set(args.comparisons):
        built["same"] = build_composite(args.policy, {"arm": args.guide}, work / "same", force=True)
        folders["same"] = built["same"]["out"]
    quarter = None
    if "composite-q" in args.comparisons:
        quarter = quarter_guide(args.policy, work / "quarter-guide")
        print(f"quarter-size guide: {json.dumps(quarter)}", flush=True)
        built["quarter"] = build_composite(args.policy, {"arm": quarter["path"]}, work / "quarter", force=True)
        folders["quarter"] = built["quarter"]["out"]

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    env.pop("ALIGN_DECODE_GUIDES", None)
    base = [sys.executable, os.path.abspath(__file__), "--policy", args.policy, "--guide", args.guide,
            "--weight", str(args.weight), "--prompts", str(args.prompts), "--tokens", str(args.tokens),
            "--rounds", str(args.rounds), "--max-model-len", str(args.max_model_len), "--folders", json.dumps(folders)]
    if args.profile:
        base.append("--profile")
    load_before = os.getloadavg()
    rows, outputs, infos, profiles, steps, failed = [], {}, {}, {}, {}, {}
    for comp in args.comparisons:
        for p in range(args.passes):
            first = "variant" if p % 2 else "plain"
            print(f"--- {comp} vs plain, pass {p} ({first} engine built first; {time.strftime('%H:%M:%S')}, "
                  f"load {os.getloadavg()[0]:.2f})", flush=True)
            cmd = base + ["--child", comp, "--pass-index", str(p)] + (["--variant-first"] if p % 2 else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
                stdout, rc, err = proc.stdout, proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as e:
                stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                rc = "timeout"
            for line in stdout.splitlines():
                kind, _, payload = line.partition(" ")
                if kind == "RESULT":
                    rows.append(json.loads(payload))
                    print(payload, flush=True)
                elif kind == "OUTPUTS":
                    outputs.setdefault(comp, json.loads(payload))
                elif kind == "INFO":
                    infos.setdefault(comp, []).append(json.loads(payload))
                    print(payload, flush=True)
                elif kind == "PROFILE":
                    profiles.setdefault(comp, {})[p] = json.loads(payload)
                elif kind == "STEPS":
                    steps.setdefault(comp, {})[p] = json.loads(payload)
                    print(f"composite model steps ({comp}, pass {p}, warm-up included): {payload}", flush=True)
            if rc != 0:
                failed[f"{comp} pass {p}"] = rc
                sys.stderr.write(f"comparison {comp} pass {p} failed ({rc}):\n" + stdout[-2000:] + err[-5000:] + "\n")
    load_after = os.getloadavg()
    data = {"rows": rows, "outputs": outputs, "profiles": profiles, "infos": infos, "steps": steps, "failed": failed,
            "quarter": quarter, "load": [load_before, load_after], "args": vars(args), "built": built}
    lines, data["summary"] = report(data)
    print("\n".join(lines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1, default=str))
    if failed:
        raise SystemExit(f"failed comparisons: {failed}")


UNCONTENDED = 0.9  # CPU time / wall time of a generate at or above which it had a core to itself


def report(data: dict) -> tuple[list[str], dict]:
    """The tables from the raw rows: per-round ratios paired by (comparison, pass, round)."""
    rows, args = data["rows"], data["args"]

    def q(xs, f):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(f * len(xs)))]

    rounds: dict = {}
    for x in rows:
        rounds.setdefault((x["comparison"], x.get("pass", 0), x["round"]), {})[x["engine"]] = x
    before, after = data["load"]
    lines = [f"\nload average before {tuple(round(x, 2) for x in before)}, after {tuple(round(x, 2) for x in after)}; "
             f"{args['prompts']} prompts x {args['tokens']} tokens, greedy, {args.get('passes', 1)} process(es) x "
             f"{args['rounds']} interleaved rounds per comparison, OMP_NUM_THREADS={args['threads']}",
             "| comparison | plain tok/s (median) | variant tok/s (median) | x plain: median of per-round ratios "
             "(quartiles) | median per pass | x plain by CPU time: median (quartiles) | x plain, uncontended rounds "
             "only: median (n) |", "|---|---|---|---|---|---|---|"]
    summary, per_round = {}, []
    for comp in args["comparisons"]:
        pairs = {k: v for k, v in rounds.items() if k[0] == comp and len(v) == 2}
        if not pairs:
            lines.append(f"| {comp} | - | - | failed | - | - | - |")
            continue
        wall, cpu, calm, by_pass = [], [], [], {}
        for (_, p, r), v in sorted(pairs.items()):
            a, b = v["plain"], v[comp]
            wall.append(a["seconds"] / b["seconds"])
            by_pass.setdefault(p, []).append(wall[-1])
            if "cpu_seconds" in a:
                cpu.append(a["cpu_seconds"] / b["cpu_seconds"])
                if min(a["cpu_seconds"] / a["seconds"], b["cpu_seconds"] / b["seconds"]) >= UNCONTENDED:
                    calm.append(wall[-1])
        for p in sorted(by_pass):
            keys = sorted(k for k in pairs if k[1] == p)
            per_round.append(f"per-round ratios, {comp}, pass {p}: wall "
                             + ", ".join(f"{pairs[k]['plain']['seconds'] / pairs[k][comp]['seconds']:.3f}" for k in keys))
            if cpu:
                per_round.append(f"per-round ratios, {comp}, pass {p}: CPU  " + ", ".join(
                    f"{pairs[k]['plain']['cpu_seconds'] / pairs[k][comp]['cpu_seconds']:.3f}" for k in keys))
        plain = statistics.median(v["plain"]["tok_s"] for v in pairs.values())
        var = statistics.median(v[comp]["tok_s"] for v in pairs.values())
        summary[comp] = {"plain_tok_s": plain, "tok_s": var, "ratio": statistics.median(wall), "ratios": wall,
                         "per_pass": {p: statistics.median(v) for p, v in by_pass.items()},
                         "cpu_ratio": statistics.median(cpu) if cpu else None, "cpu_ratios": cpu,
                         "uncontended_ratio": statistics.median(calm) if calm else None, "uncontended_n": len(calm)}
        s = summary[comp]
        lines.append(
            f"| {comp} | {plain:.1f} | {var:.1f} | {s['ratio']:.3f} ({q(wall, .25):.3f}-{q(wall, .75):.3f}) | "
            f"{', '.join(f'{v:.3f}' for v in s['per_pass'].values())} | "
            + (f"{s['cpu_ratio']:.3f} ({q(cpu, .25):.3f}-{q(cpu, .75):.3f}) | " if cpu else "- | ")
            + (f"{s['uncontended_ratio']:.3f} ({len(calm)}) |" if calm else "- (0) |"))
    lines += per_round
    outputs = data.get("outputs") or {}
    # Greedy outputs: idle variants must equal plain; guided in-engine vs processor path should agree.
    for comp, outs in outputs.items():
        same = sum(a == b for a, b in zip(outs[comp], outs["plain"]))
        lines.append(f"greedy outputs, {comp} vs plain (same process): {same}/{len(outs['plain'])} identical")
    if "composite" in outputs and "processor" in outputs:
        a, b = outputs["composite"]["composite"], outputs["processor"]["processor"]
        lines.append(f"greedy outputs, composite vs processor path: {sum(x == y for x, y in zip(a, b))}/{len(a)} "
                     "identical")
    for comp, by_pass in (data.get("steps") or {}).items():
        for p, st in by_pass.items():
            lines.append(f"composite model steps ({comp}, pass {p}, warm-up included): {json.dumps(st)}")
    for comp, by_pass in (data.get("profiles") or {}).items():
        for p, prof in by_pass.items():
            lines.append(f"profile ({comp}, pass {p}, warm-up excluded, {args['rounds']} round(s) of each engine):")
            for k, v in sorted(prof.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {k}: {v:.2f} s")
    return lines, summary


if __name__ == "__main__":
    main()
