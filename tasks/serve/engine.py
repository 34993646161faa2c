"""Continuous batching: one llama.cpp context, `serve.max_concurrent` sequence slots.

On a CPU, decoding one token for one request is bound by reading every weight once;
decoding one token for each of 16 requests in the same `llama_decode` call reads them once
too, so 16 users cost far less than 16 times one. One thread owns the context and loops:

1. admit waiting jobs into free sequence slots: the slot whose kept KV cells share the
   longest start with the job's prompt (`serve.cache_prompt`: the previous turn of the
   same chat, or a system prompt others sent), else the lowest free slot; only the rest
   of the prompt is decoded;
2. drop jobs whose client went away, freeing their slots at once;
3. build one batch: the last sampled token of every generating job, then up to
   `serve.prefill_chunk` prompt tokens of jobs still reading their prompt, oldest first, so
   a long prompt is spread over several steps instead of stalling everyone's next token;
4. decode it, sample each job's next token from its own logits row with its own sampler
   chain, hand the text on, and free the slot of every job that ended.

The KV cache is not unified: each slot has its own `serve.n_ctx` cells, so a request's
attention reads only its own tokens, in position order, and its greedy output does not
depend on who else is being served. llama.cpp decodes such a batch in groups of
consecutive sequence ids, hence tokens in slot order and busy slots kept together.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from tasks.config import ServeConfig
from tasks.serve.job import Job, Logprob, make_sampler, piece_of

log = logging.getLogger("llmft.serve")


class EngineClosed(RuntimeError):
    """The engine was replaced (a promotion) and takes no new work."""


class Engine:
    """A GGUF loaded once, its tokenizer and chat template, and the decode thread."""

    def __init__(self, path: Path, cfg: ServeConfig, metrics: Any = None) -> None:
        from tasks.serve import ServeError, chat_formatter, load_vocab

        self.path, self.metrics = path, metrics
        self.slots, self.chunk = cfg.max_concurrent, cfg.prefill_chunk
        self.cache_prompt = cfg.cache_prompt
        self.tokenizer = load_vocab(path)  # tokenize + chat template; a few MiB
        self.formatter = chat_formatter(self.tokenizer)
        self.model = lc.llama_model_load_from_file(
            str(path).encode(), lc.llama_model_default_params()
        )
        if not self.model:
            raise ServeError(f"{path}: llama.cpp cannot load it")
        params = lc.llama_context_default_params()
        params.n_seq_max = self.slots
        params.n_ctx = cfg.n_ctx * self.slots
        params.kv_unified = False
        # Flash attention where the model allows it: attention over each slot's own cells
        # in one fused pass. On 2 cores with q8_0 SmolLM2, a step of 16 tokens (one per
        # slot) took 50 ms with it and 67 ms without; one token alone 12 ms and 14 ms.
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.n_batch = params.n_ubatch = self.chunk + self.slots
        params.n_threads = params.n_threads_batch = cfg.n_threads or os.cpu_count() or 1
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ServeError(f"{path}: llama.cpp cannot make a context of {params.n_ctx} tokens")
        self.n_ctx = lc.llama_n_ctx_seq(self.ctx)  # per slot
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(self.chunk + self.slots, 0, 1)
        self.pieces: dict[int, bytes] = {}
        self.waiting: deque[Job] = deque()  # guarded by `cond`
        self.active: dict[int, Job] = {}  # slot → job; the decode thread's alone
        self.free = list(range(self.slots))  # a heap: the lowest free slot first
        self.kept: dict[int, list[int]] = {}  # free slot → the tokens its KV cells hold
        self.cond = threading.Condition()
        self.closing = self.stopped = False
        self.thread = threading.Thread(target=self._run, name="llmft-decode", daemon=True)
        self.thread.start()

    # --- called from request handlers ---------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`; its sampler is made here, so a bad grammar fails in the caller."""
        job.sampler = make_sampler(self.vocab, self.n_vocab, job.sampling)
        with self.cond:
            if self.stopped:
                lc.llama_sampler_free(job.sampler)
                raise EngineClosed("the model was replaced; retry")
            self.waiting.append(job)
            self.cond.notify()

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None
    ) -> tuple[list[int], list[str]]:
        """Token ids of `messages` (and `tools`) as the GGUF's chat template renders them,
        and its stops."""
        rendered = self.formatter(messages=messages, tools=tools)
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop or ""]
        text = rendered.prompt.encode("utf-8")
        return self.tokenizer.tokenize(
            text, add_bos=not rendered.added_special, special=True
        ), stops

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cond:
            self.cond.notify()

    def close(self) -> None:
        """Finish the jobs inside, then free the context and the model."""
        with self.cond:
            self.closing = True
            self.cond.notify()

    @property
    def busy(self) -> int:
        return len(self.active)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # --- the decode thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.active or self.waiting or self.closing):
                    self.cond.wait()
                if self.closing and not (self.active or self.waiting):
                    self.stopped = True
                    break
                self._admit()
            try:
                self._step()
            except Exception as exc:  # every job inside learns of it; the loop goes on
                log.exception("decode step failed")
                for job in list(self.active.values()):
                    self._release(job, keep=False)  # what its cells hold is not known
                    job.fail(f"generation failed: {exc}")
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def _admit(self) -> None:
        if any(job.cancelled for job in self.waiting):
            for job in [j for j in self.waiting if j.cancelled]:
                lc.llama_sampler_free(job.sampler)
            self.waiting = deque(j for j in self.waiting if not j.cancelled)
        while self.waiting and self.free:
            job = self.waiting.popleft()
            job.seq, job.pos = self._slot_for(job.prompt)
            job.cached = job.pos
            if job.cached and self.metrics is not None:
                self.metrics.cached_tokens.inc(job.cached)
            self.active[job.seq] = job

    def _slot_for(self, prompt: list[int]) -> tuple[int, int]:
        """A free slot for `prompt` and how many of its KV cells the job keeps: the slot
        whose kept tokens share the longest start with the prompt (the lowest on a tie, so
        busy slots stay together), all but the prompt's last token at most (its logits
        give the first answer token)."""
        slot, common = self.free[0], 0  # the heap's head: the lowest free slot
        if self.cache_prompt:
            for free in self.free:
                n = _common_start(self.kept.get(free, ()), prompt)
                if n > common or (n == common and n and free < slot):
                    slot, common = free, n
        self.free.remove(slot)
        heapq.heapify(self.free)
        keep = min(common, len(prompt) - 1)
        if self.kept.pop(slot, None) is not None and not lc.llama_memory_seq_rm(
            self.memory, slot, keep, -1
        ):  # a memory that cannot drop a tail (recurrent models): start over
            lc.llama_memory_seq_rm(self.memory, slot, -1, -1)
            keep = 0
        return slot, keep

    def _step(self) -> None:
        for job in [j for j in self.active.values() if j.cancelled]:
            self._release(job)
        if not self.active:
            return
        # Prompt tokens go to the oldest jobs first; every generating job gets its one token.
        budget, take = self.chunk, {}
        for job in sorted(self.active.values(), key=lambda j: j.arrived):
            if job.prefilling and budget:
                take[job.seq] = min(budget, len(job.prompt) - job.pos)
                budget -= take[job.seq]
        batch, n, outputs = self.batch, 0, []
        for seq in sorted(self.active):
            job = self.active[seq]
            if not job.prefilling:
                tokens = [job.next_token]
                job.decoded.append(job.next_token)
            elif seq in take:
                tokens = job.prompt[job.pos : job.pos + take[seq]]
            else:
                continue
            for token in tokens:
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, job.pos, 1
                batch.seq_id[n][0], batch.logits[n] = seq, False
                job.pos, n = job.pos + 1, n + 1
            if not job.prefilling:  # its prompt is all in: the last row predicts a token
                batch.logits[n - 1] = True
                outputs.append((job, n - 1))
        batch.n_tokens = n
        if rc := lc.llama_decode(self.ctx, batch):
            raise RuntimeError(f"llama_decode returned {rc}")
        for job, row in outputs:
            self._sample(job, row)

    def _sample(self, job: Job, row: int) -> None:
        if job.sampling.plain_greedy:  # an argmax in numpy, not a pass over a candidate array
            token = int(self._logits(row).argmax())
        else:
            token = lc.llama_sampler_sample(job.sampler, self.ctx, row)
        if lc.llama_vocab_is_eog(self.vocab, token):
            job.finish("stop")
            self._release(job)
            return
        logprob = None if job.top_logprobs is None else self._logprob(row, token, job)
        if self.metrics is not None:
            self.metrics.token(job)
        job.next_token = token
        if token not in self.pieces:
            self.pieces[token] = piece_of(self.vocab, token)
        if job.push(self.pieces[token], logprob):
            self._release(job)

    def _logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, row), (self.n_vocab,))

    def _logprob(self, row: int, token: int, job: Job) -> Logprob:
        logits = self._logits(row)
        top = logits.max()
        norm = float(top) + math.log(np.exp(logits - top, dtype=np.float64).sum())
        best = (
            np.argpartition(-logits, job.top_logprobs)[: job.top_logprobs]
            if job.top_logprobs
            else []
        )
        best = sorted(best, key=lambda t: -logits[t])
        alternatives = [(int(t), float(logits[t]) - norm) for t in best]
        return token, float(logits[token]) - norm, alternatives

    def _release(self, job: Job, keep: bool = True) -> None:
        """Free the job's slot; its KV cells stay for a later prompt that starts the same
        (a finished answer, or a client that went away: the cells are valid either way)."""
        self.active.pop(job.seq, None)
        if keep and self.cache_prompt and job.pos:
            self.kept[job.seq] = (job.prompt + job.decoded)[: job.pos]
        else:
            lc.llama_memory_seq_rm(self.memory, job.seq, -1, -1)
            self.kept.pop(job.seq, None)
        heapq.heappush(self.free, job.seq)
        lc.llama_sampler_free(job.sampler)
        job.sampler = None

    def piece(self, token: int) -> bytes:
        return self.pieces.get(token) or piece_of(self.vocab, token)


def _common_start(a: Any, b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
