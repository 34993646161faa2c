"""Benchmark the data stage against Hugging Face `datasets` doing the same cleaning.

    .venv/bin/python bench/data.py [--records 1000000] [--workdir DIR]

Writes a JSON Lines file of alpaca records with realistic lengths (on average: instruction
120 characters, input on 40 % of records, output 360 characters; a fifth in Chinese; 640
bytes a line), 5 % of them dirty, then runs, each in its own child process:

- `llmft data --input FILE --output-dir DIR` (all of it: parse, clean, dedupe, split, write);
- the usual `datasets` recipe: load_dataset("json") → map(clean) → filter(empty, too long)
  → filter(dedupe) → train_test_split twice → to_json. `load_dataset` stops at the first
  invalid line, so it gets a copy of the file without the lines that are not valid JSON
  objects with text fields (a head start: it never sees 1 % of the dirt).

Records/s counts the records of each pipeline's own input file over wall-clock time, the
process start included; CPU s adds user and system time of the process and its workers;
peak memory is the highest sum of PSS (resident memory, pages shared between processes
counted once) over the process and its children, sampled every 50 ms. Not a test: it
prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "a",
    "tenant",
    "landlord",
    "deposit",
    "notice",
    "court",
    "claim",
    "rent",
    "employer",
    "wage",
    "contract",
    "written",
    "agreement",
    "party",
    "small",
    "must",
    "may",
    "should",
    "can",
    "file",
    "within",
    "after",
    "before",
    "days",
    "law",
    "right",
    "repair",
    "month",
    "year",
    "payment",
    "receipt",
    "evidence",
    "letter",
    "lawyer",
    "judge",
    "consumer",
    "refund",
    "seller",
    "product",
    "warranty",
    "return",
    "policy",
    "neighbour",
    "noise",
    "fence",
    "property",
    "boundary",
    "insurance",
]
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质近世"
BASELINE_SCRIPT = r"""
import re, sys, unicodedata, xxhash
from datasets import load_dataset, disable_progress_bars
disable_progress_bars()
src, out, cache = sys.argv[1:4]
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
RUNS = re.compile(r"(\S)[ \t]{2,}")
def clean(text):
    text = (text or "").replace("{{name}}", "Lexi").replace("{{author}}", "the llmft team")
    text = CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", RUNS.sub(r"\1 ", text)))
    return unicodedata.normalize("NFC", text).strip()
def normalise(batch):
    return {k: [clean(t) for t in batch[k]] for k in ("instruction", "input", "output")}
def ok(batch):
    return [bool(i) and bool(o) and len(i) + len(n) + len(o) <= 16000
            for i, n, o in zip(batch["instruction"], batch["input"], batch["output"])]
seen = set()
def first(batch):
    keep = []
    for i, n, o in zip(batch["instruction"], batch["input"], batch["output"]):
        h = xxhash.xxh3_128_intdigest(f"{i}\0{n}\0{o}".encode())
        keep.append(h not in seen)
        seen.add(h)
    return keep
ds = load_dataset("json", data_files=src, split="train", cache_dir=cache)
ds = ds.map(normalise, batched=True).filter(ok, batched=True).filter(first, batched=True)
parts = ds.train_test_split(test_size=0.2, seed=42)
rest = parts["test"].train_test_split(test_size=0.5, seed=42)
for name, part in (("train", parts["train"]), ("dev", rest["train"]), ("test", rest["test"])):
    part.to_json(f"{out}/{name}.jsonl", force_ascii=False)
