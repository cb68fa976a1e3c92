"""Accuracy under token dropping: a grid of (method, budget) over a VQA-style dataset.

Every configuration answers every question with greedy decoding, batched with left padding,
through the stock `generate()` of a model patched by `tokendrop.apply`. Scores: every requested
metric per question, averaged overall and per question type; with the visual tokens that reached
the LLM (and, for in-LLM methods, their average over layers). A control (a family's own setting for
fewer visual tokens, `tokendrop.controls`) runs the stock model with that setting and is marked so in
its record ("control": "max_soft_tokens=70") and the table. Under several processes each answers
its share of the questions and rank 0 scores them all (`tokendrop.evaluation.distributed`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from tokendrop.data.dataset import Sample
from tokendrop.evaluation.distributed import Ranks
from tokendrop.evaluation.metrics import get_metric


@dataclass(frozen=True)
class Config:
    """One cell of the grid: a method (or control) name as `tokendrop.registry` knows it, and its budget."""

    method: str
    budget: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget:g}"


def grid(methods: list[str], budgets: list[float]) -> list[Config]:
    """Every method at every budget; methods without a budget (none, pdrop, ...) once."""
    from tokendrop.registry import configurations, needs_budget

    if not methods:
        raise ValueError("methods must name at least one method, e.g. none,hired")
    for name in methods:
        if needs_budget(name) and not budgets:
            raise ValueError(f"method {name!r} needs --budget, e.g. 0.1,0.2,0.4")
    return [Config(name, budget) for name, budget in configurations(methods, budgets)]


def evaluate(model, processor, samples: list[Sample], configs: list[Config], metrics=("exact_match",),
             batch_size: int = 8, max_new_tokens: int = 8, progress: bool = True, method_args: dict | None = None,
             on_record=None, ranks: Ranks | None = None) -> list[dict]:
    """One summary record per configuration (see `summarize`).

    Args:
        method_args: method options (dataclass fields) shared by the grid, e.g. {"alpha": 0.6}.
        on_record: called with each record as soon as its configuration finishes (to save it).
        ranks: this process's place among several (`tokendrop.evaluation.distributed`): it answers
            its share of `samples`, rank 0 gathers, scores and returns the records (other ranks: []).
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("the dataset has no samples")
    ranks = ranks or Ranks()
    mine = ranks.shard(samples)
    scorers = {name: get_metric(name) for name in metrics}
    bar = tqdm(total=len(configs) * len(mine), disable=not (progress and ranks.main), unit="q", desc="eval")
    records = []
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    try:
        for config in configs:
            bar.set_postfix_str(config.label)
            start = time.perf_counter()
            answers, visual, equivalent, control = run_config(model, processor, mine, config, batch_size,
                                                              max_new_tokens, method_args or {}, bar)
            rows = ranks.gather(list(zip(answers, visual, equivalent or [None] * len(answers))))
            if not ranks.main:
                continue
            answers, visual, equivalent = (list(column) for column in zip(*rows))
            equivalent = None if None in equivalent else equivalent
            records.append(summarize(config, samples, answers, visual, equivalent, scorers, time.perf_counter() - start,
                                     control=control))
            if on_record is not None:
                on_record(records[-1])
    finally:
        processor.tokenizer.padding_side = side
        bar.close()
    return records


def run_config(model, processor, samples, config: Config, batch_size, max_new_tokens, method_args, bar):
    """Predictions, visual tokens and equivalent tokens (or None) for every sample, and how a control
    is marked (`controls.describe`: None for methods)."""
    from tokendrop import controls
    from tokendrop.loading import format_prompt
    from tokendrop.registry import build_run

    run = build_run(config.method, budget=config.budget, **method_args)
    answers, visual, equivalent = [], [], []
    with controls.applied(model, processor, run) as handle:
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            # one list of images per prompt: a flat list is one prompt's images to some processors (Gemma 4)
            inputs = processor(images=[[s.load_image()] for s in batch], text=[format_prompt(processor, s.question) for s in batch],
                               return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=processor.tokenizer.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
            visual += (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
            if handle.equivalent_tokens is not None:
                equivalent += handle.equivalent_tokens.tolist()
            bar.update(len(batch))
    return answers, visual, (equivalent or None), controls.describe(processor, run)


def summarize(config, samples, answers, visual, equivalent, scorers, seconds, control: str | None = None) -> dict:
    """Means overall and per question type of every metric, plus token counts; `control`: the setting
    of a control configuration ("max_soft_tokens=70"), None for methods."""
    per_type = defaultdict(lambda: defaultdict(list))
    overall = defaultdict(list)
    for sample, answer in zip(samples, answers):
        for name, fn in scorers.items():
            score = fn(answer, sample.answers)
            overall[name].append(score)
            per_type[sample.type or "all"][name].append(score)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "method": config.method, "budget": config.budget, "label": config.label, "control": control, "n": len(samples),
        "metrics": {name: mean(v) for name, v in overall.items()},
        "by_type": {t: {name: mean(v) for name, v in d.items()} for t, d in sorted(per_type.items())},
        "by_type_n": {t: len(next(iter(d.values()))) for t, d in sorted(per_type.items())},
        "visual_tokens": mean(visual),
        "equivalent_tokens": None if equivalent is None else mean(equivalent),
        "seconds": seconds,
        "predictions": [{"id": s.id, "prediction": a, "answer": s.answer, "type": s.type} for s, a in zip(samples, answers)],
    }


def markdown_table(records: list[dict], metric: str = "exact_match") -> str:
    """One row per configuration: tokens, the metric overall and per question type (in %)."""
    types = sorted({t for r in records for t in r["by_type"]})
    head = ["method", "budget", "visual tokens", "avg tokens over LLM layers", f"{metric} overall", *types]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        eq = "" if r["equivalent_tokens"] is None else f"{r['equivalent_tokens']:.1f}"
        method = r["method"] + (f" (control: {r['control']})" if r.get("control") else "")
        cells = [method, "" if r["budget"] is None else f"{r['budget']:g}", f"{r['visual_tokens']:.1f}", eq,
                 f"{100 * r['metrics'][metric]:.1f}", *(f"{100 * r['by_type'].get(t, {}).get(metric, float('nan')):.1f}" for t in types)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path, metric: str = "exact_match") -> None:
    """Accuracy against budget, one line per method; budget-free methods as horizontal lines, saved as
    a PNG to `path` (a file path, or a binary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    by_method = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    for i, (name, rs) in enumerate(by_method.items()):
        if rs[0]["budget"] is None:
            ax.axhline(100 * rs[0]["metrics"][metric], linestyle="--", color=f"C{i}", label=name)
        else:
            rs = sorted(rs, key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in rs], [100 * r["metrics"][metric] for r in rs], marker="o", color=f"C{i}", label=name)
    ax.set_xlabel("budget (fraction of visual tokens kept)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
