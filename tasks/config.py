"""Typed configuration: one pydantic model per stage section, loaded from YAML.

Every field has a description (it is the documentation `llmft run --help-config` prints)
and unknown keys are errors. `load_config` collects every problem in one `ConfigError`
that names each key, the value received and the fix, before anything heavy starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from tasks.sections import (  # noqa: F401 - re-exported: the stages import them from here
    QUANT_TYPES,
    BaseModelConfig,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    Invalid,
    PipelineConfig,
    Section,
    ServeConfig,
    UserError,
)
from tasks.train_sections import (  # noqa: F401 - re-exported: the stages import them from here
    ACCELERATE_DIR,
    BudgetConfig,
    LoraConfig,
    PreferenceConfig,
    PtuningConfig,
    QuantConfig,
    TrainConfig,
    accelerate_config_path,
    accelerate_launch,
    train_problems,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Data stage.")
    base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training stage.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="GGUF export.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="CPU serving.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Pipeline.")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lora.r=16", "data.placeholders.name=Lexi"]` → nested dict (values as YAML)."""
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {pair!r}: expected section.key=value, e.g. train.lora.r=16")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {pair!r}: {part} is both a value and a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict) and k != "placeholders":
            merged[k] = _merge(merged[k], v)
        elif isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


def validation_problems(err: ValidationError) -> list[str]:
    """One line per pydantic error: the key, the value received, the fix."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            fix = "remove it or check the spelling (`llmft config --keys` lists every key)"
            lines.append(f"{key}: unknown key (value {value!r}); fix: {fix}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        error = (e.get("ctx") or {}).get("error")
        if isinstance(error, Invalid):
            fix = error.fix
        elif isinstance(value, dict) or e["type"] == "model_type":  # a section: set its keys
            fix = f"--set {key}.<key>=<value> (`llmft config --keys` lists the keys of {key})"
        else:
            fix = f"--set {key}=<valid value>"
        shown = "{…}" if isinstance(value, dict) else repr(value)
        lines.append(f"{key}: got {shown}: {msg}; fix: {fix}")
    return lines


def _section_or_none(model: type[Section], raw: Any) -> Any:
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError:  # its problems are already in the list
        return None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    for_training: bool = False,
) -> Config:
    """Read YAML (default: configs/default.yaml), apply `--set` overrides, validate once.

    Every problem goes into one ConfigError: each key's own checks (pydantic) and, with
    `for_training` (the verbs that train or preview it: `llmft run`, `llmft config`),
    the train settings that contradict each other and, when the
    run would train here, what this machine lacks to train the config (tasks/machine.py).
    Other verbs skip
    those: `llmft plan` reads accelerate_config for the ZeRO stage whatever the launcher,
    and a CPU host may serve what a GPU recipe trained. The train stage checks all of it
    again on the machine that trains, with what needs the model's files
    (tasks/train/__init__.py `validate`).
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (fix: --config configs/default.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw)}")
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg, problems = None, []
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
    # the train section may be valid on its own when another section is not
    train = cfg.train if cfg else _section_or_none(TrainConfig, raw.get("train"))
    if for_training and train is not None:
        problems += train_problems(train)
        pipeline = cfg.pipeline if cfg else _section_or_none(PipelineConfig, raw.get("pipeline"))
        if pipeline is not None:
            from tasks.machine import training_problems  # probes this machine, when it trains

            problems += training_problems(train, pipeline.train_on)
    if problems:
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the configuration:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return cfg


def resolve(
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dataset: str | None = None,
) -> Config:
    """A pipeline run's config: a resolved dict (what `llmft run` sends), or a YAML recipe
    plus `--set` overrides (what deployments send); `dataset` sets data.input."""
    if config is not None:
        if config_path or overrides:
            raise ConfigError("give the pipeline either config or config_path/overrides")
        try:
            cfg = Config.model_validate(config)
        except ValidationError as exc:
            raise ConfigError("\n".join(validation_problems(exc))) from exc
    else:
        cfg = load_config(config_path, overrides)
    if dataset:
        cfg.data.input = dataset
    return cfg


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per key: `train.lora.r (int, default 8): LoRA rank.`"""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{key} (default {default!r}): {field.description}")
    return lines
