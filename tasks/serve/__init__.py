"""CPU serving through llama.cpp: one-shot and interactive chat, an OpenAI API, a chat page.

    llmft chat  --model FILE.gguf --prompt TEXT    one greedy answer, then exit
    llmft chat  --model FILE.gguf                  interactive: history, streamed tokens
    llmft serve --model FILE.gguf | --deployed NAME
        POST /v1/chat/completions  (stream or not)   POST /v1/completions
        GET  /v1/models   GET /health   GET /  (the chat page, tasks/chat_page.html)

Prompts are rendered by the chat template stored in the GGUF (llama-cpp-python's
`create_chat_completion`), the same one training used. The server binds 127.0.0.1 unless
told otherwise, checks `Authorization: Bearer KEY` on /v1 when a key is set, answers 400
past `serve.max_prompt_tokens` / `serve.max_tokens`, runs `serve.max_concurrent`
generations (one llama.cpp context each) with `serve.max_queue` more waiting, and answers
429 with Retry-After beyond that instead of piling up. With `--deployed NAME` it serves
the GGUF that `artifacts/deployed/NAME/current.json` points at and reloads when a
promotion rewrites that file (its mtime is checked on every request).
"""

import asyncio
import json
import logging
import os
import queue
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.config import ServeConfig, UserError

CHAT_PAGE = Path(__file__).with_name("chat_page.html")
log = logging.getLogger("llmft.serve")


class ServeError(UserError):
    """The model file or the deployed pointer is missing or unusable."""


def load_llama(path: str | Path, n_ctx: int = 2048, n_threads: int | None = None) -> Any:
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise ServeError(f"{path}: GGUF file not found (fix: --model path/to/model.gguf)")
    try:
        return Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), verbose=False
        )
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ServeError(f"{path}: llama.cpp cannot load it ({exc})") from exc


def answer(model_path: str, prompt: str, max_tokens: int = 128) -> str:
    """One greedy answer from a GGUF (what `llmft run` prints at the end)."""
    llm = load_llama(model_path)
    messages = [{"role": "user", "content": prompt}]
    out = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0)
    return (out["choices"][0]["message"]["content"] or "").strip()


def chat(
    model: str, prompt: str | None = None, cfg: ServeConfig | None = None, max_tokens: int = 256
) -> int:
    """`llmft chat`: one answer with a prompt, else an interactive chat. Returns exit status."""
    cfg = cfg or ServeConfig()
    llm = load_llama(model, cfg.n_ctx, cfg.n_threads)
    if prompt is not None:
        messages = [{"role": "user", "content": prompt}]
        out = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0)
        print((out["choices"][0]["message"]["content"] or "").strip())
        return 0
    print(f"Chatting with {Path(model).name}. /reset forgets the conversation; /exit or Ctrl-D.")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in {"/exit", "/quit"}:
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        history = _fit(llm, history, cfg.n_ctx - max_tokens)
        parts = []
        stream = llm.create_chat_completion(
            history, max_tokens=max_tokens, temperature=0.0, stream=True
        )
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content") or ""
            parts.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(parts).strip()})


