"""Export stage: merged HF model → GGUF (f16, then quantized) → verified → one file served.

    artifacts/export/<key>/model-f16.gguf        llama.cpp's own converter, outtype f16
    artifacts/export/<key>/model-q8_0.gguf       llama_model_quantize, one per export.quantize
    artifacts/export/<key>/base-f16.gguf         LoRA only: the base, for base + adapter serving
    artifacts/export/<key>/adapter-f16.gguf      LoRA only: convert_lora_to_gguf.py
    artifacts/export/<key>/verification.json|md  every GGUF vs the merged HF model on dev prompts
    artifacts/export/<key>/result.json           {"served": "model-q8_0.gguf", "reason", ...}
    artifacts/export/<key>/logs/                 converter and quantizer output

The converter is llama.cpp's `convert_hf_to_gguf.py` from the sdist of the installed
llama-cpp-python, so the GGUF matches the llama.cpp that serves it; `--fetch-converter`
(run by `make setup`) downloads that sdist once through pip and extracts the scripts with
their `gguf-py`, which goes first on the converter's PYTHONPATH.

Verification feeds the same token ids to HF (fp32) and to each GGUF: perplexity on the
dev answers, greedy next-token agreement with HF, file size and CPU tokens/s. The served
file is the smallest within `export.ppl_tolerance` of HF's perplexity (else f16, saying
why); a GGUF that does not load, or one past `export.max_ppl_ratio`, fails the stage.

Run alone: `python -m tasks.export [--config FILE] [--set ...]` (the stage and its inputs),
`python -m tasks.export --fetch-converter` (what `make setup` runs), `--quantize SRC DST TYPE`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.config import REPO_ROOT, Config, UserError, load_config
from tasks.formatting import encode
from tasks.store import Ref, Store, make_key, write_json_atomic

VERSION = "2"
CONVERTER_ROOT = REPO_ROOT / ".cache" / "llama-cpp"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
MAX_VERIFY_TOKENS = 512  # per dev record; longer records are cut (both engines see the same ids)
log = logging.getLogger("llmft.export")


class ExportError(UserError):
    """Conversion, quantization or verification failed; the message carries the numbers."""


def llama_cpp_version() -> str:
    return package_version("llama-cpp-python")


# --- the converter ------------------------------------------------------------------------


def fetch_converter() -> Path:
    """`.cache/llama-cpp/llama.cpp-<version>/` with the converter scripts and gguf-py.

    Idempotent: returns at once when present. The sdist (about 77 MB) is fetched once with
    `pip download`, whose HTTP cache makes later fetches work offline.
    """
    ver = llama_cpp_version()
    dest = CONVERTER_ROOT / f"llama.cpp-{ver}"
    if (dest / ".complete").is_file():
        return dest
    CONVERTER_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CONVERTER_ROOT / ".lock")):
        if (dest / ".complete").is_file():
            return dest
        sdist = CONVERTER_ROOT / f"llama_cpp_python-{ver}.tar.gz"
        if not sdist.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            cmd += [f"llama-cpp-python=={ver}", "-d", str(CONVERTER_ROOT)]
            log.info("fetching the llama.cpp converter: %s", " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not sdist.is_file():
                raise ExportError(
                    f"could not fetch the llama-cpp-python {ver} sdist for its converter "
                    f"(pip said: {done.stderr.strip()[-800:]}); fix: check the package index, "
                    "or place the sdist in .cache/llama-cpp/"
                )
        tmp = CONVERTER_ROOT / f".partial-{ver}"
        prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.removeprefix(prefix)
                if m.name.startswith(prefix) and rel.startswith(CONVERTER_FILES):
                    m.name = rel
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        missing = [f for f in CONVERTER_FILES[:2] + ("gguf-py/",) if not (tmp / f).exists()]
        if missing:
            raise ExportError(f"{sdist.name} lacks {missing} under vendor/llama.cpp/")
        (tmp / ".complete").write_text(ver + "\n")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest


def _run_logged(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = logfile.read_text(errors="replace")[-1500:]
        raise ExportError(f"{Path(cmd[1]).name} failed (exit {done.returncode}):\n{tail}")


def _converter_env(conv: Path) -> dict[str, str]:
    # The vendored gguf-py must win over the PyPI `gguf` in site-packages: same version as C++.
    return {**os.environ, "PYTHONPATH": str(conv / "gguf-py"), "NO_LOCAL_GGUF": ""}


def convert_hf(model_dir: Path, out: Path, outtype: str, logs: Path) -> None:
    conv = fetch_converter()
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir)]
    cmd += ["--outfile", str(out), "--outtype", outtype]
    _run_logged(cmd, logs / f"convert-{out.stem}.log", _converter_env(conv))


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str, logs: Path) -> None:
    conv = fetch_converter()
    cmd = [sys.executable, str(conv / "convert_lora_to_gguf.py"), str(adapter_dir)]
    cmd += ["--base", str(base_dir), "--outfile", str(out), "--outtype", outtype]
    _run_logged(cmd, logs / f"convert-{out.stem}.log", _converter_env(conv))


def quantize(src: Path, dst: Path, qtype: str, logs: Path) -> None:
    """In a subprocess: llama.cpp logs every tensor on stderr and may abort on bad input."""
    cmd = [sys.executable, "-m", "tasks.export", "--quantize", str(src), str(dst), qtype]
    _run_logged(cmd, logs / f"quantize-{qtype}.log")


def _quantize_here(src: str, dst: str, qtype: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} → {qtype}) returned {rc}")


# --- verification -------------------------------------------------------------------------


def dev_samples(tokenizer: Any, records: list[dict], template: str) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer, number of prompt tokens) per dev record, as trained."""
    samples = []
    for record in records:
        e = encode(tokenizer, record, template, MAX_VERIFY_TOKENS)
        if e is not None and e.prompt_len < len(e.input_ids):
            samples.append((e.input_ids, e.prompt_len))
    return samples


