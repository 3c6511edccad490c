"""`align-decode serve` under load on loopback, against calling the Python API directly (issue 17).

A fixed number of chat requests per workload (plain sampling, best-of-4 by the sentiment reward, GenARM
with the policy prompted as its ARM) are sent by C concurrent openai clients to a server on 127.0.0.1
(uvicorn on a thread of this process, the bundled SmolLM2-135M-Instruct, max_tokens T). Reported per
workload: wall time, throughput (requests/s, generated tokens/s) and p50 / p99 latency from each
request's send to its answer (queueing included); then the same requests through the Python API in
this process (latency: the call's own duration, no queueing):
one `AlignedModel.generate` call per request in turn (what a caller without the server does), and in
batches of B (the best a caller that batches by hand gets). Every request is seeded, so the server and
the Python API run the same work; `same` says whether all their answers agree (each prompt seeded on its
own: an answer must not depend on its batch).

    cd benchmarks && python bench_server.py --requests 16 --concurrency 8 --tokens 24 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from align_decode import AlignedModel, BestOfN, GenARM, PromptedARM, Sample
from align_decode.commandline.methods import DEFAULT_ARM_PROMPT
from align_decode.commandline.run import prompt_seed
from align_decode.decoding import left_pad
from align_decode.rewards import SentimentReward
from align_decode.server.app import BackgroundServer, create_app
from align_decode.server.model import ServedModel

from chat_prompts import PROMPTS  # beside this script

WORKLOADS = {
    "plain": {},
    "best-of-4": {"align_decode": {"method": "best_of_n", "n": 4, "rewards": "sentiment"}},
    "genarm": {"align_decode": {"method": "genarm", "beta": 1.0}},
}


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies, wall, tokens):
    return {"wall_s": round(wall, 2), "req_per_s": round(len(latencies) / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(percentile(latencies, 50), 3),
            "p99_s": round(percentile(latencies, 99), 3)}


def run_server(url, name, extra, requests, concurrency, tokens):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(i):
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           max_tokens=tokens, seed=i, extra_body=extra)
        return time.perf_counter() - t0, r.choices[0].message.content, r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return summary([r[0] for r in results], wall, sum(r[2] for r in results)), [r[1] for r in results]


def strategy_for(workload, model, tok):
    if workload == "plain":
        return Sample()
    if workload == "best-of-4":
        return BestOfN(SentimentReward(), n=4)
    arm = PromptedARM(model, tok, DEFAULT_ARM_PROMPT, name=f"policy prompted: {DEFAULT_ARM_PROMPT}")
    return GenARM([arm], beta=1.0)


def run_python(model, tok, strategy, requests, tokens, batch):
    """The same requests through AlignedModel.generate, `batch` prompts per call."""
    aligned = AlignedModel(model, tokenizer=tok, strategy=strategy)
    encoded = []
    for i in range(requests):
        text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                       add_generation_prompt=True)
        encoded.append(tok(text, add_special_tokens=False)["input_ids"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    latencies, texts, generated = [], [], 0
    t0 = time.perf_counter()
    for start in range(0, requests, batch):
        rows = list(range(start, min(requests, start + batch)))
        ids, mask = left_pad([encoded[i] for i in rows], pad)
        tick = time.perf_counter()
        out = aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=True,
                               temperature=1.0, top_p=1.0, top_k=0, seed=[prompt_seed(i, "0") for i in rows],
                               return_dict_in_generate=True)
        elapsed = time.perf_counter() - tick
        for b in range(len(rows)):
            n = int(out.alignment["lengths"][b])
            row = out.sequences[b, ids.shape[1]: ids.shape[1] + n].tolist()
            texts.append(tok.decode(row, skip_special_tokens=True))
            generated += n
            latencies.append(elapsed)  # the call's own time: no queueing (the server's latencies include it)
    wall = time.perf_counter() - t0
    return summary(latencies, wall, generated), texts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="the server's --max-batch-size and the batched API's")
    parser.add_argument("--batch-wait", type=float, default=0.02,
                        help="the server's --batch-wait: seconds its worker waits for more compatible requests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    served = ServedModel.load(None, rewards=["sentiment"], device="cpu", dtype="float32", max_tokens=args.tokens)
    model, tok = served.policy.model, served.tokenizer
    rows = []
    app = create_app(served, max_queue=4 * args.requests, max_batch=args.batch, batch_wait=args.batch_wait)
    with BackgroundServer(app) as srv:
        for workload in args.workloads.split(","):
            extra = WORKLOADS[workload]
            strategy = strategy_for(workload, model, tok)
            # Warm-up at the measured shapes (the first call of a batch shape is several times slower on CPU).
            run_python(model, tok, strategy, args.batch, 4, args.batch)
            run_server(srv.url, served.name, extra, args.concurrency, args.concurrency, 4)
            server, server_texts = run_server(srv.url, served.name, extra, args.requests, args.concurrency, args.tokens)
            one_by_one, texts_1 = run_python(model, tok, strategy, args.requests, args.tokens, 1)
            batched, texts_b = run_python(model, tok, strategy, args.requests, args.tokens, args.batch)
            same = server_texts == texts_1 == texts_b
            rows.append({"workload": workload, "server": server, "python_one_by_one": one_by_one,
                         f"python_batched_{args.batch}": batched, "same": same})
            print(json.dumps(rows[-1]), flush=True)
        stats = dict(app.state.worker.stats)
    if not args.json:
        print(f"\n{args.requests} requests per workload, {args.concurrency} clients, max_tokens {args.tokens}, "
              f"{args.threads} torch threads; server batches up to {args.batch} prompts, batch wait "
              f"{args.batch_wait} s; worker stats {stats}")
        header = "| workload | how | wall s | req/s | tokens/s | p50 s | p99 s |"
        print(header + "\n|---|---|---|---|---|---|---|")
        for row in rows:
            for how in ("server", "python_one_by_one", f"python_batched_{args.batch}"):
                s = row[how]
                print(f"| {row['workload']} | {how} | {s['wall_s']} | {s['req_per_s']} | {s['tokens_per_s']} | "
                      f"{s['p50_s']} | {s['p99_s']} |")
        print("answers identical (server, one by one, batched): " + ", ".join(f"{r['workload']} {r['same']}" for r in rows))


if __name__ == "__main__":
    main()
