"""Export stage: merged HF model → GGUF (f16, then quantized) → verified → one file served.

    artifacts/export/<key>/model-f16.gguf        llama.cpp's own converter, outtype f16
    artifacts/export/<key>/model-q8_0.gguf       llama_model_quantize, one per export.quantize
    artifacts/export/<key>/base-f16.gguf         LoRA only: the base, for base + adapter serving
    artifacts/export/<key>/adapter-f16.gguf      LoRA only: convert_lora_to_gguf.py
    artifacts/export/<key>/verification.json|md  fidelity checks, then every GGUF vs the merged
                                                 HF model on dev prompts, the choice and why
    artifacts/export/<key>/result.json           {"served": "model-q8_0.gguf", "reason",
                                                  "rejected": {file: why}, ...}
    artifacts/export/<key>/Modelfile             Ollama: FROM the served GGUF, TEMPLATE, stops
    artifacts/export/<key>/logs/                 converter and quantizer output

Every GGUF carries the chat template training rendered with (tokenizer.chat_template; the
alpaca one for alpaca training or a model without a template), so serving renders as
training did. Conversion and quantization: tasks/export/convert.py (llama.cpp's converter
from the sdist of the installed llama-cpp-python). Fidelity (tasks/export/fidelity.py):
each GGUF's own template and tokenizer must give training's token ids for every test chat,
with one BOS at most and training's end-of-turn token stopping generation; else the stage
fails, naming the first differing token and both renderings. Verification
(tasks/export/verify.py): perplexity and greedy agreement against HF per GGUF; the served
file is the smallest within `export.ppl_tolerance` and `export.min_agreement_pct` (else
the unquantized one, saying why). The Modelfile: tasks/export/modelfile.py.

Run alone: `python -m tasks.export --spec FILE` (tasks/runner.py; prints verification.md),
`python -m tasks.export --fetch-converter` (what `make setup` runs), `--quantize SRC DST TYPE`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.export import fidelity
from tasks.export.convert import (
    _quantize_here,
    convert_hf,
    convert_lora,
    fetch_converter,
    llama_cpp_version,
    quantize,
    with_template,
)
from tasks.export.modelfile import modelfile
from tasks.export.verify import (
    ExportError,
    check_rows,
    choose_served,
    dev_samples,
    hf_reference,
    table_md,
    verify_gguf,
)
from tasks.formatting import training_chat_template
from tasks.store import Ref, Store, make_key, write_json_atomic

# llama-cpp-python pins the converter, its gguf-py and the quantizer (all from its sdist);
# the converter reads the weights with torch, numpy and safetensors; verification runs HF
LIBRARIES = ("llama-cpp-python", "torch", "numpy", "safetensors", "transformers")
log = logging.getLogger("llmft.export")
# the config sections run() and key() read: what a stage spec carries (tasks/spec.py)
SECTIONS = ("export", "train")


# --- the stage ----------------------------------------------------------------------------


def key(cfg: Config, merged: Ref, train: Ref, data: Ref) -> str:
    from tasks.versions import version

    section = cfg.export.model_dump(mode="json")
    section.pop("fail_stage")  # a retry with the switch off must find the same key
    section["template"] = cfg.train.template
    inputs = {"merged": merged.key, "train": train.key, "data": data.key}
    return make_key("export", version("tasks.export", LIBRARIES), section, inputs)


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


def _base_model_dir(model_dir: Path) -> str | None:
    """The base model's folder, as the merge stage recorded it beside the merged model."""
    manifest = model_dir.parent / "manifest.json"
    return json.loads(manifest.read_text()).get("base_model_dir") if manifest.is_file() else None


def gguf_name(merged: Ref) -> str | None:
    """The GGUF's general.name: the base model's own name, as converting its folder would
    give (a hub id's last part, a folder's name, the bundled file's stem), never the
    store's `model`: llama.cpp gives some families' tokens their attributes by this name
    (Phi-3's special tokens strip the whitespace after them). None when unknown."""
    from tasks.base import BUNDLED

    base_dir = _base_model_dir(merged.dir / "model")
    manifest = Path(base_dir).parent / "manifest.json" if base_dir else None
    if manifest is None or not manifest.is_file():
        return None
    source = json.loads(manifest.read_text()).get("source") or ""
    if source in BUNDLED:
        return Path(BUNDLED[source][1]).name.split(".")[0]
    return Path(source.rstrip("/")).name or None


