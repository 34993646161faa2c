"""Many users at once: streaming clients against CPU servers of the same GGUF.

    .venv/bin/python bench/serve_load.py [--gguf FILE] [--clients 1,4,16,32] [--seconds 30]

Servers, one after the other, each alone on the machine with the same file and threads:

- `llmft before, 1 context` / `4 contexts`: the sequential server of commit BEFORE (one
  llama.cpp context per concurrent request, `serve.max_concurrent` 1 and 4), run from
  `git show BEFORE:tasks/serve/__init__.py`;
- `llmft batched`: this tree's server (`python -m tasks.serve`), continuous batching over
  `serve.max_concurrent` sequence slots;
- `llama-cpp-python server`: `python -m llama_cpp.server`, llama-cpp-python's own.

For each number of clients, every client streams chat completions through the `openai`
package in a loop for `--seconds`: a prompt of `--prompt-tokens` tokens as the chat
template renders it (a different one per client), answers of 1/2 to 3/2 × `--max-tokens`
tokens in a fixed rotation with end-of-turn banned, so every server generates the same
lengths. Requests started
before the deadline run to their end; aggregate tokens/s counts every generated token over
the whole time. TTFT is from sending the request to the first token; inter-token latency
is between consecutive tokens of one answer. The GGUF defaults to the newest export's
served file in artifacts/ (the bundled model's fine-tune), else the bundled Q4_1 GGUF.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The last commit whose server ran one llama.cpp context per concurrent request.
BEFORE = "48590f9"
# Answer lengths, in quarters of --max-tokens (mean: --max-tokens): clients whose answers
# all had one length would finish together and ask again together, forever in step.
LENGTHS = (2, 3, 4, 5, 6)
TEXT = (
    "Explain to a new colleague how a hash table works, why lookups are fast on average, "
    "what happens when two keys collide, how the table grows when it fills up, and which "
    "mistakes people make when they choose a hash function for strings or numbers in real "
    "programs that serve many users at the same time on small machines with little memory."
)


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    results = sorted(
        (REPO / "artifacts" / "export").glob("*/result.json"), key=lambda p: p.stat().st_mtime
    )
    for result in reversed(results):
        served = json.loads(result.read_text()).get("served")  # a name in the export's folder
        if (
            served
            and (result.parent / served).is_file()
            and (result.parent / "manifest.json").is_file()
        ):
            return result.parent / served
    from tasks.base import bundled_gguf

    return bundled_gguf("bundled:smollm2-135m-instruct")


def make_prompts(gguf: Path, n: int, tokens: int) -> tuple[list[str], int]:
    """`n` different user messages whose rendered chat prompt is `tokens` tokens long.

    Each starts with its own four-digit number, so no two requests of a run share more
    than the chat template's opening (a server that keeps prompts' KV cells, as llmft and
    llama.cpp's server do, gains only what real users with one system prompt would)."""
    from tasks.serve import chat_formatter, load_vocab

    vocab = load_vocab(gguf)
    render = chat_formatter(vocab)

    def count(text: str) -> int:
        prompt = render(messages=[{"role": "user", "content": text}]).prompt.encode()
        return len(vocab.tokenize(prompt, add_bos=False, special=True))

    words = f"{TEXT} {TEXT}".split()
    lo, hi = 1, len(words)  # the longest prefix that fits, after the widest number
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = "Question 9999. " + " ".join(words[:mid])
        lo, hi = (mid, hi) if count(text) <= tokens else (lo, mid - 1)
    body = " ".join(words[:lo])
    return [f"Question {1000 + i}. {body}" for i in range(n)], vocab.token_eos()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_commands(
    gguf: Path, port: int, threads: int, before_dir: Path, sets: list[str]
) -> dict[str, list]:
    py = sys.executable
    before = (
        "import sys; sys.path[:0] = [{d!r}, {r!r}]; from llmft_before import serve; "
        "from tasks.config import ServeConfig; serve(model={g!r}, cfg=ServeConfig(port={p}, "
        "n_threads={t}, max_concurrent={k}, max_queue=64))"
    )
    fill = dict(d=str(before_dir), r=str(REPO), g=str(gguf), p=port, t=threads)
    return {
        "llmft before, 1 context": [py, "-c", before.format(**fill, k=1)],
        "llmft before, 4 contexts": [py, "-c", before.format(**fill, k=4)],
        "llmft batched, 16 slots": [
            py,
            "-m",
            "tasks.serve",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--set",
            f"serve.n_threads={threads}",
        ],  # fmt: skip
        "llama-cpp-python server": [
            py,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
        ],  # fmt: skip
    }


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    # Every server gets llama.cpp threads that sleep at barriers, as `llmft serve` sets for
    # itself (docs/serving.md): the comparison is of how they schedule work, not of that.
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not answer within 180 s: {' '.join(cmd)}")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(client, prompt: str, max_tokens: int, eos: int, out: dict) -> None:
    import openai

    sent = time.perf_counter()
    stamps = []
    try:
        stream = await client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            logit_bias={str(eos): -100},
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
    except openai.APIStatusError as exc:
        out["errors"][str(exc.status_code)] += 1
        return
    except (openai.APIConnectionError, openai.APIError) as exc:
        out["errors"][type(exc).__name__] += 1
        return
    if not stamps:  # answered without a token: llama_cpp.server cuts one off for the next
        out["errors"]["no tokens"] += 1
        return
    out["ttft"].append(stamps[0] - sent)
    out["itl"] += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    out["tokens"] += len(stamps)
    out["requests"] += 1


