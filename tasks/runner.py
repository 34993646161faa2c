"""How a heavy stage runs: one contract for train, evaluate, merge and export.

    python -m tasks.<stage> --spec spec.json [--out result.json]

The spec names the stage, the config sections it reads (its package's SECTIONS, and only
those), its inputs as store references (made by earlier stages, never recomputed here),
the store, and the deadline (`pipeline.stage_timeout_minutes`). Every stage ends with
one of the same exit statuses:

    0  done: {"ref": {stage, key, path, cached}} in --out (null: nothing to make)
    2  user error: a bad config or input, the message names the fix ({"error": …} in --out)
    3  fault injected on purpose (LLMFT_FAIL_STAGE=<stage>, or the section's fail_stage)
    4  out of memory: the same settings run out again, so it is not retried
    1  anything else: a crash, its traceback in the output; the only kind a retry may fix

`run_stage` is the parent side, used by the pipeline flow and by the gpu pool's flow: it
looks the artifact up first (a finished stage starts no process), starts the child, and
turns its exit status into the exception the retry policy judges. `launch` is the
protocol under it, for any command: the child is tied to this process (it is killed when
this process dies, even by SIGKILL), has a process group of its own that is killed at
the deadline (Prefect's timeouts cannot stop a thread stuck in CUDA or NCCL; a process
group can be killed), and its output is streamed line by line. The training stage starts
its job with the same `launch`, plainly or under torchrun / accelerate launch; those
launchers exit 1 whatever their processes did, so a job out of memory also leaves a
marker file (`oom_marker`) that `launch` looks for.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.config import REPO_ROOT, Config, UserError
from tasks.spec import make_spec, read_spec, stage_key, stage_module
from tasks.store import Ref, Store, write_json_atomic

EXIT_OTHER, EXIT_USER, EXIT_FAULT, EXIT_OOM = 1, 2, 3, 4
FAULT_ENV = "LLMFT_FAIL_STAGE"  # LLMFT_FAIL_STAGE=export: that stage fails (tests of retries)
DEADLINE_ENV = "LLMFT_DEADLINE"  # epoch seconds by which this process's stage must end
TIED = "LLMFT_DIE_WITH_PARENT"
TAIL_LINES = 30  # of a failed child's output, kept in its exception


class StageFailed(RuntimeError):
    """A child process crashed, was killed or ran past its deadline: a retry may fix it."""


class FaultInjected(RuntimeError):
    """The stage failed because a fault switch asked it to (not retried within a run)."""


class OutOfMemory(RuntimeError):
    """A stage ran out of (GPU or CPU) memory; the same settings run out again."""


def worth_retrying(exc: BaseException) -> bool:
    """Crashes, kills and timeouts; not what the same inputs would do again."""
    if isinstance(exc, (UserError, FaultInjected, OutOfMemory)):
        return False
    text = str(exc)
    return "CUDA out of memory" not in text and "OutOfMemoryError" not in text


# --- the parent side -------------------------------------------------------------------------


def run_stage(
    stage: str,
    cfg: Config,
    log: Callable[[str], None] = print,
    spec_dir: Path | None = None,
    **inputs: Ref | None,
) -> Ref | None:
    """`tasks.<stage>.run` on `inputs` in a child process, or the finished artifact.

    With `spec_dir`, the spec stays there as `<stage>.json` (the pipeline keeps one per
    run beside its summary), so the stage can be run again by hand.
    """
    spec = make_spec(stage, cfg, **inputs)
    if spec_dir is not None:
        write_json_atomic(spec_dir / f"{stage}.json", spec)
    if hit := Store(cfg.pipeline.store).lookup(stage, stage_key(stage, cfg, **inputs)):
        return hit
    with tempfile.TemporaryDirectory(prefix=f"llmft-{stage}-") as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", f"tasks.{stage}", "--spec", str(spec_path), "--out", str(out)]
        exited = launch(
            cmd,
            name=stage,
            log=lambda line: log(f"[{stage}] {line}"),
            deadline_seconds=spec["deadline_seconds"],
        )
        result = json.loads(out.read_text()) if out.is_file() else {}
    if exited.status == 0 and not exited.out_of_memory:
        if "ref" not in result:
            raise StageFailed(f"{stage}: exited 0 without writing its result")
        return Ref(**result["ref"]) if result["ref"] else None
    raise failure(stage, exited, result.get("error"))


def failure(name: str, exited: Exited, message: str | None = None) -> Exception:
    """The exception for how a child ended, one the retry policy can judge."""
    message = message or (exited.tail[-1] if exited.tail else f"{name} failed")
    if exited.out_of_memory:
        return OutOfMemory(message.removeprefix("out of memory: "))
    if exited.status == EXIT_USER:
        return UserError(message.removeprefix("error: "))
    if exited.status == EXIT_FAULT:
        return FaultInjected(f"{name}: failed on purpose ({message})")
    output = "\n".join(exited.tail)
    return StageFailed(f"{name}: exited with status {exited.status}\n{output}")


@dataclass
class Exited:
    status: int
    tail: list[str]  # the last lines of its output
    out_of_memory: bool


def launch(
    cmd: list[str],
    *,
    name: str,
    log: Callable[[str], None] = print,
    deadline_seconds: float | None = None,
    cwd: Path | None = None,
    oom_marker: Path | None = None,
) -> Exited:
    """Run `cmd` tied to this process, its output streamed to `log`; killed at the deadline.

    The deadline is the nearer of `deadline_seconds` from now and the one this process was
    given (DEADLINE_ENV), which the child inherits. Killed: StageFailed. Otherwise the
    exit status, and whether it ran out of memory (status 4, or `oom_marker` written).
    """
    deadline = _deadline(deadline_seconds)
    if oom_marker is not None:
        oom_marker.unlink(missing_ok=True)  # left by an earlier attempt in the same folder
    started = time.time()
    proc = subprocess.Popen(
        _tied(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        cwd=cwd,
        env=_child_env(deadline),
        start_new_session=True,  # its own process group: the kill takes its children too
    )
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(max(0.0, deadline - time.time()), kill) if deadline else None
    if timer:
        timer.daemon = True
        timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(line.rstrip())
        status = proc.wait()
    except BaseException:  # interrupted or cancelled here: the child must not outlive it
        kill()
        raise
    finally:
        if timer:
            timer.cancel()
    if killed.is_set():
        raise StageFailed(
            f"{name}: killed at its deadline, {time.time() - started:.0f} s after it started "
            "(pipeline.stage_timeout_minutes)\n" + "\n".join(tail)
        )
    oom = status == EXIT_OOM or (oom_marker is not None and oom_marker.is_file())
    return Exited(status, list(tail), oom)


def oom_marker(job_spec: Path) -> Path:
    """Where a job out of memory leaves its error: beside its spec."""
    return job_spec.with_name("out_of_memory.txt")


def _deadline(seconds: float | None) -> float | None:
    given = [float(v) for v in (os.environ.get(DEADLINE_ENV),) if v]
    if seconds is not None:
        given.append(time.time() + seconds)
    return min(given) if given else None


def _child_env(deadline: float | None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, TIED: "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if deadline:
        env[DEADLINE_ENV] = f"{deadline:.3f}"
    return env


# Linux: a child dies with whoever started it (no orphaned GPU job after a SIGKILLed worker).
# It is started through this trampoline, which asks the kernel for SIGKILL when its parent
# dies (PR_SET_PDEATHSIG = 1; it survives exec), then becomes the command; the processes a
# launcher (torchrun, accelerate) starts do the same towards it (env TIED, die_with_parent).
_TRAMPOLINE = (
    "import ctypes, os, signal, sys;"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL);"
    "os.getppid() == int(sys.argv[1]) or sys.exit('parent already gone');"
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _tied(cmd: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *cmd]


def die_with_parent() -> None:
    """In a process a launcher started for `launch`: die when that launcher dies."""
    if sys.platform.startswith("linux") and os.environ.get(TIED) == "1":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def run_on_deployment(deployment: str, stage: str, cfg: Config, **inputs: Ref) -> Ref:
    """The stage as a run of a Prefect deployment (the gpu pool's), waited for; the artifact
    comes back through the store, which the worker's host must share."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    store, key = Store(cfg.pipeline.store), stage_key(stage, cfg, **inputs)
    if hit := store.lookup(stage, key):  # nothing to send
        return hit
    parameters = {"config": cfg.model_dump(mode="json")}
    parameters |= {name: ref.to_dict() for name, ref in inputs.items()}
    try:
        run = run_deployment(deployment, parameters=parameters)
    except ObjectNotFound as exc:
        raise UserError(
            f"the gpu pool has a worker but {deployment} is not deployed "
            "(fix: llmft deploy, or --set pipeline.train_on=local)"
        ) from exc
    ref = store.lookup(stage, key)
    if ref is None:
        raise StageFailed(
            f"{deployment} run {run.id} ended {run.state_name} without a {stage} artifact "
            f"in {store.root} (is the store shared with the GPU host?)"
        )
    return Ref(ref.stage, ref.key, ref.path, cached=False)  # computed by that run


# --- the child side --------------------------------------------------------------------------


def spec_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m tasks.{stage}", description=(doc or stage).splitlines()[0]
    )
    parser.add_argument(
        "--spec",
        help=f"the stage spec (JSON): the {stage} stage's config sections, its inputs as "
        f"store references, the store, the deadline; `llmft run` keeps one per run in "
        f"<store>/runs/<run id>/specs/{stage}.json",
    )
    parser.add_argument("--out", help='write the result here: {"ref": …} or {"error": …}')
    return parser