def _score(logits: Any, ids: list[int], n_prompt: int) -> tuple[float, int, list[int]]:
    """Summed NLL of the answer tokens, their count, and the argmax at each answer position."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)[n_prompt - 1 : len(ids) - 1]
    targets = torch.tensor(ids[n_prompt:])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    return nll, len(targets), logits.argmax(-1).tolist()


def hf_reference(model_dir: Path, samples: list[tuple[list[int], int]]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count, argmax = 0.0, 0, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one short sequence at a time: threads would mostly wait
    try:
        with torch.inference_mode():
            for ids, n_prompt in samples:
                logits = model(torch.tensor([ids])).logits[0]
                s_nll, s_count, s_argmax = _score(logits, ids, n_prompt)
                nll, count = nll + s_nll, count + s_count
                argmax.append(s_argmax)
    finally:
        torch.set_num_threads(threads)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"ppl": math.exp(nll / count), "tokens": count, "argmax": argmax, "bytes": size}


def timed_generation(llm: Any, prompt_ids: list[int], n: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s): exactly n greedy tokens, EOS not honoured."""
    start = time.perf_counter()
    first = end = start
    for i, _ in enumerate(llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True)):
        end = time.perf_counter()
        if i == 0:
            first = end  # the prompt is evaluated before the first token comes out
        if i + 1 >= n:
            break
    return len(prompt_ids) / (first - start), (n - 1) / max(end - first, 1e-9)