def _fit(llm: Any, history: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """Drop the oldest exchanges until the conversation fits the context with room to answer."""
    count = _chat_counter(llm)
    while len(history) > 1 and count(history) > budget:
        history = history[2:]
    return history


def _chat_counter(llm: Any) -> Callable[[list[dict]], int]:
    """Tokens of messages as the GGUF's chat template renders them."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return lambda messages: sum(_count(llm, m.get("content") or "") + 4 for m in messages)
    text = llm._model.token_get_text
    formatter = Jinja2ChatFormatter(template, text(llm.token_eos()), text(llm.token_bos()))
    return lambda messages: _count(llm, formatter(messages=messages).prompt)


def _count(llm: Any, text: str) -> int:
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


# --- the HTTP server ----------------------------------------------------------------------


class Engine:
    """One GGUF: `max_concurrent` llama.cpp contexts to lend out, and a vocab-only tokenizer."""

    def __init__(self, path: Path, cfg: ServeConfig) -> None:
        from llama_cpp import Llama

        self.path = path
        self.contexts: queue.Queue[Any] = queue.Queue()
        for _ in range(cfg.max_concurrent):
            self.contexts.put(load_llama(path, cfg.n_ctx, cfg.n_threads))
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # a vocab-only load warns about n_ctx
            self.vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.count_chat = _chat_counter(self.vocab)

    def count_text(self, text: str) -> int:
        return _count(self.vocab, text)


class Gate:
    """Admission: at most `running + waiting` requests inside; the rest get 429 at once."""

    def __init__(self, running: int, waiting: int) -> None:
        self.capacity, self.inside = running + waiting, 0
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
    """The engine to use now; with `deployed`, follows `current.json` across promotions."""

    def __init__(self, cfg: ServeConfig, model: str | None, pointer: Path | None) -> None:
        self.cfg, self.pointer, self.mtime = cfg, pointer, -1
        self.lock = threading.Lock()
        self.engine = Engine(Path(model), cfg) if model else None
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
                    f"{self.pointer}: nothing is deployed under {self.name!r} "
                    "(fix: `llmft run` promotes a model, or serve --model FILE.gguf)"
                ) from None
            if mtime != self.mtime:
                self.mtime = mtime  # a pointer that fails to load is not retried until it changes
                gguf = Path(json.loads(self.pointer.read_text())["gguf"])
                if self.engine is None or gguf != self.engine.path:
                    log.info("loading deployed model %s", gguf)
                    try:
                        self.engine = Engine(gguf, self.cfg)
                    except ServeError:
                        if self.engine is None:
                            raise
                        log.exception(
                            "keeping %s: the promoted GGUF does not load", self.engine.path
                        )
            return self.engine  # type: ignore[return-value]


def create_app(
    cfg: ServeConfig,
    model: str | None = None,
    deployed: str | None = None,
    store_root: str | Path = "artifacts",
) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    pointer = (
        Path(store_root).resolve() / "deployed" / deployed / "current.json" if deployed else None
    )
    models = Models(cfg, model, pointer)
    gate = Gate(cfg.max_concurrent, cfg.max_queue)
    app = FastAPI(title="llmft", docs_url=None, redoc_url=None)

    def error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(400, f"invalid request: {where}", "invalid_request")

    @app.exception_handler(ServeError)
    async def unavailable(request: Request, exc: ServeError) -> JSONResponse:
        return error(503, str(exc), "model_unavailable")

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable) -> Any:
        if cfg.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), cfg.api_key.encode()):
                msg = "missing or wrong API key (send the header Authorization: Bearer KEY)"
                return error(401, msg, "invalid_api_key")
        return await call_next(request)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        engine = await run_in_threadpool(models.current)
        return {
            "status": "ok",
            "model": models.name,
            "gguf": str(engine.path),
            "inside": gate.inside,
            "capacity": gate.capacity,
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        card = {"id": models.name, "object": "model", "created": 0, "owned_by": "llmft"}
        return {"object": "list", "data": [card]}

    async def respond(body: dict, make: Callable[[Any, dict], Any], prompt_tokens: int, engine):
        """Check the caps, admit or refuse, then run `make(llm, kwargs)` on a free context."""
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if asked is not None and (not isinstance(asked, int) or asked < 1):
            return error(400, f"max_tokens must be a positive integer, got {asked!r}", "bad_max")
        if asked is not None and asked > cfg.max_tokens:
            msg = f"max_tokens={asked} exceeds this server's limit of {cfg.max_tokens}"
            return error(400, msg, "max_tokens_too_large")
        if prompt_tokens > cfg.max_prompt_tokens:
            msg = f"the prompt has {prompt_tokens} tokens; the limit is {cfg.max_prompt_tokens}"
            return error(400, msg, "prompt_too_long")
        room = cfg.n_ctx - prompt_tokens
        max_tokens = asked or min(cfg.default_max_tokens, cfg.max_tokens, room)
        if max_tokens > room:
            msg = (
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context of {cfg.n_ctx} tokens"
            )
            return error(400, msg, "context_length_exceeded")
        try:
            kwargs = _sampling(body) | {"max_tokens": max_tokens}
        except (TypeError, ValueError):
            return error(400, "logit_bias must map token ids to numbers", "invalid_logit_bias")
        if not gate.enter():
            msg = f"server busy: {gate.capacity} requests already running or queued; retry"
            return error(429, msg, "rate_limit_exceeded", {"Retry-After": "1"})
        if not body.get("stream"):
            try:
                out = await run_in_threadpool(_with_context, engine, lambda llm: make(llm, kwargs))
            finally:
                gate.leave()
            return JSONResponse(out | {"model": models.name})
        chunks = _stream(engine, lambda llm: make(llm, kwargs | {"stream": True}), gate.leave)
        return StreamingResponse(_sse(chunks, models.name), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "messages must be a non-empty list", "invalid_messages")
        messages = [_plain_message(m) for m in messages]
        if any(m is None for m in messages):
            return error(400, "each message needs a role and text content", "invalid_messages")
        engine = await run_in_threadpool(models.current)
        prompt_tokens = await run_in_threadpool(engine.count_chat, messages)
        make = lambda llm, kw: llm.create_chat_completion(messages=messages, **kw)  # noqa: E731
        return await respond(body, make, prompt_tokens, engine)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return error(400, "prompt must be one string", "invalid_prompt")
        engine = await run_in_threadpool(models.current)
        prompt_tokens = await run_in_threadpool(engine.count_text, prompt)
        make = lambda llm, kw: llm.create_completion(prompt=prompt, **kw)  # noqa: E731
        return await respond(body, make, prompt_tokens, engine)

    return app


async def _json(request: Any) -> dict:
    from fastapi.exceptions import RequestValidationError

    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RequestValidationError([{"loc": ("body",), "msg": "expected a JSON object"}])
    return body


def _plain_message(m: Any) -> dict[str, str] | None:
    """OpenAI messages may carry content as a list of parts; llama.cpp templates want text."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return None
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"role": m["role"], "content": content} if isinstance(content, str) else None


