"""`align-decode serve`: an OpenAI-compatible HTTP server where each request picks its decoding method,
its options and its budget.

    align-decode serve --model DIR --reward sentiment --reward length:target=20 --arm kind=ARM_DIR

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    out = client.chat.completions.create(
        model="DIR's folder name", messages=[{"role": "user", "content": "Describe a rainy day."}],
        max_tokens=64, seed=0,
        extra_body={"align_decode": {"method": "best_of_n", "n": 8, "rewards": {"sentiment": 1.0, "length:target=20": 0.2},
                                     "report": True}})
    out.choices[0].message.content, out.model_extra["align_decode"]["prompts"][0]["candidates"]

**Endpoints.** `/v1/chat/completions` (messages through the model's chat template), `/v1/completions`
(raw text; a list of prompts gives n choices per prompt, prompt-major), `/v1/models`, and `/health`
(queue length, what requests can name, counters). Plain requests (no `align_decode` field) are plain
sampling: `temperature` (0: greedy), `top_p`, `max_tokens` / `max_completion_tokens`, `n`, `seed`,
`stop` (strings; the text ends before the first), `stream`, and vLLM's `top_k` and `min_p`. Fields that
would change the output and are not implemented (`logprobs`, penalties, `logit_bias`, tools) are refused.

**The `align_decode` field** (from the openai client: `extra_body={"align_decode": {...}}`):

- `method`: any registered method (`align-decode methods`), found in `commandline.methods.METHODS`, so
  a method registered later is served without a change here; default `sample`.
- the method's options, named as `align-decode run`'s flags without dashes (`"beta": 0.5`,
  `"steps": 8`, `"burn_in": 2`, `"weight": [1, 0.5]`, `"chain_answer": "majority"`), checked by the
  method's own declaration (`decoding.options`) with the command line's rules; errors name the field
  (`align_decode.beta must be a finite number > 0, got -1.0`).
- `n`: the candidate count of methods whose --n means candidates (best_of_n); the request's own `n` is
  the number of choices (methods that return one answer per prompt need n = 1).
- `rewards`: which of the rewards named at start-up the method uses, in order (the first is the one it
  selects or steers with; Transfer Q*'s indirect transfer reads the second as the baseline's): a name,
  a list of names, or `{name: weight, ...}` for a weighted sum (`SequenceReward`'s `a * w + b`); a list
  may mix both. Default: every start-up reward, in order (as `run --reward` repeated). `reward` is a
  one-name alias.
- guides: the method flags that take a model folder (`arm`, `value_model`, `baseline`, and any flag a
  method declares with metavar DIR, such as a PRM) name folders loaded at start-up (`--arm NAME=DIR`,
  `--guide FLAG:NAME=DIR`; a request never names a path); when left out, the start-up ones are used
  (genarm without any ARM: the policy prompted with `arm_prompt`, as the command line does).
- `report`: true adds an `align_decode` field to the response (to the last chunk when streaming):
  the method, its options and rewards, its hyperparameters, the seeds, and per prompt every candidate
  (text, tokens, finish_reason, each selected reward's score), which was chosen, the method's per-prompt
  extras (QAlign's acceptance rates, best-of-N's votes); `accounting`: the tokens this request's
  candidates sampled, the seconds it waited in the queue, and its batch (requests and prompts batched
  together, every token the batch sampled including proposals and rollouts, the run's seconds, and the
  method's own counters such as `forward_tokens`). Off by default: it costs a reward call per candidate.
- `timeout`: seconds, at most the server's `--timeout`.

**Streaming.** Token-level methods (sample, genarm, cd_tokenwise, args, transfer_q: `strategy.streams`)
stream each step's tokens as they are drawn. Sequence-level methods (best_of_n, qalign, cd_blockwise)
decide their answer only at the end: their stream sends the chosen answer in one chunk when it is
decided, then the finish chunk.

**Scheduling** (worker.py): one worker thread owns the model; requests with the same method, options,
rewards and sampling settings that wait together run as one batch (each prompt seeded on its own, so a
seeded request's answer does not depend on its batch); a bounded queue answers 429 when full; a request
past its timeout is answered 504 and its work dropped or stopped; a client that disconnects cancels its
request: dropped if it still waits, stopped at the next forward pass or progress report if it runs alone
(a batch shared with other live requests runs on for them; the result is thrown away).

**Backends.** `--backend hf` (default) runs everything in process. `--backend vllm` also starts a vLLM
engine on the policy's folder (and on a --baseline's) that the methods able to use one (best_of_n,
qalign, transfer_q's rollouts: those whose `Method.engines` lists vllm) sample from, batched by the
worker as above; token-level methods still run in process on the loaded policy.

Files: `schemas.py` (the request and response bodies), `model.py` (loading, and a request checked and
turned into a prepared job), `worker.py` (the queue, batching, cancellation, streaming), `app.py` (the
FastAPI app and a background uvicorn server for tests and benchmarks).
"""
