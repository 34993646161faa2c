"""The stage spec: what a heavy stage is given when it runs as its own process.

    {"stage": "evaluate",
     "config": {"evaluate": {…}, "train": {…}, "base": {…}},   the sections it reads
     "inputs": {"data": {"stage", "key", "path"}, "base": {…}, "train": {…}},
     "store": "/abs/artifacts",
     "deadline_seconds": 43200}

A stage declares the config sections it reads in its package (`SECTIONS`); the spec carries
those and no others, and the stage gets them as a `StageSections` that reads like the
whole Config but refuses a section it did not declare. The inputs are store references
made by earlier stages, never recomputed by this one. tasks/runner.py writes, runs and
reads specs; `llmft run` keeps each heavy stage's in `<store>/runs/<run id>/specs/`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from pydantic import Field, ValidationError, create_model

from tasks.config import Config, ConfigError, Section, UserError, validation_problems
from tasks.store import Ref, Store


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(f"tasks.{stage}")


def stage_key(stage: str, cfg: Any, **inputs: Any) -> str:
    return stage_module(stage).key(cfg, **inputs)


class StageSections(Section):
    """The config sections one stage reads, and only those: what its spec carries.

    It reads like a Config (`cfg.train.cutoff_len`, `cfg.model_copy(...)`); a section the
    stage did not declare is an error naming the fix, never a silent default.
    """

    stage: ClassVar[str] = ""

    def __getattr__(self, name: str) -> Any:
        if name in Config.model_fields:
            raise AttributeError(
                f"the {self.stage} stage read config section {name!r}, which its spec does "
                f"not carry (it carries {', '.join(type(self).model_fields)}); fix: add "
                f"{name!r} to SECTIONS in tasks/{self.stage}/__init__.py"
            )
        return super().__getattr__(name)


def sections_model(stage: str) -> type[StageSections]:
    """The model of `stage`'s config sections, e.g. EvaluateSections(evaluate, train, base)."""
    fields: dict[str, Any] = {
        name: (Config.model_fields[name].annotation, Field(...))
        for name in stage_module(stage).SECTIONS
    }
    model = create_model(f"{stage.title()}Sections", __base__=StageSections, **fields)
    model.stage = stage
    return model


def sections(stage: str, cfg: Config) -> StageSections:
    """What of `cfg` the stage reads."""
    model = sections_model(stage)
    return model.model_validate({name: getattr(cfg, name) for name in model.model_fields})


def make_spec(stage: str, cfg: Config, **inputs: Ref | None) -> dict[str, Any]:
    return {
        "stage": stage,
        "config": sections(stage, cfg).model_dump(mode="json"),
        "inputs": {name: ref.to_dict() if ref else None for name, ref in inputs.items()},
        "store": str(Store(cfg.pipeline.store).root),
        "deadline_seconds": cfg.pipeline.stage_timeout_minutes * 60,
    }


def read_spec(path: str | Path, stage: str) -> tuple[StageSections, dict[str, Any]]:
    """(the stage's config sections, the whole spec) from a spec file, checked."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the stage spec ({exc})") from exc
    missing = [k for k in ("stage", "config", "inputs", "store") if k not in spec]
    if missing or spec["stage"] != stage:
        raise UserError(
            f"{path}: not a spec of the {stage} stage (stage {spec.get('stage')!r}, "
            f"missing {missing}); fix: python -m tasks.{spec.get('stage', stage)} --spec {path}"
        )
    try:
        cfg = sections_model(stage).model_validate(spec["config"])
    except ValidationError as exc:
        lines = "\n".join(f"  - {p}" for p in validation_problems(exc))
        raise ConfigError(f"{path}: the spec's config:\n{lines}") from exc
    return cfg, spec
