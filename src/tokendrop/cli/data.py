"""`tokendrop data`: write the synthetic high-resolution VQA dataset to a folder."""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path

#: write errors that are the disk's state, whichever file they hit
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="generate the synthetic high-resolution VQA dataset")
    p.add_argument("--out", required=True, help="output folder (gets images/ and questions.jsonl)")
    p.add_argument("--n", type=int, default=1000, help="number of questions, one image each (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; same seed -> identical files (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing questions.jsonl in --out")


def _check(args) -> Path:
    from tokendrop.cli import UsageError
    from tokendrop.cli.options import output_folder

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out)
    if (out / "questions.jsonl").exists() and not args.force:
        raise UsageError(f"--out {out} already holds a dataset; pass --force to overwrite it")
    return output_folder(args.out, "--out")  # a folder (created if missing) where a file can be written


@contextlib.contextmanager
def writing_into(out: Path):
    """A write that fails in `out` (or on a full disk) while generating: a UsageError naming the file;
    what was written stays. Any other OSError is a bug and keeps its traceback."""
    from tokendrop.cli import UsageError

    try:
        yield
    except OSError as err:
        inside = err.filename is not None and Path(err.filename).resolve().is_relative_to(out.resolve())
        if not inside and err.errno not in DISK_FULL:
            raise
        where = err.filename or f"a file in {out}"
        raise UsageError(f"--out: could not write {where} ({err.strerror or err}); "
                         "the files written so far are kept") from None


def run(args) -> int:
    from tqdm import tqdm

    from tokendrop.data.synth import generate_dataset

    out = _check(args)
    start = time.perf_counter()
    with tqdm(total=args.n, desc="tokendrop data", unit="sample") as bar, writing_into(out):
        summary = generate_dataset(out, args.n, seed=args.seed, progress=bar.update)
    elapsed = time.perf_counter() - start
    print(f"wrote {summary['n']} questions to {out}/questions.jsonl (seed {summary['seed']}, {elapsed:.1f} s)")
    print("grids: " + ", ".join(f"{g} {c}" for g, c in summary["grids"].items()))
    for qtype, counts in summary["answers"].items():
        answers = ", ".join(f"{a} {c}" for a, c in counts.items())
        print(f"{qtype:7s} {summary['types'][qtype]:6d}  ({answers})")
    return 0
