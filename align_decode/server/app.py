"""The FastAPI app: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`, served by a
`Worker` (worker.py) over a `ServedModel` (model.py).

    app = create_app(ServedModel.load("DIR", rewards=["sentiment"]), max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)      # or: align-decode serve --model DIR ...

HTTP statuses: 400 for a request that cannot be served as asked (unknown method, bad option, unknown
reward, malformed body: the reason is in `error.message`, OpenAI's error shape), 404 for another model
name, 429 when the queue is full (with Retry-After), 504 when a request runs past its timeout. A
streamed response has already sent 200 when an error happens: the error comes as one `data:
{"error": ...}` event before `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .model import RequestError, ServedModel
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .worker import Job, QueueFull, Worker

_POLL = 0.1  # seconds between checks of a waiting client's connection
_GRACE = 1.0  # a handler waits this much past a job's deadline for the worker's own timeout answer


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
            504: "timeout_error"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "malformed request body"


def create_app(served: ServedModel, *, max_queue: int = 64, max_batch: int = 8, batch_wait: float = 0.0,
               worker: Worker | None = None) -> FastAPI:
    """The app; its worker thread starts with the app (lifespan) and stops with it."""
    import contextlib

    worker = worker or Worker(served, max_queue=max_queue, max_batch=max_batch, batch_wait=batch_wait)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.close()

    app = FastAPI(title="align-decode serve", lifespan=lifespan)
    app.state.worker, app.state.served = worker, served
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(400, _validation_message(exc))

    @app.get("/v1/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=served.name, created=created)]).model_dump()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue": worker.queue_length(), "running": worker.running(), **served.describe(),
                "stats": dict(worker.stats)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _complete(body, request, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(body, request, "completion")

    async def _complete(body, request: Request, kind: str):
        try:
            prepared = await run_in_threadpool(served.prepare, body, kind)
        except RequestError as e:
            return error_response(e.status, str(e), e.param, e.code)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(what: str, payload: Any) -> None:  # from the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (what, payload))

        job = Job(prepared, emit)
        try:
            worker.submit(job)
        except QueueFull as e:
            return error_response(429, str(e), code="queue_full", headers={"Retry-After": "1"})
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if prepared.stream:
            return StreamingResponse(_stream(job, events, ident, kind, body.model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        what, payload = await _wait_done(job, events, request)
        if what == "gone":
            return error_response(499, "client disconnected")
        if what == "error":
            status, message = payload
            return error_response(status, message)
        return JSONResponse(_body(kind, ident, body.model, payload))

    async def _next_event(job: Job, events: asyncio.Queue, request: Request | None):
        """The job's next event; ("gone", None) when the client disconnected, a timeout error past the
        deadline (the job is cancelled in both cases, so the worker drops or stops it)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=_POLL)
            except asyncio.TimeoutError:
                pass
            if request is not None and await request.is_disconnected():
                _cancel(job, "client disconnected")
                return "gone", None
            if time.monotonic() > job.deadline + _GRACE:
                worker.cancelled()  # past its deadline the job counts as stopped: the worker drops or stops it
                return "error", job.stop_error()

    def _cancel(job: Job, reason: str) -> None:
        job.cancel(reason)
        worker.cancelled()

    async def _wait_done(job: Job, events: asyncio.Queue, request: Request):
        while True:
            what, payload = await _next_event(job, events, request)
            if what != "delta":
                return what, payload

    async def _stream(job: Job, events: asyncio.Queue, ident: str, kind: str, model: str):
        """Server-sent events, OpenAI's chunk format. Starlette cancels this generator when the client
        disconnects; the finally clause then cancels the job."""
        created_at = int(time.time())
        chunk_type = "chat.completion.chunk" if kind == "chat" else "text_completion"
        p = job.prepared
        total = len(p.prompts) * (1 if p.method.n_is_candidates else p.choices)

        def chunk(choices: list, **extra) -> str:
            data = {"id": ident, "object": chunk_type, "created": created_at, "model": model, "choices": choices,
                    **extra}
            return f"data: {json.dumps(data)}\n\n"

        def choice(index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

        try:
            if kind == "chat":
                yield chunk([choice(i, None, role=True) for i in range(total)])
            while True:
                what, payload = await _next_event(job, events, None)
                if what == "delta":
                    index, text = payload
                    yield chunk([choice(index, text)])
                    continue
                if what == "error":
                    status, message = payload
                    yield f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"
                    break
                result = payload  # done
                extra = {"align_decode": result["align_decode"]} if "align_decode" in result else {}
                yield chunk([choice(c["index"], None if kind == "chat" else "", c["finish_reason"])
                             for c in result["choices"]], **extra)
                if p.include_usage:
                    yield chunk([], usage=result["usage"])
                break
            yield "data: [DONE]\n\n"
        finally:
            if job.cancel_reason is None:
                # Finished normally, or the client went away mid-stream: cancelling a finished job is a no-op.
                _cancel(job, "client disconnected")

    return app


def _body(kind: str, ident: str, model: str, result: dict) -> dict:
    if kind == "chat":
        choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                    "finish_reason": c["finish_reason"]} for c in result["choices"]]
        obj = "chat.completion"
    else:
        choices = [{"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                   for c in result["choices"]]
        obj = "text_completion"
    body = {"id": ident, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": result["usage"]}
    if "align_decode" in result:
        body["align_decode"] = result["align_decode"]
    return body


class BackgroundServer:
    """uvicorn serving an app on a thread of this process (tests, benchmarks): `url` once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        until = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > until:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
