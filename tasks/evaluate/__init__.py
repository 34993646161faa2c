"""Evaluate stage: the base and the tuned model side by side on the same records.

    artifacts/evaluate/<key>/metrics.json       {"base": {...}, "tuned": {...}}: dev/test loss,
                                                perplexity, BLEU-4, ROUGE-1/2/L, exact match;
                                                "sft": {...} too with train.then; held-out
                                                pair metrics in each, and "pairs", when the
                                                test split holds preference pairs
    artifacts/evaluate/<key>/predictions.jsonl  prompt, reference, base answer, tuned answer
    artifacts/evaluate/<key>/table.md           the metrics as a markdown table

Loss is teacher-forced on the answer tokens only (the prompt is masked, as in training),
averaged over tokens; perplexity = exp(loss). Answers are generated greedily in batches
with left padding for the first `evaluate.num_samples` test records. BLEU-4 (sacrebleu)
and ROUGE (rouge-score) run on our own segmentation: Chinese, Japanese and Korean runs
are cut into jieba words or characters, other text into words and punctuation, because
both libraries' default tokenizers drop or glue CJK text. Scores are 0-100.

Adapters (LoRA, QLoRA, P-Tuning v2) are applied with peft on the full-precision model the
training started from; that model's scores come from the same weights with the adapter
disabled (tasks/evaluate/models.py). With `train.then` the training started from the SFT
model (`start`, the merge-sft stage's folder): evaluate scores base, SFT and tuned.
Preference pairs in the test split: each model's ranking accuracy and log-prob margin,
and a DPO-trained model's DPO rewards against the model it started from
(tasks/evaluate/pairs.py, with the training stage's own log-prob code). Runs on CPU or CUDA.

Run alone: `python -m tasks.evaluate --spec FILE` (tasks/runner.py); prints table.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.formatting import IGNORE, encode, prompt_ids, stop_token_ids, user_text
from tasks.store import Ref, Store, make_key, write_json_atomic

# the models (torch, transformers, peft) and the metrics (sacrebleu, rouge-score, jieba)
LIBRARIES = ("torch", "transformers", "peft", "sacrebleu", "rouge-score", "jieba")
CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
WORD_OR_MARK = re.compile(r"[^\W_]+|[^\w\s]|_")
MAIN_METRIC = "rougeL"  # what promotion's floor compares, base vs tuned (tasks/promote)
log = logging.getLogger("llmft.evaluate")
# the config sections run() and key() read: what a stage spec carries (tasks/spec.py)
SECTIONS = ("evaluate", "train", "base", "data")


# --- metrics ------------------------------------------------------------------------------


def segment(text: str, zh: str = "jieba") -> list[str]:
    """Tokens for BLEU/ROUGE: jieba words (or characters) for CJK runs, words elsewhere."""
    tokens: list[str] = []
    pos = 0
    for m in CJK_RUN.finditer(text):
        tokens += WORD_OR_MARK.findall(text[pos : m.start()])
        tokens += _cut_cjk(m.group(), zh)
        pos = m.end()
    return tokens + WORD_OR_MARK.findall(text[pos:])


def _cut_cjk(run: str, zh: str) -> list[str]:
    if zh == "char":
        return list(run)
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(run) if w.strip()]


class _Tokenizer:
    """rouge-score's tokenizer interface; its default keeps only [a-z0-9] and loses Chinese."""

    def __init__(self, zh: str) -> None:
        self.zh = zh

    def tokenize(self, text: str) -> list[str]:
        return [t.lower() for t in segment(text, self.zh)]


