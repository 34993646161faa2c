"""Numbers per GGUF against the merged HF model, and the choice of the served file.

The same token ids go to HF (fp32) and to each GGUF (the fidelity checks have shown that
the GGUF renders and tokenizes prompts into exactly these ids): perplexity on the dev
answers, greedy next-token agreement with HF, file size and CPU tokens/s.

Two gates decide what is served: perplexity within `export.ppl_tolerance` of HF's and
greedy agreement at or above `export.min_agreement_pct`. The served file is the smallest
GGUF inside both; every other one carries the reason it was not chosen. A GGUF that does
not load, one past `export.max_ppl_ratio`, or a reference conversion (f16) below the
agreement floor fails the stage: no quantization can be better than its source.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from tasks.config import UserError
from tasks.formatting import encode

MAX_VERIFY_TOKENS = 512  # per dev record; longer records are cut (both engines see the same ids)


class ExportError(UserError):
    """Conversion, quantization or verification failed; the message carries the numbers."""


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


def choose_served(
    rows: list[dict[str, Any]], tolerance: float, min_agreement: float = 0.0
) -> tuple[str, str, dict[str, str]]:
    """(served file, why, {every other model GGUF: why it was not served}).

    The smallest model GGUF within `tolerance` of HF perplexity and at or above
    `min_agreement` % greedy agreement; when none is, the reference conversion (the first
    row, f16), which `check_rows` has held to the agreement floor.
    """
    models = [r for r in rows if r["type"] != "adapter" and r.get("loads")]
    misses = {r["file"]: _misses(r, tolerance, min_agreement) for r in models}
    within = [r for r in models if not misses[r["file"]]]
    if within:
        best = min(within, key=lambda r: r["bytes"])
        reason = (
            f"{best['type']} is the smallest GGUF within {tolerance:.0%} of HF perplexity "
            f"(ratio {best['ppl_ratio']:.4f}) and at or above {min_agreement:g}% greedy "
            f"agreement ({best['agreement_pct']:.2f}%)"
        )
    else:
        best = next(r for r in models if r["type"] == rows[0]["type"])
        ratios = ", ".join(f"{r['type']} {r['ppl_ratio']:.4f}" for r in models)
        reason = (
            f"no GGUF within {tolerance:.0%} of HF perplexity and {min_agreement:g}% greedy "
            f"agreement ({ratios}); serving {best['type']}"
        )
    rejected = {
        r["file"]: "base + LoRA adapter, for unmerged serving (llama.cpp --lora); the served "
        "file is always one merged GGUF"
        for r in rows
        if r["type"] == "adapter"
    }
    for r in models:
        if r is best:
            continue
        why = misses[r["file"]] or [
            f"larger than {best['file']} ({r['bytes']} > {best['bytes']} bytes)"
        ]
        rejected[r["file"]] = "; ".join(why)
    return best["file"], reason, rejected


def _misses(row: dict[str, Any], tolerance: float, min_agreement: float) -> list[str]:
    """Which gate a row misses, with its number and the limit."""
    why = []
    if row["ppl_ratio"] > 1 + tolerance:
        why.append(f"perplexity {row['ppl_ratio']:.4f}× HF's, over the {tolerance:.0%} tolerance")
    if row["agreement_pct"] < min_agreement:
        why.append(
            f"greedy agreement {row['agreement_pct']:.2f}% below the {min_agreement:g}% floor"
        )
    return why


def check_rows(rows: list[dict[str, Any]], max_ratio: float, min_agreement: float = 0.0) -> None:
    """Fail on a GGUF llama.cpp cannot load, one far out of tolerance, or a reference
    conversion (the first row) below the agreement floor, with the numbers."""
    broken = [f"{r['file']}: {r['error']}" for r in rows if not r.get("loads")]
    far = [
        f"{r['file']}: perplexity {r['ppl']} is {r['ppl_ratio']:.2f}× HF's (limit {max_ratio}×)"
        for r in rows
        if r.get("loads") and r["ppl_ratio"] > max_ratio
    ]
    ref = rows[0] if rows else {}
    if ref.get("loads") and ref["agreement_pct"] < min_agreement:
        far.append(
            f"{ref['file']}: greedy agreement with HF is {ref['agreement_pct']:.2f}%, below "
            f"export.min_agreement_pct={min_agreement:g} — the unquantized conversion itself "
            "disagrees with the HF model (fix: check the converter log in logs/; lower the "
            "floor only for a model whose logits are nearly flat)"
        )
    if broken or far:
        raise ExportError("GGUF verification failed:\n  " + "\n  ".join(broken + far))


def table_md(
    hf: dict[str, Any],
    rows: list[dict[str, Any]],
    served: str,
    reason: str = "",
    fidelity: dict[str, Any] | None = None,
) -> str:
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
    notes = [f"Served: {served}" + (f" — {reason}." if reason else ".")]
    notes += [f"Not served: {r['file']} — {r['rejected']}." for r in rows if r.get("rejected")]
    if fidelity:
        stops = ", ".join(fidelity["stop_tokens"])
        differ = len(fidelity["probe_differences"])
        notes.append(
            f"Fidelity: {fidelity['conversations']} chats rendered by the GGUF's own template "
            f"and tokenizer give training's token ids; {fidelity['texts'] - differ} of "
            f"{fidelity['texts']} texts tokenize alike"
            + (
                f" ({differ} probe text(s) outside the data do not: verification.json)"
                if differ
                else ""
            )
            + f"; BOS {fidelity['bos_in_prompt']}× per prompt; stops on {stops}."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
