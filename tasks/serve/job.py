"""One request's generation: its sampler chain, the text it has produced, and when it ends.

A `Job` is filled by the decode thread (`tasks/serve/engine.py`) one sampled token at a
time and hands text to the request's handler through `emit`, which must be thread-safe.
Text is cut at stop strings before anyone sees it: the tail that could still grow into a
stop string is held back until the next token decides.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as lc

# A token and its log-probability, with the most likely alternatives at that position:
# (token id, logprob, [(token id, logprob), ...]).
Logprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Sampling:
    """How the next token is chosen; temperature 0 is greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF, root rule `root`

    @property
    def plain_greedy(self) -> bool:
        """The most likely token, nothing else: what the sampler chain would pick."""
        return self.temperature <= 0 and not (
            self.grammar or self.logit_bias or self.presence_penalty or self.frequency_penalty
        )


class GrammarError(ValueError):
    """llama.cpp could not parse a grammar (its own log says where)."""


def make_sampler(vocab: Any, n_vocab: int, s: Sampling) -> Any:
    """A llama.cpp sampler chain for `s`; the caller frees it with `lc.llama_sampler_free`.

    The grammar comes first so every later stage only sees tokens the grammar allows; the
    chain also records each sampled token (penalties and the grammar's state need them).
    """
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if s.grammar is not None:
        grammar = lc.llama_sampler_init_grammar(vocab, s.grammar.encode(), b"root")
        if not grammar:
            lc.llama_sampler_free(chain)
            raise GrammarError("the grammar does not parse (GBNF with a `root` rule expected)")
        lc.llama_sampler_chain_add(chain, grammar)
    if s.logit_bias:
        biases = (lc.llama_logit_bias * len(s.logit_bias))(*s.logit_bias.items())
        lc.llama_sampler_chain_add(
            chain, lc.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), biases)
        )
    if s.presence_penalty or s.frequency_penalty:
        # The last 64 generated tokens, as llama.cpp's own server counts them by default.
        penalties = lc.llama_sampler_init_penalties(
            64, 1.0, s.frequency_penalty, s.presence_penalty
        )
        lc.llama_sampler_chain_add(chain, penalties)
    if s.temperature <= 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(s.top_k))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(s.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(s.temperature))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain


class Job:
    """A request inside the engine: prompt tokens in, text and a finish reason out.

    `emit` receives ("delta", text, logprobs), then exactly one ("done", reason,
    prompt_tokens, completion_tokens, cached_prompt_tokens) or ("error", message).
    """

    def __init__(
        self,
        prompt: list[int],
        max_tokens: int,
        sampling: Sampling,
        emit: Callable[[tuple], None],
        stops: list[str] | None = None,
        top_logprobs: int | None = None,
    ) -> None:
        self.prompt, self.max_tokens, self.sampling = prompt, max_tokens, sampling
        self.emit = emit
        self.stops = [s for s in stops or [] if s]
        self.top_logprobs = top_logprobs  # None: no logprobs; 0: the sampled token's only
        self.arrived = time.perf_counter()
        self.last_token_at: float | None = None
        self.cancelled = False  # set by the request's handler when its client goes away
        self.sampler: Any = None  # made by the engine, which owns the vocabulary
        self.seq = -1  # the engine's sequence slot while admitted
        self.pos = 0  # tokens of this sequence in the KV cache
        self.cached = 0  # prompt tokens found in the slot's KV cache, not decoded again
        self.next_token: int | None = None  # sampled, not yet decoded
        self.decoded: list[int] = []  # generated tokens decoded into the KV cache
        self.generated = 0
        self.finished = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""
        self._held_logprobs: list[Logprob] = []

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)

    def push(self, piece: bytes, logprob: Logprob | None) -> str | None:
        """One generated (not end-of-generation) token; the finish reason when it ends here."""
        self.generated += 1
        text = self._held + self._utf8.decode(piece)
        if logprob is not None:
            self._held_logprobs.append(logprob)
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._send(text[:cut])
            self._held, self._held_logprobs = "", []  # the stop string itself is not text
            return self.finish("stop")
        keep = _stop_prefix(text, self.stops)
        self._send(text[: len(text) - keep])
        self._held = text[len(text) - keep :]
        if self.generated >= self.max_tokens:
            return self.finish("length")
        return None

    def finish(self, reason: str) -> str:
        """End with `reason` ('stop', 'length'), first handing over what was held back."""
        tail, self._held = self._held + self._utf8.decode(b"", final=True), ""
        if tail or self._held_logprobs:
            self.emit(("delta", tail, self._held_logprobs))
            self._held_logprobs = []
        self.finished = True
        self.emit(("done", reason, len(self.prompt), self.generated, self.cached))
        return reason

    def fail(self, message: str) -> None:
        self.finished = True
        self.emit(("error", message))

    def _send(self, text: str) -> None:
        if text:
            self.emit(("delta", text, self._held_logprobs))
            self._held_logprobs = []


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def piece_of(vocab: Any, token: int) -> bytes:
    """The bytes llama.cpp renders for `token` (special tokens as nothing)."""
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:  # a longer piece: -n bytes are needed
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]
