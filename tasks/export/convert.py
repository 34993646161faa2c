"""llama.cpp's own converter and quantizer, from the sdist of the installed llama-cpp-python.

The converter is `convert_hf_to_gguf.py` (and `convert_lora_to_gguf.py`) from that sdist, so
the GGUF matches the llama.cpp that serves it; `fetch_converter` (what `make setup` runs
through `python -m tasks.export --fetch-converter`) downloads the sdist once through pip
and extracts the scripts with their `gguf-py`, which goes first on the converter's
PYTHONPATH. Quantization runs `llama_model_quantize` in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version as package_version
from pathlib import Path

from filelock import FileLock

from tasks.config import REPO_ROOT
from tasks.export.verify import ExportError

CONVERTER_ROOT = REPO_ROOT / ".cache" / "llama-cpp"
# models/: llama.cpp's vocabulary-only GGUFs with their tokenizer cases and real chat
# templates, from which the family tests build their tiny models (tests/families.py)
CONVERTER_FILES = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "models/",
)
log = logging.getLogger("llmft.export")


def llama_cpp_version() -> str:
    return package_version("llama-cpp-python")


def fetch_converter() -> Path:
    """`.cache/llama-cpp/llama.cpp-<version>/` with the converter scripts and gguf-py.

    Idempotent: returns at once when present. The sdist (about 77 MB) is fetched once with
    `pip download`, whose HTTP cache makes later fetches work offline. The `.complete`
    marker names what was extracted, so a tree from an older list is extracted again.
    """
    ver = llama_cpp_version()
    dest = CONVERTER_ROOT / f"llama.cpp-{ver}"
    marker = f"{ver}\n{' '.join(CONVERTER_FILES)}\n"
    if _read(dest / ".complete") == marker:
        return dest
    CONVERTER_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CONVERTER_ROOT / ".lock")):
        if _read(dest / ".complete") == marker:
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
        (tmp / ".complete").write_text(marker)
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


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


def convert_hf(
    model_dir: Path, out: Path, outtype: str, logs: Path, name: str | None = None
) -> None:
    """`name` becomes general.name, which llama.cpp reads to give some families' tokens
    their attributes (Phi-3's special tokens strip the whitespace after them)."""
    conv = fetch_converter()
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir)]
    cmd += ["--outfile", str(out), "--outtype", outtype]
    cmd += ["--model-name", name] if name else []
    _run_logged(cmd, logs / f"convert-{out.stem}.log", _converter_env(conv))


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str, logs: Path) -> None:
    conv = fetch_converter()
    cmd = [sys.executable, str(conv / "convert_lora_to_gguf.py"), str(adapter_dir)]
    cmd += ["--base", str(base_dir), "--outfile", str(out), "--outtype", outtype]
    _run_logged(cmd, logs / f"convert-{out.stem}.log", _converter_env(conv))


TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def with_template(
    model_dir: Path, chat_template: str, out: Path, base_dir: Path | None = None
) -> Path:
    """`out/`: model_dir's files linked, with the training template as its chat template.

    The converter stores the template it finds (tokenizer_config.json's `chat_template`
    first, then chat_template.jinja) in the GGUF, and llama.cpp renders every chat with it;
    so it must be the one training rendered with, also when that is the alpaca fallback
    or the model folder carries another. The other files stay byte for byte. A
    SentencePiece `tokenizer.model`, which the converter reads for some families (Phi-3)
    and transformers 5 does not write back when a fine-tune saves its tokenizer, comes
    from the base model's folder: training does not change it.
    """
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name not in TEMPLATE_FILES:
            (out / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    spm = base_dir / "tokenizer.model" if base_dir else None
    if spm and spm.is_file() and not (out / "tokenizer.model").exists():
        (out / "tokenizer.model").symlink_to(spm.resolve())
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(chat_template)
    return out


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
