"""`tokendrop eval`: accuracy of methods x budgets on a VQA dataset (docs/data_format.md).

    tokendrop eval --data data/heldout --method none,hired,random --budget 0.1,0.2 --json results.jsonl
    tokendrop eval ... --json results.jsonl --resume        # after an interruption: only what is missing
    tokendrop eval --data textvqa_val.parquet --columns id=question_id --metrics vqa_accuracy ...
    torchrun --nproc_per_node 2 -m tokendrop eval ...        # questions shared by rank, results on rank 0

Every argument, output path and the dataset are checked before the model is loaded; each
configuration's record is appended to --json (JSON lines) as soon as it finishes. --resume continues
a file written with the same settings (model, data, columns, split, questions, metrics, answer length,
and each method's options): more methods or budgets run only what is missing; other settings are
refused before any work; a last line cut by a kill is dropped, and said so on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_method_options, check_on_config, check_on_model, comma_list, figure_bytes, flag,
                                   load_model_flag, method_configs, one_int, output_path, require_matplotlib,
                                   write_output)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy of token-dropping methods on a VQA dataset")
    p.add_argument("--data", required=True,
                   help="a tokendrop dataset folder (questions.jsonl + images), or with `datasets` installed: a "
                        "save_to_disk folder, a .parquet/.json/.jsonl/.csv file, or a hub id in the local cache "
                        "(docs/data_format.md)")
    p.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                   help="for `datasets` sources: the columns of the fields image, question, answers, id, type, answer "
                        "(default: the column named like the field), e.g. id=question_id,answers=answer")
    p.add_argument("--split", default=None, help="for `datasets` sources with several splits: the one to read")
    p.add_argument("--model", help="HF id or folder, or 'tiny' (default: the bundled model)")
    add_method_options(p, default="none,hired", budget="0.1,0.2,0.4")
    p.add_argument("--metrics", default="exact_match,vqa_accuracy,anls,relaxed_accuracy",
                   help="comma list; the first one is the table's (default: %(default)s)")
    p.add_argument("--limit", default=None, help="first N questions only")
    p.add_argument("--batch-size", default="8", help="questions per generate() call (default: %(default)s)")
    p.add_argument("--max-new-tokens", default="8", help="answer length limit (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="append one record per configuration to PATH, JSON lines, as each finishes (a new or "
                        "empty file, or a device such as /dev/stdout; a file with results needs --resume)")
    p.add_argument("--resume", action="store_true",
                   help="with --json: continue that file, skipping the configurations it holds (same settings "
                        "required; more methods or budgets are fine)")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--plot", help="PNG of accuracy against budget")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from tokendrop.data.hf import parse_columns
    from tokendrop.data.sources import load_samples
    from tokendrop.evaluation import distributed
    from tokendrop.evaluation.harness import Config
    from tokendrop.evaluation.metrics import get_metric
    from tokendrop.evaluation.results import ResultsFile
    from tokendrop.registry import configurations

    # 1. every argument and output path, before anything is loaded (every rank checks the same)
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
    with flag("--columns"):
        columns = parse_columns(args.columns)
    with flag("--data"):
        try:
            samples = load_samples(args.data, columns, args.split, limit, progress=False if args.no_progress else None)
        except ImportError as err:  # a `datasets` source without `datasets`
            raise UsageError(f"--data: {err}") from None
    check_on_config(args.model, names, budgets, options)  # the model's config: before minutes of loading weights
    # 2. what an earlier run finished (--resume): the same settings, or a refusal before any work
    with flag("WORLD_SIZE / RANK / LOCAL_RANK"):
        ranks = distributed.from_env()
    configs = [Config(name, budget) for name, budget in configurations(names, budgets)]
    results = None
    if json_path is not None:
        data = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data  # a path, or a hub id
        settings = {"model": args.model or "bundled", "data": data, "columns": columns, "split": args.split,
                    "n": len(samples), "metrics": metrics, "method_args": options, "max_new_tokens": new_tokens}
        with flag("--json"):
            results = ResultsFile(json_path, settings, resume=args.resume)
        _check_same_settings(results, names)
        if ranks.main:  # the only process that writes
            _repair(results)
    done = {c.label: results.done(c.label) for c in configs} if results is not None else {}
    todo = [c for c in configs if done.get(c.label) is None]
    # 3. the missing configurations, shared by the ranks when several processes run
    if ranks.main and len(todo) < len(configs):
        print(f"resuming {json_path}: {len(configs) - len(todo)} of {len(configs)} configurations already done")
    new = []
    if todo:
        distributed.init()
        try:
            new = _evaluate(args, samples, todo, names, budgets, options, metrics, batch_size, new_tokens,
                            results if ranks.main else None, ranks)
        finally:
            distributed.close()
    if not ranks.main:
        return 0
    by_label = {**{k: v for k, v in done.items() if v is not None}, **{r["label"]: r for r in new}}
    _report([by_label[c.label] for c in configs], metrics[0], len(samples), markdown, picture, json_path)
    return 0


def _evaluate(args, samples, todo, names, budgets, options, metrics, batch_size, new_tokens, results, ranks):
    """Records of the configurations in `todo` (on rank 0; [] on the others)."""
    from tokendrop.evaluation import distributed
    from tokendrop.evaluation.harness import evaluate

    model, processor, note = load_model_flag(args.model, device=distributed.device(ranks))
    if note and ranks.main:
        print(f"model: {note}")
    sizes = [sample.image_size for sample in samples if sample.image_size is not None]  # known from the data check
    check_on_model(model, processor, names, budgets, options, image_sizes=sizes, image_flag="--data")
    return evaluate(model, processor, samples, todo, metrics=metrics, batch_size=batch_size,
                    max_new_tokens=new_tokens, progress=not args.no_progress, method_args=options,
                    on_record=(lambda record: _save(results, record)) if results is not None else None, ranks=ranks)


# Run settings (ResultsFile's `run`) -> the flag that sets them, for the messages of a refused resume.
FLAGS = {"model": "--model", "data": "--data", "columns": "--columns", "split": "--split", "n": "--limit (questions)",
         "metrics": "--metrics", "method_args": "--method-args", "max_new_tokens": "--max-new-tokens"}


def _check_same_settings(results, names: list[str]) -> None:
    """UsageError naming every setting (old -> new) in which the file's records differ from this run."""
    changes = []
    for setting, old, new in results.differences(names):
        key, _, method = setting.partition(" ")
        name = FLAGS.get(key, key) + (f" ({method})" if method else "")
        changes.append(f"{name} {_show(old)} -> {_show(new)}")
    if changes:
        raise UsageError(f"--resume: {results.path} holds results of other settings: {'; '.join(changes)}. "
                         "Resume with the file's settings, or write to another --json file")


