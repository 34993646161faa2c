"""CPU inference: transformers (merged model, fp32) vs llama.cpp GGUF f16 / q8_0 / q4_k_m.

    .venv/bin/python bench/infer_cpu.py [--export DIR] [--max-new-tokens 64] [--rounds 3]

Every engine gets the same prompt token ids (the chat template rendered by the HF
tokenizer) and generates exactly `--max-new-tokens` greedy tokens (end-of-turn is banned,
so an early stop cannot flatter anyone). Each engine runs in its own subprocess, so its
peak RSS is its own, `--rounds` times interleaved with the others; its best round counts.
Decoding one token reads every weight once, so generated tokens/s cannot beat
`copy bandwidth / model bytes`; the table shows that bound and how close each engine
gets. `--export` defaults to the newest export in artifacts/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
PROMPTS = [
    "Who are you?",
    "Explain what a GGUF file is in two sentences.",
    "写一首关于秋天的短诗。",
    "List three uses of a hash function.",
]


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large memcpy (read + write), best of `repeats`."""
    src = np.ones(mib * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def prompt_ids(model_dir: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in PROMPTS[:n]:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        out.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return out


def run_hf(model_dir: Path, prompts: list[list[int]], new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once per new token, after its forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    n_prompt = t_prompt = n_gen = t_gen = 0.0
    with torch.inference_mode():
        for ids in prompts:
            stamps.clear()
            start = time.perf_counter()
            model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new,
                min_new_tokens=new,  # bans end-of-turn until `new` tokens
                do_sample=False,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
            n_prompt, t_prompt = n_prompt + len(ids), t_prompt + stamps[0] - start
            n_gen, t_gen = n_gen + len(stamps) - 1, t_gen + stamps[-1] - stamps[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prompt_tps": n_prompt / t_prompt, "gen_tps": n_gen / t_gen, "bytes": weights}


def run_gguf(path: Path, prompts: list[list[int]], new: int) -> dict:
    from llama_cpp import Llama, LogitsProcessorList

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=THREADS, verbose=False)
    eos = llm.token_eos()
    ban_eos = lambda ids, logits: np.where(np.arange(len(logits)) == eos, -np.inf, logits)  # noqa: E731
    n_prompt = t_prompt = n_gen = t_gen = 0.0
    for ids in prompts:
        start = time.perf_counter()
        first = end = start
        for i, _ in enumerate(
            llm.generate(ids, top_k=1, temp=0.0, logits_processor=LogitsProcessorList([ban_eos]))
        ):
            end = time.perf_counter()
            if i == 0:
                first = end
            if i + 1 >= new:
                break
        n_prompt, t_prompt = n_prompt + len(ids), t_prompt + first - start
        n_gen, t_gen = n_gen + new - 1, t_gen + end - first
    return {
        "prompt_tps": n_prompt / t_prompt,
        "gen_tps": n_gen / t_gen,
        "bytes": path.stat().st_size,
    }


def find_export(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    found = [p.parent for p in (REPO / "artifacts" / "export").glob("*/result.json")]
    if not found:
        sys.exit("no export artifact in artifacts/: run `make run` first, or pass --export DIR")
    return max(found, key=lambda p: p.stat().st_mtime)


def merged_dir(export_dir: Path) -> Path:
    store = export_dir.parent.parent
    key = json.loads((export_dir / "manifest.json").read_text())["inputs"]["merged"]
    for stage in ("merge", "train"):  # full fine-tuning: the trained folder is the merged one
        if (store / stage / key / "model" / "config.json").is_file():
            return store / stage / key / "model"
    sys.exit(f"the merged model of {export_dir} ({key}) is not in {store}")


def child(args: argparse.Namespace) -> None:
    """One engine, in its own process: prints a JSON line with its numbers and peak RSS."""
    prompts = json.loads(Path(args.prompt_file).read_text())
    target = Path(args.engine.split(":", 1)[1])
    if args.engine.startswith("hf:"):
        result = run_hf(target, prompts, args.max_new_tokens)
    else:
        result = run_gguf(target, prompts, args.max_new_tokens)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))


def peak_rss() -> int:
    """This process's resident high-water mark (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", help="an export artifact folder (with result.json)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--threads", type=int, help="CPU threads for every engine (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per engine; the best counts")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)

    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)  # the engines' subprocesses read it
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
    export_dir = find_export(args.export)
    model_dir = merged_dir(export_dir)
    prompt_file = export_dir.parent / ".bench-prompts.json"
    prompts = prompt_ids(model_dir, args.prompts)
    prompt_file.write_text(json.dumps(prompts))
    bandwidth = copy_bandwidth()
    engines = [("transformers fp32 (merged)", f"hf:{model_dir}")]
    engines += [
        (f"llama.cpp {t}", f"gguf:{export_dir / f'model-{t}.gguf'}")
        for t in ("f16", "q8_0", "q4_k_m")
        if (export_dir / f"model-{t}.gguf").is_file()
    ]
    # Rounds go engine after engine, so a burst of load elsewhere hits one round, not one
    # engine; each engine's best round is reported (peak RSS: its largest).
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for label, engine in engines:
            cmd = [sys.executable, __file__, "--engine", engine, "--prompt-file", str(prompt_file)]
            cmd += ["--max-new-tokens", str(args.max_new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            old = best.setdefault(label, r)
            best[label] = max(old, r, key=lambda x: x["gen_tps"]) | {
                "prompt_tps": max(old["prompt_tps"], r["prompt_tps"]),
                "peak_rss": max(old["peak_rss"], r["peak_rss"]),
            }
    rows = [(label, best[label]) for label, _ in engines]
    prompt_file.unlink()

    base_tps = rows[0][1]["gen_tps"]
    print(f"model: {model_dir}")
    print(
        f"{len(prompts)} prompts ({sum(map(len, prompts))} prompt tokens), "
        f"{args.max_new_tokens} new tokens each, {threads} CPU threads, best of "
        f"{args.rounds} rounds, copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print()
    print(
        "| engine | weights MiB | prompt tok/s | gen tok/s | gen × transformers "
        "| peak RSS MiB | bandwidth bound tok/s | % of bound |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        bound = bandwidth / r["bytes"]
        print(
            f"| {label} | {r['bytes'] / 2**20:.0f} | {r['prompt_tps']:.0f} | {r['gen_tps']:.1f} "
            f"| {r['gen_tps'] / base_tps:.1f}× | {r['peak_rss'] / 2**20:.0f} | {bound:.0f} "
            f"| {100 * r['gen_tps'] / bound:.0f}% |"
        )


if __name__ == "__main__":
    main()
