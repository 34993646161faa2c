"""Fidelity: a GGUF renders, tokenizes and stops exactly as the fine-tuned HF model trained.

Each side goes through its own path, never through the other's token ids:

- HF: `formatting.prompt_ids` on the fine-tuned tokenizer with the training template, the
  ids training fed the model (for a chat template: `apply_chat_template(...,
  add_generation_prompt=True)`).
- GGUF: llama-cpp-python's `create_chat_completion`, the path `llmft serve` and `llmft
  chat` take: the GGUF's stored `tokenizer.chat_template` rendered by its Jinja formatter
  with the GGUF's own BOS/EOS texts, then llama.cpp's tokenizer with special-token parsing
  and no added BOS. The prompt is observed where that path tokenizes it, before anything
  is evaluated, so a vocabulary-only load suffices.

Checked for every conversation (single and multi-turn, system message, non-ASCII, CJK,
and the dev records): the ids are equal, the prompt does not open with BOS twice, and
every token that ends a trained answer is an end-of-generation token for llama.cpp (so
serving stops where training stopped); each message's text tokenizes alike without
special parsing. A mismatch fails the export with its position and both renderings.
Probe texts beyond the records (whitespace runs, digits, accents, CJK, emoji, code) are
tokenized too; a difference there is reported, not fatal, since the data may never hold
it (docs/fidelity.md lists what the families show).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.export.verify import ExportError
from tasks.formatting import prompt_ids, prompt_text, stop_token_ids, to_messages

CONVERSATIONS: dict[str, dict[str, Any]] = {
    "single turn": {"instruction": "What is the capital of France?"},
    "system message": {
        "system": "You are a terse assistant. Answer in one word.",
        "instruction": "Name a prime number.",
    },
    "multi-turn": {
        "history": [["Hi there!", "Hello! How can I help you today?"]],
        "instruction": "Tell me a short joke.",
    },
    "system + multi-turn": {
        "system": "You answer politely.",
        "history": [["What is 2 + 2?", "2 + 2 = 4."], ["And 3 + 3?", "3 + 3 = 6."]],
        "instruction": "Thanks! And 4 + 4?",
    },
    "input field": {"instruction": "Translate to French.", "input": "Good morning, friends."},
    "non-ASCII": {"instruction": "Café, naïve, Übermaß — ¿qué tal? Ελληνικά, русский 🙂"},
    "CJK": {"instruction": "中国的首都是哪里？日本の首都はどこですか。한국의 수도는?"},
}
# Plain text, tokenized without special parsing: what pre-tokenizers disagree on.
TEXTS = (
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \n",
    "Hello world",
    " Hello world",
    "Hello World!",
    "  leading and trailing  ",
    "don't you're I'll we've it's",
    "3333333 1234567890 3.14159",
    "Ünïcödé àçcénts — “quotes” … ½",
    "Привет, мир",
    "日本語のテキスト",
    "中文测试，标点。",
    "한국어 문장입니다",
    "emoji 🙂👍🏽 🦙",
    "def f(x):\n\treturn x ** 2  # code",
    "<b>html</b> &amp; entities",
)


@dataclass
class Rendering:
    text: str
    ids: list[int]


class _Rendered(Exception):
    """Raised from inside llama-cpp-python's chat path once the prompt is tokenized."""

    def __init__(self, text: str, ids: list[int]) -> None:
        super().__init__(text)
        self.rendering = Rendering(text, ids)


