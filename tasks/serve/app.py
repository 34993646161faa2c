"""The HTTP server of `llmft serve`: OpenAI routes, the chat page, /health and /metrics.

A generation request meets the cheapest refusals first, so a flood costs little:

    API key (401) → body size, before reading it (413) → JSON and options (400)
    → admission (429 + Retry-After only when every slot and the queue are full)
    → model, tokenization, prompt limits (400) → the engine's queue → a slot

With `--deployed NAME` it serves the GGUF that `artifacts/deployed/NAME/current.json`
points at; the pointer's mtime is checked by every /v1 request, and a promotion loads the
new GGUF while the old engine finishes the requests it holds. /health never loads
anything and shows no paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tasks.config import ServeConfig
from tasks.serve import CHAT_PAGE, ServeError
from tasks.serve.engine import Engine, EngineClosed
from tasks.serve.job import GrammarError, Job
from tasks.serve.metrics import Metrics
from tasks.serve.protocol import Options, Refusal, Reply, bad, parse_options, schema_grammar, usage
from tasks.serve.tools import (
    CallStream,
    call_grammar,
    chat_messages,
    parse_tools,
    render,
    split_calls,
)

log = logging.getLogger("llmft.serve")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class Gate:
    """Admission: at most `capacity` requests inside (generating or queued); the rest 429."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.inside = capacity, 0
        self.lock = threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.inside >= self.capacity:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


class Models:
    """The engine to use now; with a pointer, follows `current.json` across promotions."""

    def __init__(self, cfg: ServeConfig, model: str | None, pointer: Path | None, metrics) -> None:
        self.cfg, self.pointer, self.metrics, self.mtime = cfg, pointer, metrics, -1
        self.lock = threading.Lock()
        self.run_id: str | None = None
        self.engine = Engine(Path(model), cfg, metrics) if model else None
        self.name = Path(model).stem if model else pointer.parent.name  # type: ignore[union-attr]
        if pointer:
            self.current()

    def current(self) -> Engine:
        if self.pointer is None:
            return self.engine  # type: ignore[return-value]
        with self.lock:
            try:
                mtime = self.pointer.stat().st_mtime_ns
            except FileNotFoundError:
                raise ServeError(
                    f"nothing is deployed under {self.name!r} "
                    "(fix: `llmft run` promotes a model, or serve --model FILE.gguf)"
                ) from None
            if mtime != self.mtime:
                self.mtime = mtime  # a pointer that fails to load is not retried until it changes
                pointed = json.loads(self.pointer.read_text())
                gguf = Path(pointed["gguf"])
                if self.engine is None or gguf != self.engine.path:
                    log.info("loading deployed model %s", gguf)
                    try:
                        old, self.engine = self.engine, Engine(gguf, self.cfg, self.metrics)
                        self.run_id = pointed.get("run_id")
                        if old is not None:
                            old.close()  # after the requests it holds
                    except ServeError:
                        if self.engine is None:
                            raise
                        log.exception("keeping the served model: the promoted GGUF does not load")
            return self.engine  # type: ignore[return-value]


class Guard:
    """ASGI middleware: the API key, the body-size cap from Content-Length, request counts."""

    def __init__(self, app: Any, cfg: ServeConfig, metrics: Metrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        status = 500

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        refusal = self.check(path, headers)
        try:
            if refusal is None:
                await self.app(scope, receive, counted)
            else:
                await _error_response(refusal)(scope, receive, counted)
        finally:
            if path in ROUTES:
                self.metrics.requests.labels(path, str(status)).inc()

    def check(self, path: str, headers: dict[bytes, bytes]) -> Refusal | None:
        if self.cfg.api_key and (path.startswith("/v1") or path == "/metrics"):
            given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not secrets.compare_digest(given, self.cfg.api_key.encode()):
                msg = "missing or wrong API key (send the header Authorization: Bearer KEY)"
                return Refusal(401, msg, "invalid_api_key")
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.cfg.max_body_bytes:
            return _too_large(self.cfg)
        return None


def _too_large(cfg: ServeConfig) -> Refusal:
    msg = f"request body over this server's limit of {cfg.max_body_bytes} bytes"
    return Refusal(413, msg, "body_too_large")


def _error_response(refusal: Refusal) -> JSONResponse:
    return JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)