print(len(ds))
"""


def sentence(rng: random.Random, chinese: bool) -> str:
    if chinese:
        return "".join(rng.choice(HANZI) for _ in range(rng.randint(8, 30))) + "。"
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
    return " ".join(words).capitalize() + "."


def record(rng: random.Random, i: int) -> dict[str, str]:
    zh = rng.random() < 0.2
    sep = "" if zh else " "

    def text(lo: int, hi: int) -> str:
        return sep.join(sentence(rng, zh) for _ in range(rng.randint(lo, hi)))

    return {
        "instruction": f"{text(1, 2)} (#{i})",
        "input": text(1, 3) if rng.random() < 0.4 else "",
        "output": text(1, 8),
    }


def dirty(rng: random.Random, rec: dict[str, str], earlier: list[str]) -> str | bytes:
    """One dirty line; the mix adds up to the 5 % the caller asks for."""
    roll = rng.random() * 5.0
    if roll < 1.5 and earlier:  # duplicate, exact or only differing in whitespace
        line = rng.choice(earlier)
        return line if roll < 1.0 else line.replace('", "', '  ", "', 1)
    if roll < 2.5:  # empty prompt or response
        rec[rng.choice(["instruction", "output"])] = rng.choice(["", "   ", "\u200b"])
    elif roll < 3.5:  # fixable mess: CRLF, control chars, runs of spaces, NFD, placeholders
        rec["output"] = "  " + rec["output"].replace(". ", ".\r\n\x07", 2) + "   "
        rec["instruction"] = "Cafe\u0301  {{name}}?  " + rec["instruction"]
    elif roll < 4.0:  # not JSON: a truncated line
        return json.dumps(rec, ensure_ascii=False)[: rng.randint(5, 60)]
    elif roll < 4.4:  # wrong type
        rec["output"] = rng.choice([42, ["a", "b"], {"text": "x"}, True])
    elif roll < 4.5:  # invalid UTF-8
        return json.dumps(rec, ensure_ascii=False).encode()[:-30] + b"\xff\xfe" + b'"}'
    elif roll < 4.6:  # over-long response
        rec["output"] = "word " * 4000
    elif roll < 4.7:  # not an object
        return json.dumps(list(rec.values()), ensure_ascii=False)
    else:  # mixed: whitespace only differences that normalise away, kept
        rec["input"] = "\t" + rec["input"] + "\n\n\n"
    return json.dumps(rec, ensure_ascii=False)


def generate(path: Path, baseline_path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    earlier: list[str] = []
    with open(path, "wb") as f, open(baseline_path, "wb") as g:
        for i in range(n):
            rec = record(rng, i)
            line = (
                dirty(rng, rec, earlier)
                if rng.random() < 0.05
                else json.dumps(rec, ensure_ascii=False)
            )
            if isinstance(line, str) and len(earlier) < 5000 and rng.random() < 0.01:
                earlier.append(line)
            raw = line if isinstance(line, bytes) else line.encode()
            f.write(raw + b"\n")
            if _loadable(raw):
                g.write(raw + b"\n")


def _loadable(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(isinstance(v, str) for v in obj.values())


@dataclass
class Result:
    name: str
    records: int  # lines of its own input file
    kept: int
    seconds: float  # wall clock
    cpu_seconds: float  # user + system, worker processes included
    peak_rss: int  # bytes of PSS, summed over the process and its children
    input_bytes: int


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS of the process tree, stdout) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = [0]
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, peak), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: callers take deltas
    return seconds, usage.ru_utime + usage.ru_stime, peak[0], out.decode()


def _sample_rss(pid: int, peak: list[int]) -> None:
    try:
        root = psutil.Process(pid)
        while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
            tree = [root, *root.children(recursive=True)]
            rss = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):  # PSS: shared pages counted once
                    rss += p.memory_full_info().pss
            peak[0] = max(peak[0], rss)
            time.sleep(0.05)
    except psutil.Error:
        pass


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--workdir", help="keep files here (default: a temp folder, removed)")
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src, base_src = work / "raw.jsonl", work / "raw_loadable.jsonl"
        t = time.perf_counter()
        generate(src, base_src, args.records)
        size = src.stat().st_size
        print(f"generated {args.records:,} records ({size / 2**20:,.0f} MiB) in "
              f"{time.perf_counter() - t:.0f} s; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
        env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf"), "HF_HUB_OFFLINE": "1"}
        llmft = [str(REPO / ".venv/bin/llmft"), "data", "--input", str(src)]
        secs, cpu, rss, out = measure([*llmft, "--output-dir", str(work / "ours")], env)
        report = json.loads(out)
        results.append(Result("llmft data", args.records, report["kept"], secs, cpu, rss, size))
        if not args.skip_baseline:
            (work / "theirs").mkdir()
            cmd = [sys.executable, "-c", BASELINE_SCRIPT, str(base_src), str(work / "theirs")]
            secs, cpu2, rss, out = measure([*cmd, str(work / "hf")], env)
            name = "datasets: load → map → filter → dedupe → split → to_json"
            n, kept = count_lines(base_src), int(out.split()[-1])
            results.append(Result(name, n, kept, secs, cpu2 - cpu, rss, base_src.stat().st_size))
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print(
        "| pipeline | input records | kept | wall s | CPU s | records/s | peak memory | memory / input |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r.name} | {r.records:,} | {r.kept:,} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | "
              f"{r.records / r.seconds:,.0f} | {r.peak_rss / 2**20:,.0f} MiB | "
              f"{r.peak_rss / r.input_bytes:.2f}× |")  # fmt: skip
    if len(results) == 2:
        ours, theirs = results
        speedup = (ours.records / ours.seconds) / (theirs.records / theirs.seconds)
        print(f"\nllmft data: {speedup:.1f}× the records/s of the datasets recipe")
    print("rejected by reason (llmft data):", json.dumps(report["rejected_by_reason"]))


if __name__ == "__main__":
    main()
