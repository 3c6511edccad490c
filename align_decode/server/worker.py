"""Scheduling requests onto the model: one worker thread, a bounded queue, batches across clients.

The HTTP handlers (an asyncio event loop) never touch the model. They `submit()` a `Job` (a prepared
request) and wait on its events; the worker thread owns the model and runs one batch at a time:

- **Batching.** When the worker is free it takes the oldest waiting job and every other waiting job with
  the same batch key (the same strategy object, i.e. method, options and rewards, and the same token
  budget and sampling settings), up to `max_batch` prompts, optionally after waiting `batch_wait`
  seconds for more to arrive. Their prompts run as one call of `strategy.run`; each prompt keeps its own
  seed, so a request's answer does not depend on what it was batched with. Different methods or
  settings run in turn, oldest first.
- **A bounded queue.** At most `max_queue` jobs wait (the batch being run does not count); `submit()`
  on a full queue raises `QueueFull`, which the app answers with HTTP 429 and a Retry-After header.
- **Timeouts and cancellation.** A job has a deadline (the server's --timeout, or less if the request
  asks). A job cancelled (its client went away) or past its deadline while it waits is dropped before it
  runs. While a batch runs, the worker checks, at every forward pass of the policy (a forward pre-hook
  on the policy model and on the guides loaded at start-up) and at every progress report of the
  strategy (decoding step, candidate chunk, chain step), whether every job of the batch is cancelled or
  past its deadline; if so the run stops there (an exception unwinds the strategy) and the worker moves
  on. A batch in which only some jobs are cancelled runs on for the others (a strategy cannot drop rows
  generically); the cancelled job's result is thrown away.
- **Isolation.** If a batch of several jobs fails, each job is rerun alone, so one bad request does not
  fail the others; a job that fails alone gets the error.
- **Streaming.** For token-level strategies (`strategy.streams`: sample, genarm, cd_tokenwise, args,
  transfer_q) the loop's streamer hands each step's tokens to the jobs that stream, which send the new
  text of each choice at once (held back while it could be the start of a stop string or an incomplete
  character). Sequence-level strategies (best_of_n, qalign, cd_blockwise) send the chosen answer in one
  piece when it is decided.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .model import Prepared


class QueueFull(RuntimeError):
    """The waiting queue is full: the request is refused (HTTP 429)."""


class Cancelled(BaseException):
    """Raised inside a running batch when none of its jobs wants the result any more (a BaseException,
    so that no strategy's `except Exception` swallows it)."""


@dataclass(eq=False)
class Job:
    """One request in the worker: its prepared form, and how its events get back to the handler."""

    prepared: Prepared
    # emit(kind, payload) is called from the worker thread: ("delta", (choice, text)), ("done", result),
    # ("error", (status, message)). The app turns it into a thread-safe put on an asyncio queue.
    emit: Callable[[str, Any], None]
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel_reason: str | None = None

    @property
    def deadline(self) -> float:
        return self.submitted + self.prepared.timeout

    def cancel(self, reason: str) -> None:
        """Stop wanting the result (thread-safe: a string assignment); the worker drops or stops the work."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def stopped(self, now: float | None = None) -> bool:
        return self.cancel_reason is not None or (now or time.monotonic()) > self.deadline

    def stop_error(self) -> tuple[int, str]:
        if self.cancel_reason is not None:
            return 499, f"cancelled: {self.cancel_reason}"
        return 504, f"the request did not finish within its timeout ({self.prepared.timeout:g} s)"


class TextStream:
    """One choice's text as its tokens arrive: what can be sent now, and where it ends.

    The text is the tokenizer's decoding of all the tokens so far (special tokens skipped). Text that
    could still be the start of a stop string, or that ends in an incomplete character, is held back.
    At a stop string the choice ends (finish_reason "stop") and later tokens are ignored."""

    def __init__(self, tokenizer, stops: list[str], stop_ids: tuple[int, ...]):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, set(stop_ids)
        self.ids: list[int] = []
        self.sent = ""
        self.finish: str | None = None

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; the new text that can be sent."""
        if self.finish is not None:
            return ""
        self.ids.append(int(token))
        if int(token) in self.stop_ids:
            self.finish = "stop"
            return self._flush()
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        text = self._decoded()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish = "stop"
            return self._send(text[:cut])
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        return self._send(text)

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer rewrote earlier text: keep what was sent
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _flush(self) -> str:
        return self._advance(final=True)

    def close(self, stopped: bool) -> str:
        """The rest of the text at the end of the row (stopped: it ended on a stop token)."""
        if self.finish is not None:
            return ""
        delta = self._flush()
        if self.finish is None:
            self.finish = "stop" if stopped else "length"
        return delta

    @classmethod
    def whole(cls, tokenizer, stops, stop_ids, ids: list[int]) -> tuple[str, str]:
        """(text, finish_reason) of a finished row at once."""
        stream = cls(tokenizer, stops, stop_ids)
        stopped = bool(ids) and int(ids[-1]) in stream.stop_ids
        for t in ids:
            stream.push(t)
        stream.close(stopped)
        return stream.sent, stream.finish


class _BatchStreamer:
    """The loop's streamer for a batch: put(tokens [rows]) each step, split among the streaming jobs."""

    def __init__(self, jobs: list[Job], rows_per_prompt: int, tokenizer, check: Callable[[], None]):
        self.check = check
        self.rows = 0
        self.targets: dict[int, tuple[Job, int, TextStream]] = {}  # batch row -> (job, choice, stream)
        self.streams: dict[int, list[TextStream]] = {}  # id(job) -> its choices' streams
        for job in jobs:
            p = job.prepared
            streams = []
            for prompt in range(len(p.prompts)):
                for choice in range(rows_per_prompt):
                    if p.stream:
                        stream = TextStream(tokenizer, p.stops, p.settings.stop_ids)
                        self.targets[self.rows] = (job, len(streams), stream)
                        streams.append(stream)
                    self.rows += 1
            if p.stream:
                self.streams[id(job)] = streams
        self.broken = False

    def put(self, tokens) -> None:
        if self.broken:
            return
        tokens = tokens.tolist()
        if len(tokens) != self.rows:  # not one row per choice: stream the answers at the end instead
            self.broken = True
            return
        for row, (job, choice, stream) in self.targets.items():
            if job.stopped():
                continue
            delta = stream.push(tokens[row])
            if delta:
                job.emit("delta", (choice, delta))
        self.check()

    def end(self) -> None:
        pass


class Worker:
    """The thread that owns the model: takes batches of compatible jobs off the queue and runs them."""

    def __init__(self, served, *, max_queue: int = 64, max_batch: int = 8, batch_wait: float = 0.0):
        if max_queue < 1 or max_batch < 1 or batch_wait < 0:
            raise ValueError("max_queue and max_batch must be >= 1, batch_wait >= 0")
        self.served = served
        self.max_queue, self.max_batch, self.batch_wait = max_queue, max_batch, batch_wait
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._hooks: list = []
        self.stats = collections.Counter()  # batches, jobs, cancelled_running, dropped_waiting, ...

    # --------------------------------------------------------------------------- handler side
    def start(self) -> None:
        import torch

        models = [self.served.policy.model, *(m for m, _ in self.served.context._loaded.values())]
        for model in {id(m): m for m in models if isinstance(m, torch.nn.Module)}.values():
            self._hooks.append(model.register_forward_pre_hook(self._before_forward))
        self._thread = threading.Thread(target=self._loop, name="align-decode-worker", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            for job in self._waiting:
                job.cancel("the server is shutting down")
            for job in self._running:
                job.cancel("the server is shutting down")
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats["refused_queue_full"] += 1
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancelled(self) -> None:
        """A handler cancelled a job: wake the worker so a waiting job is dropped at once."""
        with self._cond:
            self._cond.notify_all()

    def queue_length(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        """Jobs in the batch being run."""
        return len(self._running)

    # --------------------------------------------------------------------------- worker side
    def _take(self) -> list[Job] | None:
        """The next batch: the oldest live job and the waiting jobs with its key (None when closing)."""
        with self._cond:
            while True:
                self._drop_stopped()
                if self._closing:
                    return None
                if self._waiting:
                    break
                self._cond.wait(0.5)
            if self.batch_wait > 0:
                key = self._waiting[0].prepared.batch_key
                until = time.monotonic() + self.batch_wait
                while not self._closing and time.monotonic() < until and \
                        sum(len(j.prepared.prompts) for j in self._waiting if j.prepared.batch_key == key) < self.max_batch:
                    self._cond.wait(max(0.0, until - time.monotonic()))
                self._drop_stopped()
                if not self._waiting:
                    return []
            first = self._waiting.popleft()
            batch, prompts = [first], len(first.prepared.prompts)
            for job in list(self._waiting):
                if job.prepared.batch_key == first.prepared.batch_key and prompts + len(job.prepared.prompts) <= self.max_batch:
                    self._waiting.remove(job)
                    batch.append(job)
                    prompts += len(job.prepared.prompts)
            self._running = batch
            return batch

    def _drop_stopped(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._waiting if j.stopped(now)]:
            self._waiting.remove(job)
            self.stats["dropped_waiting"] += 1
            job.emit("error", job.stop_error())

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._run_isolated(batch)
            finally:
                with self._cond:
                    self._running = []

    def _before_forward(self, module, args) -> None:
        guard = self._guard
        # Only the worker's own forward passes: a request thread building a strategy may run one too.
        if guard is not None and threading.current_thread() is self._thread:
            guard()

    _guard: Callable[[], None] | None = None

    def _run_isolated(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            job.started = now
        try:
            results = self._run(jobs)
        except Cancelled:
            self.stats["cancelled_running"] += 1
            for job in jobs:
                job.emit("error", job.stop_error())
            return
        except Exception as e:  # noqa: BLE001 (reported to the client)
            if len(jobs) > 1:
                self.stats["isolated_reruns"] += 1
                for job in jobs:
                    self._run_isolated([job])
                return
            status = 400 if isinstance(e, ValueError) else 500
            jobs[0].emit("error", (status, f"{type(e).__name__}: {e}"))
            return
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        for job, result in zip(jobs, results):
            if job.stopped():
                job.emit("error", job.stop_error())
            else:
                job.emit("done", result)

    def _run(self, jobs: list[Job]) -> list[dict]:
        import torch

        from ..decoding import PromptBatch, left_pad

        served = self.served
        first = jobs[0].prepared
        strategy, method = first.strategy, first.method
        policy, tokenizer = served.policy, served.tokenizer
        prompts = [ids for j in jobs for ids in j.prepared.prompts]
        texts = [t for j in jobs for t in j.prepared.prompt_texts]
        seeds = [s for j in jobs for s in j.prepared.seeds]

        def check() -> None:
            now = time.monotonic()
            if all(j.stopped(now) for j in jobs):
                raise Cancelled()

        settings = replace(first.settings, seeds=torch.tensor(seeds, dtype=torch.long),
                           progress=lambda what, done, total: check())
        streamer = None
        if strategy.streams and any(j.prepared.stream for j in jobs):
            streamer = _BatchStreamer(jobs, settings.num_return_sequences, tokenizer, check)
            settings.streamer = streamer
        ids, mask = left_pad(prompts, settings.pad_id, device=policy.device)
        batch = PromptBatch(ids, mask, texts)
        check()
        started = time.perf_counter()
        self._guard = check
        try:
            with torch.no_grad():
                decoded = strategy.run(policy, batch, settings)
        finally:
            self._guard = None
        run_seconds = time.perf_counter() - started
        outputs = method.layout(decoded, len(prompts))
        batch_info = {"requests": len(jobs), "prompts": len(prompts), "sampled_tokens": decoded.total_sampled(),
                      "run_seconds": round(run_seconds, 4), **_report_numbers(decoded.extras)}
        results, at = [], 0
        for job in jobs:
            p = job.prepared
            mine = outputs[at : at + len(p.prompts)]
            streams = streamer.streams.get(id(job)) if streamer is not None and not streamer.broken else None
            results.append(self._result(job, mine, streams, batch_info, at, strategy))
            at += len(p.prompts)
        return results

    def _result(self, job: Job, outputs, streams, batch_info: dict, first_row: int, strategy) -> dict:
        """The job's choices (text, finish_reason), usage and, when asked, what the method did."""
        p = job.prepared
        tokenizer = self.served.tokenizer
        stop_ids = p.settings.stop_ids
        choices, candidates_out = [], []
        completion_tokens = generated = 0
        for b, out in enumerate(outputs):
            if p.method.n_is_candidates or len(out.candidates) != p.choices:
                answers = [out.chosen]
            else:
                answers = list(range(len(out.candidates)))
            texts = [TextStream.whole(tokenizer, p.stops, stop_ids, ids) for ids in out.candidates]
            for c, index in enumerate(answers):
                k = b * len(answers) + c
                if streams is not None:  # what was streamed is the answer, to the character
                    stream = streams[k]
                    rest = stream.close(bool(out.candidates[index]) and out.candidates[index][-1] in set(stop_ids))
                    if rest:
                        job.emit("delta", (k, rest))
                    text, finish = stream.sent, stream.finish
                else:
                    text, finish = texts[index]
                    if p.stream and text:
                        job.emit("delta", (k, text))  # a sequence method: the answer once it is decided
                choices.append({"index": k, "text": text, "finish_reason": finish})
                completion_tokens += len(out.candidates[index])
            generated += sum(len(ids) for ids in out.candidates)
            if p.report:
                candidates_out.append((b, out, texts))
        prompt_tokens = sum(len(ids) for ids in p.prompts)
        result = {
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if p.report:
            result["align_decode"] = self._report(job, candidates_out, batch_info, generated, strategy)
        return result

    def _report(self, job: Job, per_prompt, batch_info: dict, generated: int, strategy) -> dict:
        p = job.prepared
        prompts = []
        for b, out, texts in per_prompt:
            scores = {name: reward.score([p.prompt_texts[b]] * len(texts), [t for t, _ in texts]).tolist()
                      for name, reward in p.rewards.items()}
            candidates = []
            for i, (ids, (text, finish)) in enumerate(zip(out.candidates, texts)):
                entry = {"text": text, "tokens": len(ids), "finish_reason": finish}
                if scores:
                    entry["rewards"] = {name: s[i] for name, s in scores.items()}
                candidates.append(entry)
            prompts.append({"candidates": candidates, "chosen": out.chosen, **_jsonable(dict(out.extras))})
        now = time.monotonic()
        return {
            **p.summary,
            "hyperparameters": _jsonable(strategy.hyperparameters()),
            "seeds": p.seeds,
            "prompts": prompts,
            "accounting": {
                "generated_tokens": generated,
                "queue_seconds": round((job.started or now) - job.submitted, 4),
                "batch": batch_info,
            },
        }


def _report_numbers(extras, prefix: str = "") -> dict:
    """The batch-level numbers of a method's report (forward_tokens, cached_tokens, ...), one level deep."""
    from collections.abc import Mapping

    out = {}
    if not isinstance(extras, Mapping):
        return out
    for key, value in extras.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[prefix + str(key)] = value
        elif isinstance(value, Mapping) and not prefix:
            out.update(_report_numbers(value, prefix=f"{key}."))
    return out


def _jsonable(value):
    """Tensors, tuples and other containers as JSON values."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
