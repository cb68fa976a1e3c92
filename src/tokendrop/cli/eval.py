"""`tokendrop eval`: accuracy of methods x budgets on a dataset folder (images + questions.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from tokendrop.cli import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy of token-dropping methods on a VQA dataset folder")
    p.add_argument("--data", required=True, help="dataset folder with questions.jsonl (see docs/data_format.md)")
    p.add_argument("--model", help="HF id or folder (default: the bundled model)")
    p.add_argument("--method", default="none,hired", help="comma list: none, hired, hired-official, random, spatial, "
                                                          "base-only, pdrop, fastv, a+b (default: none,hired)")
    p.add_argument("--budget", default="0.1,0.2,0.4", help="comma list of budgets for pre-LLM methods")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--ratio", type=float, default=0.5, help="PyramidDrop keep ratio per stage")
    p.add_argument("--k", type=int, default=2, help="FastV layer")
    p.add_argument("--drop", type=float, default=0.5, help="FastV dropped fraction")
    p.add_argument("--metrics", default="exact_match,vqa_accuracy,anls,relaxed_accuracy")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json", dest="json_path", help="write all records (with predictions) here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--plot", help="PNG of accuracy against budget")
    p.add_argument("--no-progress", action="store_true")


def parse_budgets(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--budget must be comma-separated numbers such as 0.1,0.2, got {text!r}") from None


def run(args) -> int:
    from tokendrop.data.dataset import load_dataset
    from tokendrop.demo import load_default_model
    from tokendrop.evaluation.harness import evaluate, grid, markdown_table, plot
    from tokendrop.evaluation.metrics import get_metric

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for name in metrics:
        get_metric(name)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    configs = grid([m.strip() for m in args.method.split(",") if m.strip()], parse_budgets(args.budget))
    samples = load_dataset(args.data, limit=args.limit)
    model, processor, note = load_default_model(args.model)
    if note:
        print(note)
    records = evaluate(model, processor, samples, configs, metrics=metrics, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                       method_args=dict(alpha=args.alpha, ratio=args.ratio, k=args.k, drop=args.drop))
    table = markdown_table(records, metrics[0])
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(records, indent=2))
    if args.plot:
        plot(records, args.plot, metrics[0])
    return 0