async def load(url: str, clients: int, seconds: float, prompts, max_tokens, eos) -> dict:
    import httpx
    import openai

    out = {"tokens": 0, "requests": 0, "ttft": [], "itl": [], "errors": Counter()}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=900) as http:
        client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, http_client=http
        )
        start = time.perf_counter()

        async def user(i: int) -> None:
            j = 0
            while time.perf_counter() - start < seconds:
                length = max_tokens * LENGTHS[(i + j) % len(LENGTHS)] // 4
                await one_request(client, next(prompts), length, eos, out)
                j += 1

        await asyncio.gather(*(user(i) for i in range(clients)))
        out["elapsed"] = time.perf_counter() - start
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="default: the newest export's served GGUF, else bundled")
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--seconds", type=float, default=30, help="per number of clients")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128, help="mean answer length")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--servers", help="comma-separated subset, by the start of their names")
    parser.add_argument("--before", default=BEFORE, help="commit of the sequential server")
    parser.add_argument("--set", action="append", default=[], help="serve.key=value (batched)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    gguf = find_gguf(args.gguf)
    levels = [int(c) for c in args.clients.split(",")]
    texts, eos = make_prompts(gguf, 9000, args.prompt_tokens)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    old = subprocess.run(
        ["git", "show", f"{args.before}:tasks/serve/__init__.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (work / "llmft_before.py").write_text(old)
    port = free_port()
    servers = server_commands(gguf, port, args.threads, work, args.set)
    if args.servers:
        wanted = [w.strip() for w in args.servers.split(",")]
        servers = {k: v for k, v in servers.items() if any(k.startswith(w) for w in wanted)}
    print(
        f"GGUF: {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB); {os.cpu_count()} CPU cores, "
        f"{args.threads} threads per server; prompts of {args.prompt_tokens} tokens, "
        f"answers of {args.max_tokens // 2}-{args.max_tokens * 3 // 2} tokens "
        f"(mean {args.max_tokens}); {args.seconds:.0f} s per level; "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for name, cmd in servers.items():
        proc = start(cmd, port, work / f"{name.replace(' ', '_').replace(',', '')}.log")
        url = f"http://127.0.0.1:{port}"
        prompts = iter(texts)  # every server gets the same prompts in the same order
        try:
            asyncio.run(load(url, 1, 0, prompts, 8, eos))  # warm-up: one short answer
            for clients in levels:
                r = asyncio.run(load(url, clients, args.seconds, prompts, args.max_tokens, eos))
                r |= {"server": name, "clients": clients, "rss_mib": peak_rss_mib(proc.pid)}
                rows.append(r)
                print(f"  {name}, {clients} clients: {r['tokens'] / r['elapsed']:.1f} tok/s, "
                      f"{r['requests']} requests, errors {dict(r['errors'])}", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"load average at end {os.getloadavg()[0]:.1f}\n")
    print_table(rows)
    if args.json:
        for r in rows:
            r["errors"] = dict(r["errors"])
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    print(
        "| server | clients | requests | gen tok/s | × 1 client | p50 TTFT s | p95 TTFT s "
        "| p50 ITL ms | p95 ITL ms | errors | peak RSS MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    single: dict[str, float] = {}
    for r in rows:
        tps = r["tokens"] / r["elapsed"]
        if r["clients"] == 1:
            single[r["server"]] = tps
        scale = f"{tps / single[r['server']]:.1f}×" if single.get(r["server"]) else ""
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        print(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {tps:.1f} | {scale} "
            f"| {pct(r['ttft'], 50):.2f} | {pct(r['ttft'], 95):.2f} "
            f"| {1000 * pct(r['itl'], 50):.0f} | {1000 * pct(r['itl'], 95):.0f} "
            f"| {errors} | {r['rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