def stage_main(
    stage: str,
    spec_path: str | None,
    out: str | None = None,
    show: Callable[[Ref], str] = lambda ref: ref.path,
) -> int:
    """The child side: the stage from its spec; the exit status says how it ended."""
    if spec_path is None:
        print(usage(stage), file=sys.stderr)
        return EXIT_USER
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the parent logs each line
    try:
        cfg, spec = read_spec(spec_path, stage)
    except UserError as exc:
        return _failed(out, EXIT_USER, str(exc))
    if spec.get("deadline_seconds"):  # run by hand: the spec's deadline holds for its jobs
        os.environ.setdefault(DEADLINE_ENV, f"{time.time() + spec['deadline_seconds']:.3f}")
    if os.environ.get(FAULT_ENV) == stage:
        return _failed(out, EXIT_FAULT, f"{FAULT_ENV}={stage}: failing on purpose")
    inputs = {name: Ref(**ref) if ref else None for name, ref in spec["inputs"].items()}
    try:
        ref = stage_module(stage).run(cfg, Store(spec["store"]), **inputs)
    except Exception as exc:
        if getattr(getattr(cfg, stage, None), "fail_stage", False):  # the section's switch
            return _failed(out, EXIT_FAULT, str(exc))
        if isinstance(exc, UserError):
            return _failed(out, EXIT_USER, str(exc))
        if _out_of_memory(exc):
            return _failed(out, EXIT_OOM, str(exc) or type(exc).__name__)
        raise  # status 1, the traceback in the output
    if out:
        write_json_atomic(out, {"ref": ref.to_dict() if ref else None})
    else:
        print(show(ref) if ref else f"{stage}: nothing to make for this config (see above)")
    return 0