def _sampling(body: dict) -> dict[str, Any]:
    keys = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
    kwargs = {k: body[k] for k in keys if body.get(k) is not None}
    if isinstance(body.get("logit_bias"), dict):  # JSON keys are strings; llama.cpp wants ids
        kwargs["logit_bias"] = {int(t): float(b) for t, b in body["logit_bias"].items()}
    return kwargs


def _with_context(engine: Engine, fn: Callable[[Any], Any]) -> Any:
    llm = engine.contexts.get()  # waits for a free context: this request is in the queue
    try:
        return fn(llm)
    finally:
        engine.contexts.put(llm)


def _stream(engine: Engine, make: Callable[[Any], Iterator[dict]], done: Callable[[], None]):
    """Generate in a thread; chunks cross to the event loop through an asyncio queue.

    The thread owns the context from start to end, so a client that goes away mid-answer
    only stops the generation at the next token; the context is returned only then.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shutting down)
            stop.set()

    def produce(llm: Any) -> None:
        for chunk in make(llm):
            if stop.is_set():
                break
            put(chunk)

    def work() -> None:
        try:
            _with_context(engine, produce)
        except Exception as exc:  # reported to the client as an error event
            log.exception("generation failed")
            put(exc)
        finally:
            done()
            put(None)

    threading.Thread(target=work, daemon=True).start()

    async def read() -> AsyncIterator[Any]:
        try:
            while (item := await chunks.get()) is not None:
                yield item
        finally:
            stop.set()

    return read()


async def _sse(chunks: AsyncIterator[Any], name: str) -> AsyncIterator[str]:
    async for chunk in chunks:
        if isinstance(chunk, Exception):
            payload = {"error": {"message": f"generation failed: {chunk}", "type": "server_error"}}
            yield f"data: {json.dumps(payload)}\n\n"
            return
        yield f"data: {json.dumps(chunk | {'model': name}, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def serve(
    model: str | None = None,
    deployed: str | None = None,
    cfg: ServeConfig | None = None,
    store_root: str | Path = "artifacts",
) -> None:
    """`llmft serve`: the OpenAI API and the chat page until Ctrl-C."""
    import uvicorn

    cfg = cfg or ServeConfig()
    app = create_app(cfg, model=model, deployed=deployed, store_root=store_root)
    if cfg.host not in {"127.0.0.1", "localhost", "::1"} and not cfg.api_key:
        log.warning("serving on %s without an API key: anyone who reaches it can use it", cfg.host)
    print(f"llmft: OpenAI API at http://{cfg.host}:{cfg.port}/v1, chat page at /", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


def main() -> None:
    from flows.cli import main as cli

    sys.exit(cli(["serve", *sys.argv[1:]]))