def gguf_rendering(llm: Any, messages: list[dict[str, str]]) -> Rendering:
    """The prompt ids `create_chat_completion` would evaluate for these messages."""
    tokenize = llm.tokenize

    def observe(text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        raise _Rendered(text.decode("utf-8", "replace"), tokenize(text, add_bos, special))

    llm.tokenize = observe  # this instance only; restored below
    try:
        llm.create_chat_completion(messages, max_tokens=1, temperature=0.0)
    except _Rendered as done:
        return done.rendering
    finally:
        del llm.tokenize
    raise ExportError("llama-cpp-python's chat completion never tokenized a prompt")


def hf_rendering(tokenizer: Any, record: dict[str, Any], template: str) -> Rendering:
    ids = prompt_ids(tokenizer, record, template)
    text = prompt_text(tokenizer, record, template)
    bos = tokenizer.bos_token
    if ids[:1] == [tokenizer.bos_token_id] and bos and not text.startswith(bos):
        text = bos + text  # alpaca: prompt_ids puts BOS in front of the rendered text
    return Rendering(text, ids)


def _leading(ids: list[int], token: int) -> int:
    """How many times `token` opens the ids (a model without BOS has token -1: never)."""
    n = 0
    while n < len(ids) and ids[n] == token:
        n += 1
    return n


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _window(ids: list[int], start: int, piece: Any) -> str:
    shown = ids[start : start + 6]
    more = " …" if len(ids) > start + 6 else ""
    return " ".join(f"{i}:{piece(i)!r}" for i in shown) + more if shown else "(end)"


def describe(label: str, hf: Rendering, gguf: Rendering, tokenizer: Any, llm: Any) -> str:
    """First differing token position, a window of both sides, both full renderings."""
    pos = first_difference(hf.ids, gguf.ids)
    start = max(0, (pos or 0) - 2)

    def gguf_piece(i: int) -> str:
        return llm.detokenize([i], special=True).decode("utf-8", "replace")

    def hf_piece(i: int) -> str:
        return tokenizer.decode([i])

    if hf.text == gguf.text:
        cause = (
            "same text, different tokens: llama.cpp's tokenizer splits it differently "
            "(the pre-tokenizer or special tokens the converter wrote; see logs/convert-*.log)"
        )
    else:
        cause = (
            "the GGUF's chat template renders another text than training's template "
            "(tokenizer.chat_template in the GGUF, chat_template in the model folder)"
        )
    return (
        f"{label}: token {pos} differs (HF {len(hf.ids)} tokens, GGUF {len(gguf.ids)}); "
        f"{cause}\n"
        f"    HF   [{start}:] {_window(hf.ids, start, hf_piece)}\n"
        f"    GGUF [{start}:] {_window(gguf.ids, start, gguf_piece)}\n"
        f"    HF rendering:   {hf.text!r}\n"
        f"    GGUF rendering: {gguf.text!r}"
    )


def check_gguf(
    path: Path, tokenizer: Any, template: str, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every fidelity check on one GGUF; raises ExportError naming the first mismatch."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = dict(CONVERSATIONS) | {f"dev record {i}": r for i, r in enumerate(records)}
    problems: list[str] = []
    bos = llm.token_bos()
    leading_bos = set()
    for label, record in cases.items():
        hf = hf_rendering(tokenizer, record, template)
        gguf = gguf_rendering(llm, to_messages(record))
        if hf.ids != gguf.ids:
            problems.append(describe(f"chat '{label}'", hf, gguf, tokenizer, llm))
        leading = _leading(gguf.ids, bos)
        leading_bos.add(leading)
        if leading > 1:  # what llama-cpp-python warns about: the template's and an added one
            problems.append(f"chat '{label}': the prompt starts with BOS ({bos}) {leading}×")
    # the records' own texts must tokenize alike; the probes are reported (a user's data
    # may never hold them, and the tokenizer is the base model's, not the fine-tune's)
    record_texts = dict.fromkeys(m["content"] for r in cases.values() for m in to_messages(r))
    probe_differences = []
    texts = [*record_texts, *(t for t in TEXTS if t not in record_texts)]
    for text in texts:
        hf = Rendering(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        gguf = Rendering(text, llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        if hf.ids != gguf.ids:
            found = describe(f"text {text!r}", hf, gguf, tokenizer, llm)
            (problems if text in record_texts else probe_differences).append(found)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = stop_token_ids(tokenizer, template)
    for i in stops:
        if not llama_cpp.llama_vocab_is_eog(vocab, i):
            problems.append(
                f"stop token {tokenizer.decode([i])!r} ({i}) ends every trained answer but is "
                "not an end-of-generation token in the GGUF: llama.cpp would generate past it "
                "(fix: make it eos_token in the model's tokenizer_config.json, which the "
                "converter writes as the GGUF's EOS)"
            )
    if problems:
        shown = "\n  ".join(problems[:3])
        more = f"\n  … and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ExportError(
            f"{path.name} would not serve prompts as the model was trained "
            f"({len(problems)} mismatch(es)):\n  {shown}{more}"
        )
    return {
        "chat_format": llm.chat_format,
        "conversations": len(cases),
        "texts": len(texts),
        "probe_differences": probe_differences,
        "bos_in_prompt": max(leading_bos, default=0),
        # llama.cpp front ends that tokenize a rendered prompt with add_special (Ollama)
        # add BOS themselves when this is true
        "adds_bos": llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
        "stop_tokens": [tokenizer.decode([i]) for i in stops],
    }