def export_into(
    tmp: Path,
    cfg: Config,
    model_dir: Path,
    data_dir: Path,
    adapter: Path | None = None,
    base_dir: Path | None = None,
    name: str | None = None,
) -> str:
    """Convert, quantize, check fidelity, verify, choose; the files go in tmp. The served name."""
    from transformers import AutoTokenizer

    ex = cfg.export
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the fine-tuned model's own
    chat_template = training_chat_template(tokenizer, cfg.train.template)
    base_model = Path(base) if (base := _base_model_dir(model_dir)) else None
    files, lora = convert_all(
        tmp, ex, model_dir, chat_template, adapter, base_dir, name, base_model
    )

    # fidelity first: it is cheap (vocabulary-only loads) and numbers on prompts the GGUF
    # would never see as trained mean nothing
    records = json.loads((data_dir / "dev.json").read_text())[: ex.verify_prompts]
    checked = files + ([("base", lora[0])] if lora else [])
    fid = {t: fidelity.check_gguf(p, tokenizer, cfg.train.template, records) for t, p in checked}
    for kind, report in fid.items():
        for difference in report["probe_differences"]:
            log.warning("%s: a probe text tokenizes differently: %s", kind, difference)
    samples = dev_samples(tokenizer, records, cfg.train.template)
    if not samples:
        raise ExportError(f"{data_dir / 'dev.json'}: no dev record to verify the GGUFs on")
    hf = hf_reference(model_dir, samples)
    rows = [verify_gguf(p, samples, hf, ex.speed_tokens) | {"type": t} for t, p in files]
    if lora:
        row = verify_gguf(lora[0], samples, hf, ex.speed_tokens, lora_path=lora[1])
        rows.append(row | {"type": "adapter"})
    check_rows(rows, ex.max_ppl_ratio, ex.min_agreement_pct)
    served, reason, rejected = choose_served(rows, ex.ppl_tolerance, ex.min_agreement_pct)
    log.info("served GGUF: %s (%s)", served, reason)
    for r in rows:
        r["served"] = r["file"] == served
        if r["file"] in rejected:
            r["rejected"] = rejected[r["file"]]

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template
        )

    ref_report = fid[ex.outtype]
    text, no_template = modelfile(
        served, render, ref_report["stop_tokens"], tokenizer.bos_token or "", ref_report["adds_bos"]
    )
    (tmp / "Modelfile").write_text(text)
    hf_row = {k: v for k, v in hf.items() if k != "argmax"} | {"ppl": round(hf["ppl"], 4)}
    verification = {"hf": hf_row, "rows": rows, "prompts": len(samples), "served": served}
    verification |= {"reason": reason, "rejected": rejected, "fidelity": fid}
    write_json_atomic(tmp / "verification.json", verification)
    (tmp / "verification.md").write_text(table_md(hf, rows, served, reason, ref_report))
    result = {
        "served": served,
        "reason": reason,
        "rejected": rejected,
        "files": {t: p.name for t, p in files},
        "lora_adapter": lora[1].name if lora else None,
        "lora_base": lora[0].name if lora else None,
        "modelfile": "Modelfile",
        "modelfile_template": no_template or "written",
    }
    write_json_atomic(tmp / "result.json", result)
    return served


def convert_all(
    tmp: Path,
    ex: Any,
    model_dir: Path,
    chat_template: str,
    adapter: Path | None,
    base_dir: Path | None,
    name: str | None,
    base_model: Path | None = None,
) -> tuple[list[tuple[str, Path]], tuple[Path, Path] | None]:
    """([(type, model GGUF)], (base GGUF, adapter GGUF) or None), all with the template.
    `base_model`: the base's folder, for what the fine-tune's folder may lack."""
    logs = tmp / "logs"
    f16 = tmp / f"model-{ex.outtype}.gguf"
    source = with_template(model_dir, chat_template, tmp / "source", base_model)
    convert_hf(source, f16, ex.outtype, logs, name)
    files = [(ex.outtype, f16)]
    for qtype in ex.quantize:
        quantize(f16, tmp / f"model-{qtype}.gguf", qtype, logs)
        files.append((qtype, tmp / f"model-{qtype}.gguf"))
    lora = None
    if adapter and base_dir:
        lora = (tmp / f"base-{ex.outtype}.gguf", tmp / f"adapter-{ex.outtype}.gguf")
        base_source = with_template(base_dir, chat_template, tmp / "base-source")
        convert_hf(base_source, lora[0], ex.outtype, logs, name)
        convert_lora(adapter, model_dir, lora[1], ex.outtype, logs)
    for source in ("source", "base-source"):  # links into the store, for the converter only
        shutil.rmtree(tmp / source, ignore_errors=True)
    return files, lora


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
        name = gguf_name(merged)
        served = export_into(tmp, cfg, model_dir, data.dir, adapter, base_dir, name)
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


def main(argv: list[str] | None = None) -> int:
    from tasks import runner

    parser = runner.spec_parser("export", __doc__)
    parser.add_argument(
        "--fetch-converter", action="store_true", help="fetch llama.cpp's converter and exit"
    )
    parser.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"))
    args = parser.parse_args(argv)
    if args.fetch_converter:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(fetch_converter())
        return 0
    if args.quantize:
        _quantize_here(*args.quantize)
        return 0
    show = lambda ref: (ref.dir / "verification.md").read_text()  # noqa: E731
    return runner.stage_main("export", args.spec, args.out, show=show)