def text_metrics(predictions: list[str], references: list[str], zh: str = "jieba") -> dict:
    """Corpus BLEU-4, mean ROUGE-1/2/L F1 and exact match (%), all 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions:
        return {"bleu4": None, "rouge1": None, "rouge2": None, "rougeL": None, "exact_match": None}
    hyps = [" ".join(segment(p, zh)) for p in predictions]
    refs = [" ".join(segment(r, zh)) for r in references]
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer(zh))
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references, strict=True):
        for name, score in scorer.score(r, p).items():
            rouge[name] += score.fmeasure
    exact = sum(_norm(p) == _norm(r) for p, r in zip(predictions, references, strict=True))
    n = len(predictions)
    return {
        "bleu4": round(bleu, 2),
        **{k: round(100 * v / n, 2) for k, v in rouge.items()},
        "exact_match": round(100 * exact / n, 2),
    }


def _norm(text: str) -> str:
    return " ".join(text.split())


# --- models -------------------------------------------------------------------------------


def answer_loss(model: Any, tokenizer: Any, records: list[dict], cfg: Config) -> float:
    """Token-weighted mean cross-entropy of the answers given their prompts.

    Records are encoded exactly as training encodes them (`formatting.encode`, same
    template and cutoff_len, prompt tokens masked), so the dev loss here is the trainer's.
    """
    import torch

    device = next(model.parameters()).device
    encoded = [encode(tokenizer, r, cfg.train.template, cfg.train.cutoff_len) for r in records]
    encoded = [e for e in encoded if e is not None]  # a prompt alone past cutoff_len
    total, count, batch = 0.0, 0, cfg.evaluate.batch_size
    for i in range(0, len(encoded), batch):
        rows = encoded[i : i + batch]
        width = max(len(e.input_ids) for e in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(rows):  # right padding: positions stay 0..n-1
            ids[j, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[j, : len(e.labels)] = torch.tensor(e.labels)
            mask[j, : len(e.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += int((shifted != IGNORE).sum())
    return total / max(count, 1)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new: int,
    batch: int,
    template: str = "auto",
):
    """Greedy answers, batched with left padding so every row ends where generation starts.

    Generation stops on the tokens that end a trained answer under `template` (Llama 3
    <|eot_id|>, ChatML <|im_end|>, Phi-3 <|end|>, alpaca EOS), as the served GGUF does.
    """
    import torch

    device = next(model.parameters()).device
    stop = stop_token_ids(tokenizer, template)
    answers = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i : i + batch]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, width - len(row) :] = torch.tensor(row)
            mask[j, width - len(row) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, width:]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def score_model(model, tokenizer, cfg: Config, dev, test, prompts, references) -> dict:
    import torch

    ev = cfg.evaluate
    with torch.inference_mode():
        dev_loss = answer_loss(model, tokenizer, dev, cfg) if dev else None
        test_loss = answer_loss(model, tokenizer, test, cfg) if test else None
        started = time.perf_counter()
        answers = generate(
            model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size, cfg.train.template
        )
    metrics = {
        "dev_loss": _round(dev_loss),
        "dev_ppl": _round(math.exp(dev_loss) if dev_loss is not None else None),
        "test_loss": _round(test_loss),
        "test_ppl": _round(math.exp(test_loss) if test_loss is not None else None),
        **text_metrics(answers, references, ev.zh_segmentation),
        "generation_seconds": round(time.perf_counter() - started, 2),
    }
    return {"metrics": metrics, "answers": answers}


def _on_cpu(model: Any) -> bool:
    return next(model.parameters()).device.type == "cpu"


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (None: unchanged), then restored."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def table_md(
    base: dict | None, tuned: dict, samples: int, sft: dict | None = None, pairs: dict | None = None
) -> str:
    """The metrics as a markdown table: base, (SFT,) tuned, and the change."""
    rows = [
        ("dev loss", "dev_loss"),
        ("dev perplexity", "dev_ppl"),
        ("test loss", "test_loss"),
        ("test perplexity", "test_ppl"),
        (f"BLEU-4 ({samples} test answers)", "bleu4"),
        ("ROUGE-1 F1", "rouge1"),
        ("ROUGE-2 F1", "rouge2"),
        ("ROUGE-L F1", "rougeL"),
        ("exact match %", "exact_match"),
    ]
    from tasks.evaluate import identity
    from tasks.evaluate import pairs as held_out

    rows += identity.table_rows(tuned)  # self-cognition data: how often the name comes out
    rows += held_out.table_rows(pairs, tuned)  # preference pairs in the test split
    fmt = lambda v: "–" if v is None else f"{v:g}"  # noqa: E731
    delta = lambda a, b: f"{b - a:+.4g}" if a is not None and b is not None else "–"  # noqa: E731
    if sft is None:
        lines = ["| metric | base | tuned | Δ |", "| --- | ---: | ---: | ---: |"]
    else:
        lines = [
            "| metric | base | sft | tuned | Δ vs base | Δ vs sft |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
    for label, k in rows:
        b, t = (base or {}).get(k), tuned.get(k)
        if sft is None:
            lines.append(f"| {label} | {fmt(b)} | {fmt(t)} | {delta(b, t)} |")
        else:
            s = sft.get(k)
            lines.append(
                f"| {label} | {fmt(b)} | {fmt(s)} | {fmt(t)} | {delta(b, t)} | {delta(s, t)} |"
            )
    return "\n".join(lines) + "\n"


# --- the stage ----------------------------------------------------------------------------


def key(cfg: Config, data: Ref, base: Ref, train: Ref, start: Ref | None = None) -> str:
    from tasks.versions import version

    # every evaluate setting enters: even device and cpu_threads change the sums' order,
    # so the last digits of the losses and, at a near tie, a greedy token
    section = cfg.evaluate.model_dump(mode="json")
    section["template"] = cfg.train.template
    section["cutoff_len"] = cfg.train.cutoff_len
    return make_key("evaluate", version("tasks.evaluate", LIBRARIES), section,
                    _inputs(data, base, train, start))  # fmt: skip


def _inputs(data: Ref, base: Ref, train: Ref, start: Ref | None) -> dict[str, str]:
    inputs = {"data": data.key, "base": base.key, "train": train.key}
    return inputs | ({"start": start.key} if start is not None else {})


def trained_objective(cfg: Config, train: Ref) -> tuple[str, float]:
    """(objective, its β) of the final training, as its hyperparameters.yaml says."""
    import yaml

    from tasks.config import PreferenceConfig

    hp = train.dir / "hyperparameters.yaml"
    section = (yaml.safe_load(hp.read_text()) or {}).get("train", {}) if hp.is_file() else {}
    section = section or cfg.train.model_dump(mode="json")
    objective = section.get("objective", "sft")
    beta = PreferenceConfig.model_validate(section.get("preference") or {}).strength(objective)
    return objective, beta


def run(
    cfg: Config, store: Store, data: Ref, base: Ref, train: Ref, start: Ref | None = None
) -> Ref:
    """Score tuned, the model it started from (the base, or the SFT model of a chain: `start`)
    and, in a chain, the base too; each on the same dev/test records and test pairs."""
    from tasks.evaluate import identity
    from tasks.evaluate import pairs as held_out
    from tasks.evaluate.models import Models

    ev = cfg.evaluate
    objective, beta = trained_objective(cfg, train)

    def work(tmp: Path) -> dict:
        dev = json.loads((data.dir / "dev.json").read_text())[: ev.max_loss_records]
        test = json.loads((data.dir / "test.json").read_text())
        samples = test[: ev.num_samples]
        probes = identity.records(test, cfg.data.placeholders, ev.identity_prompts)
        test = test[: ev.max_loss_records]
        models = Models(cfg, base, train, start)
        tokenizer, t = models.tokenizer, cfg.train
        prompts = [prompt_ids(tokenizer, r, t.template) for r in samples]
        refs = [r.get("output") or "" for r in samples]
        pairs = held_out.load(tokenizer, test, t.template, t.cutoff_len, ev.batch_size)
        dpo = pairs is not None and objective == "dpo"  # DPO's rewards need its reference

        def score(model: Any) -> dict:
            scored = score_model(model, tokenizer, cfg, dev, test, prompts, refs)
            identity.add(scored, model, tokenizer, cfg, probes)
            if pairs is not None:
                scored["metrics"] |= pairs.score(model)
            return scored

        chained = start is not None
        with cpu_threads(ev.cpu_threads if _on_cpu(models.tuned) else None):
            result = {"tuned": score(models.tuned)}
            if chained or ev.compare_base or dpo:
                with models.starting() as model:
                    if chained or ev.compare_base:
                        result[models.starting_name] = score(model)
                    reference = pairs.logps(model) if dpo else None
            if dpo:
                result["tuned"]["metrics"] |= pairs.dpo(models.tuned, reference, beta)
            if chained and ev.compare_base:
                with models.base() as model:
                    result["base"] = score(model)
        scored = {name: r["metrics"] for name, r in result.items()}
        metrics = {"base": scored.get("base"), "tuned": scored["tuned"]}
        metrics |= {"sft": scored["sft"]} if chained else {}
        if pairs is not None:
            metrics["pairs"] = {
                "split": "test",
                "pairs": pairs.count,
                "basis": pairs.basis,
                "objective": objective,
                "reference": models.starting_name if dpo else None,
                "beta": beta if dpo else None,
            }
        metrics |= {"samples": len(samples), "dev_records": len(dev), "test_records": len(test)}
        write_json_atomic(tmp / "metrics.json", metrics)
        shown = ("base", "sft", "tuned") if chained else ("base", "tuned")
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for i, record in enumerate(samples):
                row = {"prompt": user_text(record), "reference": refs[i]}
                row |= {n: result[n]["answers"][i] if n in result else None for n in shown}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        identity.write(tmp, probes, result, cfg.data.placeholders)
        table = table_md(metrics["base"], metrics["tuned"], len(samples), metrics.get("sft"),
                         metrics.get("pairs"))  # fmt: skip
        (tmp / "table.md").write_text(table)
        return {name: metrics.get(name) for name in ("tuned", "base", "sft", "pairs")}

    inputs = _inputs(data, base, train, start)
    k = key(cfg, data, base, train, start)
    return store.build("evaluate", k, work, inputs=inputs, config=ev.model_dump(mode="json"))


def main(argv: list[str] | None = None) -> int:
    from tasks import runner

    args = runner.spec_parser("evaluate", __doc__).parse_args(argv)
    return runner.stage_main(
        "evaluate", args.spec, args.out, show=lambda ref: (ref.dir / "table.md").read_text()
    )
