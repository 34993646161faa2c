"""Run one heavy stage (evaluate, merge, export) in a child process.

Prefect's `timeout_seconds` cannot stop a thread stuck in native code, and an
out-of-memory kill takes the whole process with it: a child process can be killed at the
deadline and dies alone. Both halves of the protocol live here:

    run_in_subprocess("evaluate", cfg, data=..., base=..., train=...)   # the parent
    python -m flows.stage --spec spec.json --out ref.json                # the child

The child's exit status says what kind of failure it was, so the parent raises an error
the retry policy can judge: 0 done (the Ref, or null, in --out), 2 a `UserError` (its
message on stderr), 3 a fault injected on purpose, 4 out of memory, 1 anything else.
A finished artifact is looked up before any child starts: a cached stage costs no process.

Fault switch for tests of retries: `LLMFT_FAIL_STAGE=export` makes that stage fail (for
export through its own `export.fail_stage` switch) while the variable is set.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

# EXIT_OOM and OutOfMemory are the tasks layer's: the training stage raises them too
from tasks.config import EXIT_OOM, REPO_ROOT, Config, OutOfMemory, UserError
from tasks.store import Ref, Store

FAULT_ENV = "LLMFT_FAIL_STAGE"
EXIT_USER, EXIT_FAULT = 2, 3


class StageFailed(RuntimeError):
    """A stage's child process failed in a way a retry may fix (crash, kill, timeout)."""


class FaultInjected(RuntimeError):
    """The stage failed because a fault switch asked it to (not worth retrying in-run)."""


def stage_key(stage: str, cfg: Config, **inputs: Ref | None) -> str:
    return importlib.import_module(f"tasks.{stage}").key(cfg, **inputs)


def run_in_subprocess(
    stage: str,
    cfg: Config,
    log: Callable[[str], None] = print,
    **inputs: Ref | None,
) -> Ref | None:
    """`tasks.<stage>.run(cfg, store, **inputs)` in a child process, killed at the deadline."""
    store = Store(cfg.pipeline.store)
    if hit := store.lookup(stage, stage_key(stage, cfg, **inputs)):
        return hit
    timeout = cfg.pipeline.stage_timeout_minutes * 60
    with tempfile.TemporaryDirectory(prefix=f"llmft-{stage}-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "ref.json"
        config = cfg.model_dump(mode="json")
        config["pipeline"]["store"] = str(store.root)  # the child may start elsewhere
        refs = {k: v.to_dict() if v else None for k, v in inputs.items()}
        spec.write_text(json.dumps({"stage": stage, "config": config, "inputs": refs}))
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        cmd = [sys.executable, "-m", "flows.stage", "--spec", str(spec), "--out", str(out)]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: the kill takes its children too
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        tail: collections.deque[str] = collections.deque(maxlen=30)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                log(f"[{stage}] {line.rstrip()}")
            status = proc.wait()
        finally:
            timer.cancel()
        output = "\n".join(tail)
        if status == 0:
            data = json.loads(out.read_text())
            return Ref(**data) if data else None
        if status == EXIT_USER:
            message = output.splitlines()[-1] if output else f"{stage} failed"
            raise UserError(message.removeprefix("error: "))
        if status == EXIT_FAULT:
            raise FaultInjected(f"{stage}: failed on purpose ({FAULT_ENV} or fail_stage)")
        if status == EXIT_OOM:
            raise OutOfMemory(f"{stage}: out of memory at unchanged settings\n{output}")
        if killed.is_set():
            raise StageFailed(f"{stage}: killed after {timeout:.0f} s (stage_timeout_minutes)")
        raise StageFailed(f"{stage}: child process exited with status {status}\n{output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON: stage, config, inputs")
    parser.add_argument("--out", required=True, help="where to write the resulting Ref")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the parent logs each line
    spec = json.loads(Path(args.spec).read_text())
    stage = spec["stage"]
    cfg = Config.model_validate(spec["config"])
    inputs = {k: Ref(**v) if v else None for k, v in spec["inputs"].items()}
    fault = os.environ.get(FAULT_ENV) == stage
    if fault and stage == "export":
        cfg.export.fail_stage = True
    elif fault:
        print(f"{FAULT_ENV}={stage}: failing on purpose", file=sys.stderr)
        return EXIT_FAULT
    try:
        ref = importlib.import_module(f"tasks.{stage}").run(
            cfg, Store(cfg.pipeline.store), **inputs
        )
    except Exception as exc:
        if stage == "export" and cfg.export.fail_stage:
            print(str(exc), file=sys.stderr)
            return EXIT_FAULT
        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER
        if "out of memory" in str(exc).lower():
            print(f"out of memory: {exc}", file=sys.stderr)
            return EXIT_OOM
        raise
    Path(args.out).write_text(json.dumps(ref.to_dict() if ref else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
