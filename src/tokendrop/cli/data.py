"""`tokendrop data`: write the synthetic high-resolution VQA dataset to a folder."""

from __future__ import annotations

import time
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="generate the synthetic high-resolution VQA dataset")
    p.add_argument("--out", required=True, help="output folder (gets images/ and questions.jsonl)")
    p.add_argument("--n", type=int, default=1000, help="number of questions, one image each (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; same seed -> identical files (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing questions.jsonl in --out")


def _check(args) -> Path:
    from tokendrop.cli import UsageError

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if (out / "questions.jsonl").exists() and not args.force:
        raise UsageError(f"--out {out} already holds a dataset; pass --force to overwrite it")
    return out


def run(args) -> int:
    from tqdm import tqdm

    from tokendrop.data.synth import generate_dataset

    out = _check(args)
    start = time.perf_counter()
    with tqdm(total=args.n, desc="tokendrop data", unit="sample") as bar:
        summary = generate_dataset(out, args.n, seed=args.seed, progress=bar.update)
    elapsed = time.perf_counter() - start
    print(f"wrote {summary['n']} questions to {out}/questions.jsonl (seed {summary['seed']}, {elapsed:.1f} s)")
    print("grids: " + ", ".join(f"{g} {c}" for g, c in summary["grids"].items()))
    for qtype, counts in summary["answers"].items():
        answers = ", ".join(f"{a} {c}" for a, c in counts.items())
        print(f"{qtype:7s} {summary['types'][qtype]:6d}  ({answers})")
    return 0
