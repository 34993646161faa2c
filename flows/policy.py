"""When a stage task of the pipeline retries, and when Prefect may skip it.

Retries: crashes, kills and deadlines are retried with backoff (10 s, 20 s); a user error,
a fault injected on purpose or an out-of-memory at unchanged settings would fail the same
way again and is not (tasks/runner.py `worth_retrying`). A retried training resumes from
its last checkpoint.

Caching: a stage task's Prefect cache key is its stage's store key, once the store holds
that artifact, so a finished stage comes back from the store and `llmft gc` cannot leave
Prefect pointing at a removed folder. Prefect's INPUTS policy is never used: it would hash
path strings, not the files behind them, and serve stale results.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from tasks import runner, spec
from tasks.store import Store


def is_transient(task, task_run, state) -> bool:
    """Retry crashes, kills and timeouts; not errors that the same inputs would repeat."""
    try:
        state.result()
    except Exception as exc:
        return runner.worth_retrying(exc)
    return True


def store_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The stage's store key, once the store holds that artifact (so gc cannot go stale)."""
    # a task is named after its stage, or after it and its role: train-preference, merge-sft
    stage, cfg = context.task.name.partition("-")[0], parameters["cfg"]
    refs = {k: v for k, v in parameters.items() if k != "cfg"}
    try:
        key = spec.stage_key(stage, cfg, **refs)
    except Exception:  # a bad input: let the task run and raise the real error
        return None
    store = Store(cfg.pipeline.store)
    if store.lookup(stage, key) is None:
        return None
    # The same stage key in another store is another folder: the store is part of the key.
    return f"llmft-{stage}-{key}-{hashlib.sha256(str(store.root).encode()).hexdigest()[:8]}"


STAGE_OPTIONS = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),  # 10 s, 20 s
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
    cache_key_fn=store_cache_key,
)


def answer_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Greedy decoding: the same GGUF file and prompt give the same answer."""
    gguf = Path(parameters["gguf"])
    mark = f"{gguf}\0{gguf.stat().st_mtime_ns}\0{parameters['cfg'].pipeline.identity_prompt}"
    return "llmft-answer-" + hashlib.sha256(mark.encode()).hexdigest()[:24]
