"""A stage's version, derived from what computes its output; never typed by hand.

Shared by every stage's `key()` (tasks/store.py's `make_key` takes the result):

- code: the sha256 of every file of the stage's package and of every project module
  that code imports, followed statically (`import tasks...`, `from tasks... import ...`,
  relative imports, function-local ones too), each named by its path relative to the
  project root and sorted, so one tree gives one version on any machine and in any
  process;
- libraries: the installed versions of the libraries that shape the stage's output
  (each stage names its own);
- files a stage reads besides its inputs (the accelerate and DeepSpeed files a training
  launch reads) enter its key by contents through `file_hashes`, never by name.

So editing a stage's code gives it a new key, and every stage after it a new key through
its inputs; a stage before it, which does not import that code, keeps its key.

    python -m tasks.versions tasks.train     # the files and libraries behind that version
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tasks.store import hash_file

# The tree whose packages (folders with an __init__.py: tasks/, flows/) count as the
# project's own code. Tests point it at an edited copy of the tree.
ROOT = Path(__file__).resolve().parent.parent
_imports_memo: dict[tuple[str, int, int], tuple[str, ...]] = {}


def version(module: str, libraries: Iterable[str] = ()) -> str:
    """The version of `module`'s code (a package: every file in it) and of `libraries`."""
    blob = json.dumps(
        {"code": code_hashes(module), "libraries": library_versions(libraries)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_hashes(module: str, root: Path | None = None) -> dict[str, str]:
    """{path relative to the project root: sha256} of `module`'s code and all it imports."""
    root = (root or ROOT).resolve()
    todo = _own_files(module, root)
    if not todo:
        raise ValueError(f"{module}: no such module or package under {root}")
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.suffix == ".py":
            for name in _imports(path, root):
                todo.extend(_module_files(name, root))
    return {p.relative_to(root).as_posix(): hash_file(p) for p in sorted(seen)}


def library_versions(names: Iterable[str]) -> dict[str, str]:
    return {name: _library_version(name) for name in sorted(set(names))}


@cache
def _library_version(name: str) -> str:
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
    # The local label names the wheel's build (torch 2.5.1+cpu, +cu124), not its code; the
    # device a stage runs on is in its config section. Keeping it would give a CPU host
    # and a GPU worker two keys for one job.
    return found.split("+", 1)[0]


def file_hashes(paths: Iterable[Path | None]) -> list[str | None]:
    """Contents of files a stage reads, in reading order (None: named but missing)."""
    return [hash_file(p) if p is not None and p.is_file() else None for p in paths]


def launch_files(train: Any) -> list[Path]:
    """The files `accelerate launch` reads for this train section: its config file (or
    accelerate's default config on this machine), then the DeepSpeed JSON it names.

    torchrun and a plain python launch read none.
    """
    from tasks.config import REPO_ROOT, accelerate_config_path

    if train.launcher != "accelerate":
        return []
    if train.accelerate_config:
        launch = accelerate_config_path(train.accelerate_config)
    else:
        launch = _accelerate_default_config()
    files = [launch]
    if launch.is_file():
        settings = yaml.safe_load(launch.read_text()) or {}
        named = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if named:
            # relative to where the training stage starts the launcher: the repository root
            files.append(Path(named) if Path(named).is_absolute() else REPO_ROOT / named)
    return files


def _accelerate_default_config() -> Path:
    # where `accelerate config` saves and `accelerate launch` looks without --config_file
    # (accelerate/commands/config/config_args.py), without importing accelerate (and torch)
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    folder = Path(home).expanduser() / "accelerate"
    json_file, yaml_file = folder / "default_config.json", folder / "default_config.yaml"
    return json_file if json_file.is_file() and not yaml_file.is_file() else yaml_file


# --- following imports ---------------------------------------------------------------------


def _is_source(path: Path) -> bool:
    return path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")


def _own_files(module: str, root: Path) -> list[Path]:
    """A package: every file in its folder (templates and pages too); a module: its file."""
    folder = root.joinpath(*module.split("."))
    if (folder / "__init__.py").is_file():
        own = [p for p in folder.rglob("*") if _is_source(p) and p.suffix != ".pyc"]
        return own + _module_files(module, root)
    return _module_files(module, root)


def _module_files(name: str, root: Path) -> list[Path]:
    """The files Python runs to import `name`: each parent package's __init__.py, then it.

    Empty for anything outside the project (libraries, the standard library) and for a
    name that is not a module (`from tasks.config import Config` also names
    tasks.config.Config).
    """
    parts = name.split(".")
    if not (root / parts[0] / "__init__.py").is_file():
        return []
    files = []
    for i in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
        else:
            break
    return files


def _imports(path: Path, root: Path) -> tuple[str, ...]:
    """Every module name `path` imports anywhere in it (memoised on size and mtime)."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _imports_memo:
        _imports_memo[memo] = tuple(_parse_imports(path, root))
    return _imports_memo[memo]


def _parse_imports(path: Path, root: Path) -> list[str]:
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # submodules
    return [n for n in names if n]


def main(argv: list[str] | None = None) -> None:
    modules = (argv if argv is not None else sys.argv[1:]) or ["tasks"]
    for module in modules:
        print(f"{module}: code version {version(module)} (a stage's key adds its libraries)")
        for rel, digest in code_hashes(module).items():
            print(f"  {digest[:12]}  {rel}")


if __name__ == "__main__":
    main()