def _show(value) -> str:
    """A setting as the user typed it: lists comma-joined, dicts as key=value."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(defaults)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "(none)" if value is None else str(value)


def _repair(results) -> None:
    """Drop the last line a killed write left unfinished (one line on stderr says what)."""
    with flag("--json"):
        results.repair()
    if results.unfinished is not None:
        text = results.unfinished if len(results.unfinished) <= 60 else results.unfinished[:60] + "..."
        print(f"tokendrop eval: --json {results.path}: dropped its unfinished last line, cut by an interrupted "
              f"write ({len(results.unfinished)} characters: {text!r}); finished records are kept", file=sys.stderr)


def _save(results, record: dict) -> None:
    """Append a finished configuration's record; a failed write (a full disk) prints the record as one
    JSON line on stdout, so nothing finished is lost, and names the file and what is kept."""
    try:
        results.add(record)
    except OSError as err:
        print(json.dumps(dict(record, run=results.run)), flush=True)
        raise UsageError(f"--json {results.path}: could not write the record of {record['label']}: "
                         f"{err.strerror or err}; its record is printed on stdout as a JSON line (append it to the "
                         f"file to keep it), the {len(results.records)} records before it are kept in the file "
                         "(--resume continues from them)") from None


def _report(records, metric, n, markdown, picture, json_path) -> None:
    """The table (with its metric's rule), and the files made from all records."""
    from tokendrop.evaluation.harness import markdown_table, plot
    from tokendrop.evaluation.metrics import RULES

    caption = f"{metric} (%), {n} questions. Metric: {RULES[metric]}."
    table = markdown_table(records, metric)
    print(f"{caption}\n{table}")
    kept = f"; the results are in {json_path}" if json_path is not None else "; the table above holds the results"
    if markdown is not None:
        write_output(markdown, f"{caption}\n\n{table}\n", "--markdown", kept)
    if picture is not None:
        write_output(picture, figure_bytes(lambda file: plot(records, file, metric)), "--plot", kept)
    if json_path is not None:
        print(f"results: {json_path} ({len(records)} configurations)")