def create_app(
    cfg: ServeConfig,
    model: str | None = None,
    deployed: str | None = None,
    store_root: str | Path = "artifacts",
) -> Any:
    pointer = (
        Path(store_root).resolve() / "deployed" / deployed / "current.json" if deployed else None
    )
    metrics = Metrics(
        queue_depth=lambda: models.engine.queued if models.engine else 0,
        slots_busy=lambda: models.engine.busy if models.engine else 0,
    )
    models = Models(cfg, model, pointer, metrics)
    gate = Gate(cfg.max_concurrent + cfg.max_queue)
    app = FastAPI(title="llmft", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(ServeError)
    async def unavailable(request: Request, exc: ServeError) -> JSONResponse:
        return _error_response(Refusal(503, str(exc), "model_unavailable"))

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        engine = models.engine  # as loaded: a probe never triggers a reload
        out = {
            "status": "ok",
            "model": models.name,
            "slots": cfg.max_concurrent,
            "slots_busy": engine.busy if engine else 0,
            "queued": engine.queued if engine else 0,
            "inside": gate.inside,
            "capacity": gate.capacity,
        }
        return out | ({"run_id": models.run_id} if models.run_id else {})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models() -> dict:
        card = {"id": models.name, "object": "model", "created": 0, "owned_by": "llmft"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        arrived = time.perf_counter()
        body = await _read_json(request, cfg)
        messages = chat_messages(body.get("messages"))
        opts = parse_options(body, chat=True, cfg=cfg)
        opts.tools = parse_tools(body, opts)
        return await generate(request, opts, lambda e: render(e, messages, opts.tools), arrived)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        arrived = time.perf_counter()
        body = await _read_json(request, cfg)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt must be one string", "invalid_prompt")
        opts = parse_options(body, chat=False, cfg=cfg)
        return await generate(request, opts, lambda e: (e.text_prompt(prompt), []), arrived)

    async def generate(request: Request, opts: Options, render: Callable, arrived: float) -> Any:
        if not gate.enter():
            msg = f"server busy: {gate.capacity} requests already running or queued; retry"
            raise Refusal(429, msg, "rate_limit_exceeded", {"Retry-After": "1"})
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:  # from the decode thread
            # RuntimeError: the event loop has closed (the server is shutting down)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            engine, job = await run_in_threadpool(prepare, opts, render, emit, arrived)
        except BaseException:
            gate.leave()
            raise
        reply = Reply(opts.chat, models.name, engine.piece)
        if opts.stream:
            chunks = _sse(events, reply, opts, lambda: (engine.cancel(job), gate.leave()))
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            out = await _collect(request, events, reply, opts)
        finally:
            engine.cancel(job)  # a no-op once it has finished
            gate.leave()
        return JSONResponse(out) if out is not None else Response(status_code=499)

    def prepare(opts: Options, render: Callable, emit: Callable, arrived: float):
        """Admitted: tokenize, check the prompt against the limits, queue the job."""
        engine = models.current()
        tokens, stops = render(engine)
        n, ctx = len(tokens), min(cfg.n_ctx, engine.n_ctx)
        if n == 0:
            raise bad("the prompt is empty", "invalid_prompt")
        if n > cfg.max_prompt_tokens:
            msg = f"the prompt has {n} tokens; the limit is {cfg.max_prompt_tokens}"
            raise bad(msg, "prompt_too_long")
        max_tokens = opts.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens, ctx - n)
        if max_tokens > ctx - n or max_tokens < 1:
            msg = f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context of {ctx} tokens"
            raise bad(msg, "context_length_exceeded")
        if opts.schema is not None:
            opts.sampling.grammar = schema_grammar(opts.schema)
        if opts.tools is not None and opts.tools.forced:
            opts.sampling.grammar = call_grammar(opts.tools)
        job = Job(tokens, max_tokens, opts.sampling, emit, stops + opts.stop, opts.top_logprobs)
        job.arrived = arrived
        try:
            engine.submit(job)
        except GrammarError as exc:
            raise bad(f"grammar: {exc}", "bad_grammar") from None
        except EngineClosed as exc:
            raise Refusal(503, str(exc), "model_reloading", {"Retry-After": "1"}) from None
        metrics.prompt_tokens.inc(n)
        return engine, job

    return Guard(app, cfg, metrics)


async def _read_json(request: Any, cfg: ServeConfig) -> dict:
    """The body, read up to the cap (a chunked upload has no Content-Length to check)."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > cfg.max_body_bytes:
            raise _too_large(cfg)
        parts.append(part)
    try:
        body = json.loads(b"".join(parts))
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise bad("invalid request: body: expected a JSON object")
    return body


async def _collect(request: Any, events: asyncio.Queue, reply: Reply, opts: Options) -> dict | None:
    """The whole answer; None when the client went away first (its job is then cancelled)."""
    parts, entries = [], []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if event[0] == "delta":
            parts.append(event[1])
            entries += event[2]
        elif event[0] == "error":
            raise Refusal(500, event[1], "generation_failed")
        else:
            _, reason, prompt, completion, cached = event
            text, calls = split_calls("".join(parts), opts.tools)
            return reply.whole(text, entries, reason, usage(prompt, completion, cached), calls)


async def _sse(
    events: asyncio.Queue, reply: Reply, opts: Options, done: Callable[[], Any]
) -> AsyncIterator[str]:
    """Server-sent events, one per piece of text; `done` runs however the stream ends. With
    tools, text that may be a call is held back and sent as tool_calls at the end."""

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        calls = CallStream(opts.tools) if opts.tools and opts.tools.offered else None
        if opts.chat:
            yield data(reply.chunk(None, []))
        while True:
            event = await events.get()
            if event[0] == "delta":
                text = calls.feed(event[1]) if calls else event[1]
                if text or event[2]:
                    yield data(reply.chunk(text, event[2]))
            elif event[0] == "error":
                yield data({"error": {"message": event[1], "type": "server_error"}})
                return
            else:
                _, reason, prompt, completion, cached = event
                tail, found = calls.finish() if calls else ("", [])
                if tail:
                    yield data(reply.chunk(tail, []))
                for i, call in enumerate(found):
                    yield data(reply.call_chunk(i, call))
                reason = "tool_calls" if found and reason == "stop" else reason
                yield data(reply.chunk("", [], reason))
                if opts.include_usage:
                    yield data(reply.usage_chunk(usage(prompt, completion, cached)))
                yield "data: [DONE]\n\n"
                return
    finally:
        done()