def verify_gguf(
    path: Path,
    samples: list[tuple[list[int], int]],
    hf: dict[str, Any],
    speed_tokens: int,
    lora_path: Path | None = None,
) -> dict[str, Any]:
    """One verification row: perplexity, agreement with HF, size, tokens/s (or the error)."""
    from llama_cpp import Llama

    size = path.stat().st_size + (lora_path.stat().st_size if lora_path else 0)
    row: dict[str, Any] = {"file": path.name, "bytes": size, "loads": False}
    if lora_path:
        row["file"] = f"{path.name} + {lora_path.name}"
    try:
        llm = Llama(
            model_path=str(path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=MAX_VERIFY_TOKENS + speed_tokens,
            n_threads=os.cpu_count(),
            logits_all=True,
            verbose=False,
        )
    except Exception as exc:  # llama.cpp says only "failed to load model"
        row["error"] = f"llama.cpp cannot load it: {exc}"
        return row
    nll, count, agree = 0.0, 0, 0
    for (ids, n_prompt), hf_argmax in zip(samples, hf["argmax"], strict=True):
        llm.reset()
        llm.eval(ids)
        s_nll, s_count, s_argmax = _score(llm.scores[: len(ids)], ids, n_prompt)
        nll, count = nll + s_nll, count + s_count
        agree += sum(a == b for a, b in zip(s_argmax, hf_argmax, strict=True))
    prompt_tps, gen_tps = timed_generation(llm, samples[0][0][: samples[0][1]], speed_tokens)
    ppl = math.exp(nll / count)
    row |= {
        "loads": True,
        "ppl": round(ppl, 4),
        "ppl_ratio": round(ppl / hf["ppl"], 4),
        "agreement_pct": round(100 * agree / count, 2),
        "prompt_tps": round(prompt_tps, 1),
        "gen_tps": round(gen_tps, 1),
    }
    return row


def choose_served(rows: list[dict[str, Any]], tolerance: float) -> tuple[str, str]:
    """The smallest model GGUF within tolerance of HF perplexity; else the first (f16)."""
    models = [r for r in rows if r["type"] != "adapter" and r.get("loads")]
    within = [r for r in models if r["ppl_ratio"] <= 1 + tolerance]
    if within:
        best = min(within, key=lambda r: r["bytes"])
        return best["file"], (
            f"{best['type']} is the smallest GGUF within {tolerance:.0%} of HF perplexity "
            f"(ratio {best['ppl_ratio']:.4f})"
        )
    best = next(r for r in models if r["type"] == rows[0]["type"])
    ratios = ", ".join(f"{r['type']} {r['ppl_ratio']:.4f}" for r in models)
    return best["file"], (
        f"no GGUF within {tolerance:.0%} of HF perplexity ({ratios}); serving {best['type']}"
    )


def check_rows(rows: list[dict[str, Any]], max_ratio: float) -> None:
    """Fail on a GGUF llama.cpp cannot load or one far out of tolerance, with the numbers."""
    broken = [f"{r['file']}: {r['error']}" for r in rows if not r.get("loads")]
    far = [
        f"{r['file']}: perplexity {r['ppl']} is {r['ppl_ratio']:.2f}× HF's (limit {max_ratio}×)"
        for r in rows
        if r.get("loads") and r["ppl_ratio"] > max_ratio
    ]
    if broken or far:
        raise ExportError("GGUF verification failed:\n  " + "\n  ".join(broken + far))


def table_md(hf: dict[str, Any], rows: list[dict[str, Any]], served: str) -> str:
    lines = [
        "| model | size MiB | perplexity | vs HF | greedy agreement % | prompt tok/s | gen tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| HF merged (fp32) | {hf['bytes'] / 2**20:.1f} | {hf['ppl']:.4f} | 1.0000 | 100.00 | | |",
    ]
    for r in rows:
        mark = " (served)" if r["file"] == served else ""
        if not r.get("loads"):
            lines.append(f"| {r['file']} | {r['bytes'] / 2**20:.1f} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['file']}{mark} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.4f} | "
            f"{r['ppl_ratio']:.4f} | {r['agreement_pct']:.2f} | {r['prompt_tps']:.1f} | "
            f"{r['gen_tps']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# --- the stage ----------------------------------------------------------------------------


def key(cfg: Config, merged: Ref, train: Ref, data: Ref) -> str:
    section = cfg.export.model_dump(mode="json")
    section.pop("fail_stage")  # a retry with the switch off must find the same key
    section["template"] = cfg.train.template
    inputs = {"merged": merged.key, "train": train.key, "data": data.key}
    return make_key("export", VERSION, section, inputs | {"llama_cpp": llama_cpp_version()})


def _lora_adapter(train: Ref) -> Path | None:
    config = train.dir / "adapter" / "adapter_config.json"
    if config.is_file() and json.loads(config.read_text()).get("peft_type") == "LORA":
        return config.parent
    return None


def skip_reason(cfg: Config, merged: Ref | None) -> str | None:
    """Why this run makes no GGUF (the pipeline logs it and keeps it in the summary)."""
    if merged is None or cfg.train.method == "ptuning":
        return (
            f"train.method={cfg.train.method} — llama.cpp has no prefix tuning, so a P-Tuning "
            "v2 model cannot become GGUF; the pipeline ends at evaluation"
        )
    if not cfg.export.enabled:
        return "export.enabled is false"
    return None


def run(cfg: Config, store: Store, merged: Ref | None, train: Ref, data: Ref) -> Ref | None:
    if cfg.export.fail_stage:
        raise ExportError("export.fail_stage is set: failing on purpose (fault switch for tests)")
    if reason := skip_reason(cfg, merged):
        log.warning("export skipped: %s", reason)
        return None
    ex = cfg.export
    model_dir = merged.dir / "model"
    adapter = _lora_adapter(train) if ex.lora_adapter else None
    base_dir = Path(merged.manifest().get("base_model_dir", "")) if adapter else None

    def work(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        logs = tmp / "logs"
        f16 = tmp / f"model-{ex.outtype}.gguf"
        convert_hf(model_dir, f16, ex.outtype, logs)
        files = [(ex.outtype, f16)]
        for qtype in ex.quantize:
            quantize(f16, tmp / f"model-{qtype}.gguf", qtype, logs)
            files.append((qtype, tmp / f"model-{qtype}.gguf"))
        if adapter and base_dir:
            convert_hf(base_dir, tmp / f"base-{ex.outtype}.gguf", ex.outtype, logs)
            convert_lora(adapter, model_dir, tmp / f"adapter-{ex.outtype}.gguf", ex.outtype, logs)

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        records = json.loads((data.dir / "dev.json").read_text())[: ex.verify_prompts]
        samples = dev_samples(tokenizer, records, cfg.train.template)
        if not samples:
            raise ExportError(f"{data.dir / 'dev.json'}: no dev record to verify the GGUFs on")
        hf = hf_reference(model_dir, samples)
        rows = [verify_gguf(p, samples, hf, ex.speed_tokens) | {"type": t} for t, p in files]
        if adapter and base_dir:
            base_gguf, adapter_gguf = (
                tmp / f"base-{ex.outtype}.gguf",
                tmp / f"adapter-{ex.outtype}.gguf",
            )
            row = verify_gguf(base_gguf, samples, hf, ex.speed_tokens, lora_path=adapter_gguf)
            rows.append(row | {"type": "adapter"})
        check_rows(rows, ex.max_ppl_ratio)
        served, reason = choose_served(rows, ex.ppl_tolerance)
        log.info("served GGUF: %s (%s)", served, reason)
        hf_row = {k: v for k, v in hf.items() if k != "argmax"} | {"ppl": round(hf["ppl"], 4)}
        verification = {"hf": hf_row, "rows": rows, "prompts": len(samples)}
        write_json_atomic(tmp / "verification.json", verification)
        (tmp / "verification.md").write_text(table_md(hf, rows, served))
        result = {
            "served": served,
            "reason": reason,
            "files": {t: p.name for t, p in files},
            "lora_adapter": f"adapter-{ex.outtype}.gguf" if adapter and base_dir else None,
            "lora_base": f"base-{ex.outtype}.gguf" if adapter and base_dir else None,
        }
        write_json_atomic(tmp / "result.json", result)
        return {"served": served, "llama_cpp": llama_cpp_version()}

    inputs = {"merged": merged.key, "train": train.key, "data": data.key}
    return store.build(
        "export",
        key(cfg, merged, train, data),
        work,
        inputs=inputs,
        config=ex.model_dump(mode="json"),
    )


def served_gguf(ref: Ref) -> Path:
    """Absolute path of the GGUF the export chose to serve."""
    return ref.dir / json.loads((ref.dir / "result.json").read_text())["served"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fetch-converter", action="store_true", help="fetch llama.cpp's converter and exit"
    )
    parser.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"))
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.fetch_converter:
        print(fetch_converter())
    elif args.quantize:
        _quantize_here(*args.quantize)
    else:  # the stage with its inputs (store hits when they are already built)
        from tasks import base as base_stage
        from tasks import data as data_stage
        from tasks import merge
        from tasks import train as train_stage

        cfg = load_config(args.config, args.set)
        store = Store(cfg.pipeline.store)
        base = base_stage.run(cfg, store)
        data = data_stage.run(cfg, store, base_stage.model_dir(base))
        train = train_stage.run(cfg, store, data, base)
        ref = run(cfg, store, merge.run(cfg, store, base, train), train, data)
        print((ref.dir / "verification.md").read_text() if ref else "nothing exported")
