"""CPU serving through llama.cpp: one-shot and interactive chat, an OpenAI API, a chat page.

    llmft chat  --model FILE.gguf --prompt TEXT    one greedy answer, then exit
    llmft chat  --model FILE.gguf                  interactive: history, streamed tokens
    llmft serve --model FILE.gguf | --deployed NAME          (or python -m tasks.serve …)
        POST /v1/chat/completions  POST /v1/completions  (streamed or not)
        GET  /v1/models   GET /health   GET /metrics   GET /  (the chat page)

Prompts are rendered by the chat template stored in the GGUF, the same one training used.
The server (tasks/serve/app.py) decodes every request in one llama.cpp context with
`serve.max_concurrent` sequence slots, continuously batched (tasks/serve/engine.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import ServeConfig, UserError, load_config

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


def load_vocab(path: Path) -> Any:
    """The GGUF's tokenizer and metadata only (no weights): tokenizing and chat templates."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    if not path.is_file():
        raise ServeError(f"{path}: GGUF file not found (fix: --model path/to/model.gguf)")
    try:
        with suppress_stdout_stderr(disable=False):  # a vocab-only load warns about n_ctx
            return Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as exc:
        raise ServeError(f"{path}: llama.cpp cannot load it ({exc})") from exc


def chat_formatter(llm: Any) -> Callable[..., Any]:
    """The GGUF's own chat template (ChatML when it has none), as `f(messages=[...])`."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter, format_chatml

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return format_chatml
    text = llm._model.token_get_text
    return Jinja2ChatFormatter(template, text(llm.token_eos()), text(llm.token_bos()))


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
    render = chat_formatter(llm)

    def count(messages: list[dict[str, str]]) -> int:
        text = render(messages=messages).prompt.encode("utf-8")
        return len(llm.tokenize(text, add_bos=False, special=True))

    while len(history) > 1 and count(history) > budget:
        history = history[2:]
    return history


def create_app(
    cfg: ServeConfig,
    model: str | None = None,
    deployed: str | None = None,
    store_root: str | Path = "artifacts",
) -> Any:
    """The FastAPI app of `llmft serve` (see tasks/serve/app.py)."""
    from tasks.serve.app import create_app as create

    return create(cfg, model=model, deployed=deployed, store_root=store_root)


def serve(
    model: str | None = None,
    deployed: str | None = None,
    cfg: ServeConfig | None = None,
    store_root: str | Path = "artifacts",
) -> None:
    """`llmft serve`: the OpenAI API and the chat page until Ctrl-C."""
    import uvicorn

    # llama.cpp's OpenMP threads meet at a barrier after every operation of every layer.
    # By default a thread that arrives early spins for a while; when another process, or
    # this server's own event loop, has a core, the spinning thread burns the time its
    # partner needs: on 2 busy cores, 1.2 tokens/s instead of 16.6 for one request. Passive
    # threads sleep instead. Read when llama.cpp loads, so only before its first import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cfg = cfg or ServeConfig()
    app = create_app(cfg, model=model, deployed=deployed, store_root=store_root)
    if cfg.host not in {"127.0.0.1", "localhost", "::1"} and not cfg.api_key:
        log.warning("serving on %s without an API key: anyone who reaches it can use it", cfg.host)
    print(f"llmft: OpenAI API at http://{cfg.host}:{cfg.port}/v1, chat page at /", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.serve`: the server alone, with the same flags as `llmft serve`."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible API and chat page for a GGUF")
    parser.add_argument("--model", help="FILE.gguf")
    parser.add_argument("--deployed", help="serve the promoted model NAME (follows promotions)")
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--set", action="append", default=[], help="serve.key=value")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    for key in ("host", "port", "api_key"):
        if getattr(args, key) is not None:
            overrides.append(f"serve.{key}={getattr(args, key)}")
    try:
        if not args.model and not args.deployed:
            raise ServeError("give --model FILE.gguf or --deployed NAME")
        cfg = load_config(args.config, overrides)
        serve(args.model, args.deployed, cfg.serve, store_root=cfg.pipeline.store)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
