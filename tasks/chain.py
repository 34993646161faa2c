"""The training chain: `train.then`, a second training stage after the first, in one run.

    train:                      the first stage: SFT on the answers (the chosen ones of pairs)
      objective: sft
      then: {objective: dpo, learning_rate: 5.0e-5, num_epochs: 2}
                                the second stage: these train settings changed, the rest kept

The pipeline runs them as two training stages (flows/pipeline.py): `train`, then `merge-sft`
(the merge stage folds the first stage's LoRA adapter into the base; full training's
weights are used as they are), then `train-preference`, which trains a fresh adapter (or
all weights) on that model, so DPO's reference is the SFT model. Each stage gets its own
train section, never `then` itself: the first stage's key cannot move when only `then`
changes, and the second's key holds the first's result through its starting model's key.

Shared by the config (validation), the pipeline (wiring) and the train stage's docs; the
config section itself is tasks/train_sections.py's `TrainConfig.then`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ValidationError, ValidationInfo

from tasks.sections import Invalid

if TYPE_CHECKING:
    from tasks.config import Config, TrainConfig

PREFERENCE = ("dpo", "orpo", "simpo")
FIX = "as each problem says; a chain is shown in docs/preference.md"


def _merge(section: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The train section with `changes` applied; a nested setting (preference, lora, budget,
    ...) changes key by key, as `--set` does."""
    out = dict(section)
    for k, v in changes.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def problems(first: dict[str, Any], then: dict[str, Any]) -> list[str]:
    """What is wrong with `then` given the first stage's settings (a validated train section
    as a dict, `then` excluded); each problem names its key and the fix."""
    from tasks.config import TrainConfig

    if not isinstance(then, dict):
        return [f"a mapping of train settings is needed, got {then!r} (fix: {FIX})"]
    unknown = sorted(set(then) - set(TrainConfig.model_fields) | ({"then"} & set(then)))
    found = [
        f"train.then.{k}: not a train setting the second stage can change "
        f"(fix: remove it; `llmft config --keys` lists the train keys)"
        for k in unknown
    ]
    try:
        second = TrainConfig.model_validate(
            _merge(first, {k: v for k, v in then.items() if k not in unknown})
        )
    except ValidationError as exc:
        for e in exc.errors():
            key = "train.then." + ".".join(str(p) for p in e["loc"])
            found.append(
                f"{key}: got {e.get('input')!r}: {e['msg'].removeprefix('Value error, ')} "
                f"(fix: --set {key}=<valid value>)"
            )
        return found
    if first.get("objective") != "sft":
        found.append(
            f"train.objective is {first.get('objective')!r}: a chain is SFT, then preference "
            "tuning on the SFT model (fix: --set train.objective=sft, or --set train.then=null)"
        )
    if second.objective not in PREFERENCE:
        found.append(
            f"train.then.objective: the second stage's objective is {second.objective!r}, not "
            f"one of {', '.join(PREFERENCE)} (fix: --set train.then.objective=dpo)"
        )
    for label, method in (
        ("train.method", first.get("method")),
        ("train.then.method", second.method),
    ):
        if method == "ptuning":
            found.append(
                f"{label} is ptuning: a P-Tuning v2 prefix cannot be merged into weights for "
                "the next stage to start from (fix: lora, qlora or full)"
            )
    return found


def _checked(then: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    """`train.then` checked against the settings before it in the section (every problem at
    once, each naming its key and fix)."""
    if then is None:
        return None
    first = {
        k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
        for k, v in info.data.items()
    }
    if found := problems(first, then):
        raise Invalid("; ".join(found), FIX)
    return then


# the type of TrainConfig.then: a mapping of train settings, checked as a second stage
ThenSettings = Annotated[dict[str, Any] | None, AfterValidator(_checked)]


def second_train(t: TrainConfig) -> TrainConfig | None:
    """The second stage's train section (`then` applied, no `then` of its own), or None."""
    if t.then is None:
        return None
    first = t.model_dump(mode="json", exclude={"then"})
    return type(t).model_validate(_merge(first, t.then))


def stages(cfg: Config) -> tuple[Config, Config | None]:
    """(the first stage's config, the second's or None): each with its own train section
    and no `then`, so each stage's key and spec hold what that stage trains."""
    second = second_train(cfg.train)
    first = cfg.model_copy(update={"train": cfg.train.model_copy(update={"then": None})})
    if second is None:
        return cfg, None
    return first, cfg.model_copy(update={"train": second})


def final_objective(train: dict[str, Any]) -> str:
    """The objective of the model a run ends with, from a train section as JSON."""
    return (train.get("then") or {}).get("objective") or train.get("objective") or "sft"