def _out_of_memory(exc: Exception) -> bool:
    return (
        isinstance(exc, (MemoryError, OutOfMemory))
        or type(exc).__name__ == "OutOfMemoryError"  # torch.cuda's
        or "out of memory" in str(exc).lower()
    )


def _failed(out: str | None, status: int, message: str) -> int:
    label = {EXIT_USER: "error", EXIT_FAULT: "fault", EXIT_OOM: "out of memory"}[status]
    print(f"{label}: {message}", file=sys.stderr)
    if out:
        write_json_atomic(out, {"error": message})
    return status


def usage(stage: str, store: str = "artifacts") -> str:
    """How to get a spec, for `python -m tasks.<stage>` without one."""
    latest = Path(store) / "runs" / "latest.json"
    newest = ""
    if latest.is_file():
        spec = latest.parent / json.loads(latest.read_text()).get("run_id", "") / "specs"
        if (spec / f"{stage}.json").is_file():
            newest = f"\nThe newest run's: python -m tasks.{stage} --spec {spec / stage}.json"
    return (
        f"error: python -m tasks.{stage} runs the {stage} stage from a spec that names its "
        f"inputs in the artifact store:\n\n    python -m tasks.{stage} --spec FILE\n\n"
        f"`llmft run` keeps one for each heavy stage of a run (edit its config to try other "
        f"settings): {store}/runs/<run id>/specs/{stage}.json{newest}\n"
        "To make the inputs first, run the pipeline: llmft run [--config FILE] [--set KEY=VALUE]"
    )
