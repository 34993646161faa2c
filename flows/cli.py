"""`llmft` command line: one plain function per verb; the contract in DESIGN.md.

Stage code is imported inside each verb so `llmft data` does not pay for torch or Prefect.
Every user error (bad config, bad input file) is a `UserError`; it is printed without a
traceback and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tasks.config import ConfigError, UserError, describe, load_config

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import run_pipeline

    overrides = list(args.set or [])
    if args.dataset:
        overrides.append(f"data.input={args.dataset}")
    cfg = load_config(args.config, overrides, for_training=True)
    summary = run_pipeline(cfg, summary_path=args.summary)
    width = max(map(len, summary["stages"]), default=0)  # train-preference in a chain
    for name, stage in summary["stages"].items():
        how = "from the store" if stage["cached"] else "computed"
        print(f"{name:{width}} {how:14} {stage['seconds']:8.1f} s  {stage['path']}")
    default_file = Path(cfg.pipeline.store) / "runs" / summary["run_id"] / "summary.json"
    shown = {k: summary.get(k) for k in ("run_id", "served_gguf", "answer")}
    if summary.get("export_skipped"):
        shown["export_skipped"] = summary["export_skipped"]
    promotion = summary.get("promotion") or {}
    if promotion:  # "promoted: nothing was deployed as 'default'" reads as what happened
        shown["promotion"] = f"{promotion.get('decision')}: {promotion.get('reason')}"
    shown["summary"] = str(args.summary or default_file)
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tasks.data import clean_dataset

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"data.seed={args.seed}")
    if args.split:
        overrides.append(f"data.split=[{args.split}]")
    cfg = load_config(args.config, overrides)
    report = clean_dataset(Path(args.input), Path(args.output_dir), cfg.data)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tasks.train.plan import print_plan

    cfg = load_config(args.config, args.set)
    print_plan(cfg, gpu_gib=args.gpu_gib, num_gpus=args.num_gpus)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tasks.serve import chat

    cfg = load_config(args.config, args.set)
    return chat(args.model, prompt=args.prompt, cfg=cfg.serve, max_tokens=args.max_tokens)


def cmd_serve(args: argparse.Namespace) -> int:
    from tasks.serve import serve

    overrides = list(args.set or [])
    for key in ("host", "port", "api_key"):
        if getattr(args, key) is not None:
            overrides.append(f"serve.{key}={getattr(args, key)}")
    cfg = load_config(args.config, overrides)
    if not args.model and not args.deployed:
        raise ConfigError("llmft serve: give --model FILE.gguf or --deployed NAME")
    serve(model=args.model, deployed=args.deployed, cfg=cfg.serve, store_root=cfg.pipeline.store)
    return 0


def require_server_answering() -> str:
    """PREFECT_API_URL, once a server answers there: a wrong port fails now, in one line."""
    import httpx

    from flows.deploy import require_server

    url = require_server()
    try:  # any HTTP answer will do (a server behind authentication says 401)
        httpx.get(f"{url.rstrip('/')}/health", timeout=10)
    except httpx.TransportError as exc:
        raise UserError(
            f"PREFECT_API_URL={url}: no Prefect server answers there ({exc}) (fix: start one "
            "with `llmft server [--port P]` and export the PREFECT_API_URL it prints)"
        ) from None
    return url


def cmd_watch(args: argparse.Namespace) -> int:
    from flows.watch import watch

    cfg = load_config(args.config, args.set)
    require_server_answering()  # events need a server to go to
    watch(
        Path(args.dir),
        interval=args.interval,
        once=args.once,
        stable_seconds=args.stable,
        state_file=Path(cfg.pipeline.store) / "watch" / "state.json",
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows import deploy

    require_server_answering()
    if args.serve:
        deploy.serve(args.config, args.set, watch_dir=Path(args.watch) if args.watch else None)
    else:
        deploy.deploy(prefect_yaml=Path(args.file))
    return 0


def server_env(host: str, port: int) -> tuple[dict[str, str], str, str]:
    """(environment for `prefect server start`, dashboard address, the UI's API address).

    The UI asks GET /ui-settings where its API is; left alone, Prefect answers with
    PREFECT_API_URL (perhaps another server) or port 4200, and on any other port every
    page says "Can't connect to Server API". So the UI's API follows --host/--port, unless
    PREFECT_UI_API_URL is set (environment or profile), e.g. for a proxy in front.
    """
    import socket

    from prefect.settings import Settings

    # A wildcard bind is reached by the machine's name; an IPv6 address needs brackets.
    name = socket.getfqdn() if host in ("0.0.0.0", "::") else host
    name = f"[{name}]" if ":" in name else name
    dashboard = f"http://{name}:{port}"
    env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    ui = Settings().server.ui  # read now: the import-time settings would miss monkeypatched env
    if "api_url" in ui.model_fields_set:
        return env, dashboard, str(ui.api_url)
    env["PREFECT_UI_API_URL"] = f"{dashboard}/api"
    return env, dashboard, env["PREFECT_UI_API_URL"]


def cmd_server(args: argparse.Namespace) -> int:
    env, dashboard, ui_api = server_env(args.host, args.port)
    print(f"llmft server: dashboard at {dashboard} (the UI reads its API at {ui_api})")
    print(f"in other shells: export PREFECT_API_URL={dashboard}/api", flush=True)  # before exec
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", args.host]
    os.execve(sys.executable, [*cmd, "--port", str(args.port)], env)


def cmd_gc(args: argparse.Namespace) -> int:
    from tasks.gc import collect_garbage

    cfg = load_config(args.config, args.set)
    removed = collect_garbage(cfg.pipeline.store, keep_runs=args.keep_runs, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} artifact folder(s)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    # what `llmft run` would check up front, this machine included
    cfg = load_config(args.config, args.set, for_training=not args.keys)
    if args.keys:
        print("\n".join(describe()))
    else:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmft", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", help="YAML recipe (default: configs/default.yaml)")
        sp.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lora.r=16"
        )
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("run", cmd_run, "run the whole pipeline (data → … → export → promote)")
    sp.add_argument("--dataset", help="dataset file or folder (sets data.input)")
    sp.add_argument("--summary", help="write the run summary JSON here")

    sp = verb("data", cmd_data, "clean and split a dataset")
    sp.add_argument("--input", required=True, help="file or folder of JSON/JSONL/CSV/Parquet")
    sp.add_argument("--output-dir", required=True)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--split", help="train,dev,test ratios, e.g. 0.8,0.1,0.1")

    sp = verb("plan", cmd_plan, "estimate GPU memory per method and ZeRO stage")
    sp.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    sp.add_argument("--num-gpus", type=int, default=1)

    sp = verb("chat", cmd_chat, "chat with a GGUF model on CPU")
    sp.add_argument("--model", required=True, help="FILE.gguf")
    sp.add_argument("--prompt", help="answer once and exit; interactive without it")
    sp.add_argument("--max-tokens", type=int, default=256)

    sp = verb("serve", cmd_serve, "OpenAI-compatible API and chat page for a GGUF model")
    sp.add_argument("--model", help="FILE.gguf")
    sp.add_argument("--deployed", help="serve the promoted model NAME (follows promotions)")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--api-key")

    sp = verb("watch", cmd_watch, "the dataset sensor: emit llmft.dataset.arrived events")
    sp.add_argument("--dir", default="datasets_raw")
    sp.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    sp.add_argument("--stable", type=float, default=5.0, help="seconds a file must stay unchanged")
    sp.add_argument("--once", action="store_true", help="poll once and exit")

    sp = verb("deploy", cmd_deploy, "register deployments with a Prefect server")
    sp.add_argument("--file", default="deploy/prefect.yaml")
    sp.add_argument(
        "--serve", action="store_true", help="serve the pipeline deployments from this process"
    )
    sp.add_argument("--watch", metavar="DIR", help="with --serve: also serve the sensor on DIR")

    sp = verb("server", cmd_server, "start a local Prefect server and its UI (http://HOST:PORT)")
    sp.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen beyond this machine")
    sp.add_argument("--port", type=int, default=4200)

    sp = verb("gc", cmd_gc, "remove artifacts no recent run refers to")
    sp.add_argument("--keep-runs", type=int, default=10)
    sp.add_argument("--dry-run", action="store_true")

    sp = verb("config", cmd_config, "print the resolved config (or every key with --keys)")
    sp.add_argument("--keys", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmft … | head` closed the pipe: stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush goes nowhere
        return 141


if __name__ == "__main__":
    sys.exit(main())
