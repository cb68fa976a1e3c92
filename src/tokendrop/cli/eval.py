"""`tokendrop eval`: accuracy of methods x budgets on a VQA dataset (folder format: docs/data_format.md).

    tokendrop eval --data data/heldout --method none,hired,random --budget 0.1,0.2 --json results.jsonl
    tokendrop eval ... --json results.jsonl --resume        # after an interruption: only what is missing

Every argument, output path and the dataset are checked before the model is loaded; each
configuration's record is appended to --json (JSON lines) as soon as it finishes.
"""

from __future__ import annotations

from pathlib import Path

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_json, add_method_options, check_on_model, comma_list, flag, load_model,
                                   method_configs, one_int, output_path, require_matplotlib)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy of token-dropping methods on a VQA dataset")
    p.add_argument("--data", required=True, help="dataset folder with questions.jsonl (see docs/data_format.md)")
    p.add_argument("--model", help="HF id or folder, or 'tiny' (default: the bundled model)")
    add_method_options(p, default="none,hired", budget="0.1,0.2,0.4")
    p.add_argument("--metrics", default="exact_match,vqa_accuracy,anls,relaxed_accuracy",
                   help="comma list; the first one is the table's (default: %(default)s)")
    p.add_argument("--limit", default=None, help="first N questions only")
    p.add_argument("--batch-size", default="8", help="questions per generate() call (default: %(default)s)")
    p.add_argument("--max-new-tokens", default="8", help="answer length limit (default: %(default)s)")
    add_json(p, "one record per configuration, JSON lines, as each finishes")
    p.add_argument("--resume", action="store_true", help="with --json: skip configurations the file already holds")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--plot", help="PNG of accuracy against budget")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from tokendrop.data.dataset import load_dataset
    from tokendrop.evaluation.harness import Config, evaluate, markdown_table, plot
    from tokendrop.evaluation.metrics import RULES, get_metric
    from tokendrop.evaluation.results import ResultsFile
    from tokendrop.registry import configurations

    # 1. every argument and output path, before anything is loaded
    names, budgets, options = method_configs(args)
    with flag("--metrics"):
        metrics = comma_list(args.metrics, "--metrics")
        for name in metrics:
            get_metric(name)
    limit, batch_size = one_int(args.limit, "--limit", 1), one_int(args.batch_size, "--batch-size", 1)
    new_tokens = one_int(args.max_new_tokens, "--max-new-tokens", 1)
    if args.json == "-" or (args.resume and args.json is None):
        raise UsageError("--resume needs --json PATH (the file to continue)" if args.resume else
                         "--json: eval writes its results to a file, give a path")
    markdown, picture = output_path(args.markdown, "--markdown"), output_path(args.plot, "--plot", suffix=".png")
    json_path = output_path(args.json, "--json")
    if picture is not None:
        require_matplotlib("--plot")
    # 2. the dataset (every image path checked), then the model
    with flag("--data"):
        samples = load_dataset(args.data, limit=limit)
    configs = [Config(name, budget) for name, budget in configurations(names, budgets)]
    results = None
    if json_path is not None:
        settings = {"model": args.model or "bundled", "data": str(Path(args.data).resolve()), "n": len(samples),
                    "metrics": metrics, "method_args": options, "max_new_tokens": new_tokens}
        with flag("--json"):
            results = ResultsFile(json_path, settings, resume=args.resume)
    done = {c.label: results.done(c.label) for c in configs} if results is not None else {}
    todo = [c for c in configs if done.get(c.label) is None]
    if len(todo) < len(configs):
        print(f"resuming {json_path}: {len(configs) - len(todo)} of {len(configs)} configurations already done")
    new = []
    if todo:
        model, processor, note = load_model(args.model)
        if note:
            print(f"model: {note}")
        check_on_model(model, processor, names, budgets, options)
        new = evaluate(model, processor, samples, todo, metrics=metrics, batch_size=batch_size, max_new_tokens=new_tokens,
                       progress=not args.no_progress, method_args=options,
                       on_record=results.add if results is not None else None)
    by_label = {**{k: v for k, v in done.items() if v is not None}, **{r["label"]: r for r in new}}
    records = [by_label[c.label] for c in configs]
    # 3. the table, and the files made from all records
    caption = f"{metrics[0]} (%), {len(samples)} questions. Metric: {RULES[metrics[0]]}."
    table = markdown_table(records, metrics[0])
    print(f"{caption}\n{table}")
    if markdown is not None:
        markdown.write_text(f"{caption}\n\n{table}\n")
    if picture is not None:
        plot(records, str(picture), metrics[0])
    if json_path is not None:
        print(f"results: {json_path} ({len(records)} configurations)")
    return 0
