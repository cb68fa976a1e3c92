"""The recipe's command line: ``python -m recipes.default_model train --data DIR --out DIR [...]``.

Run it from the repository root, where ``recipes`` imports as a package (the recipe is not installed
with the wheel; docs/training_recipe.md has the commands of every run). ``build_parser`` defines the
flags, ``config_from_args`` turns them into a ``TrainConfig``, ``run`` trains, saves to ``--out`` and
validates. Errors: a bad flag value raises ``ValueError`` naming the flag, which ``main`` prints as one
line before any work, exit code 2 (argparse's own errors, such as an unknown flag, exit 2 too).
Torch and transformers are imported by ``run``, so ``--help`` and the checks answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recipes.default_model.config import TrainConfig

PROG = "python -m recipes.default_model"
_TINY = dict(v_hidden=32, v_layers=2, v_heads=2, v_mlp=64, t_hidden=32, t_layers=2, t_heads=2, t_mlp=64)  # --tiny


def build_parser() -> argparse.ArgumentParser:
    """The recipe's parser: one subcommand, ``train``, with the training flags (``add_train_parser``)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Train tokendrop's default model (docs/training_recipe.md).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(subparsers)
    return parser


def add_train_parser(subparsers) -> None:
    """``train``: the default model (small stock LLaVA-NeXT) on a synthetic VQA dataset from ``tokendrop data``."""
    p = subparsers.add_parser("train", help="train the default model on a synthetic dataset (tokendrop data)")
    p.add_argument("--data", required=True, help="training dataset folder (from `tokendrop data`)")
    p.add_argument("--out", required=True, help="output model folder (save_pretrained: model + processor)")
    p.add_argument("--val", help="validation dataset folder: accuracy is reported after training")
    p.add_argument("--val-n", type=int, default=200, help="validation questions to evaluate (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage1-steps", type=int, default=850, help="stage-1 (vision tower) steps")
    p.add_argument("--stage2-steps", type=int, default=2650, help="stage-2 (VLM) steps")
    p.add_argument("--batch", type=int, default=8, help="stage-2 batch size (images)")
    p.add_argument("--bucket", type=int, default=1,
                   help="stage-2 batches per length-sorted pool: batches of similar image-token counts pad less "
                        "(default %(default)s: plain shuffled batches)")
    p.add_argument("--lr", type=float, default=1e-3, help="stage-2 peak learning rate")
    p.add_argument("--minutes", type=float, help="wall-clock budget: run both stages by time, not step counts")
    p.add_argument("--threads", type=int, default=2, help="torch threads (use 1 when another job shares the cores)")
    p.add_argument("--tiny", action="store_true", help="a very small model (smoke tests)")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (load with dtype=torch.float32)")
    p.add_argument("--pdrop", action="store_true", help="train stage 2 with PyramidDrop (td.PyramidDrop()) patched in")
    p.add_argument("--ground-weight", type=float, default=1.0,
                   help="stage-2 grounding loss weight: an LM attention head must look at what each question is about "
                        "(default %(default)s; 0: off)")
    p.add_argument("--tally-weight", type=float, default=1.0,
                   help="stage-2 tally loss weight: another head's attention on itself must be 1/(n+1) for n objects "
                        "matching the question (default %(default)s; 0: off)")
    p.add_argument("--match-init", type=float, default=0.0,
                   help="start the grounded and tally heads as word matchers: a question word and an image token "
                        "showing it score this logit (default %(default)s: random start)")
    p.add_argument("--centre-weight", type=float, default=0.0,
                   help="stage-1 loss weight: the tower marks the patch holding each object's centre "
                        "(default %(default)s; 0: off)")
    p.add_argument("--tally-mark", choices=("objects", "centres"), default="objects",
                   help="image tokens of the matching objects the tally loss puts n/(n+1) on: all their patches or "
                        "each object's centre patches (needs a stage 1 with --centre-weight > 0) (default %(default)s)")
    p.add_argument("--tally-balance", action="store_true",
                   help="weigh every count n equally in the tally loss (n >= 2 is rare in the data)")
    p.add_argument("--drop-share", type=float, default=None,
                   help="share of stage-2 steps whose images go through HiRED / RandomDrop / SpatialDrop "
                        "(equally likely) at a budget in [0.1, 0.5] (default 0.3, 0 with --pdrop; 0: all tokens)")
    p.add_argument("--rope-theta", type=float, default=10000.0,
                   help="RoPE base of the language model (default %(default)s, Llama's)")
    p.add_argument("--stage1-checkpoint", help="file: load stage 1 from it when it exists, else save stage 1 there")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), check the flags, then train: the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)  # the flags' checks: ValueError naming the flag
    except ValueError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    log(f"training: {' '.join(argv)}")
    try:
        return run(args, cfg)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def run(args, cfg: TrainConfig | None = None) -> int:
    """Train with the flags in ``args`` (or the config already made from them), save to ``--out``, and
    with ``--val`` write val_report.json there."""
    from recipes.default_model.train import train

    cfg = cfg or config_from_args(args)
    model, processor, seconds = train(cfg, log=log)
    if args.val and args.val_n:
        report = validate(model, processor, args.val, args.val_n)
        report["train_seconds"] = round(seconds, 1)
        (Path(args.out) / "val_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def config_from_args(args) -> TrainConfig:
    """The ``TrainConfig`` of ``train``'s flags (checked first, see ``_check``)."""
    from recipes.default_model.config import TrainConfig
    from recipes.default_model.model import ModelConfig

    _check(args)
    model = ModelConfig(t_rope_theta=args.rope_theta, **(_TINY if args.tiny else {}))
    ground_layer = min(TrainConfig.ground_layer, model.t_layers - 1)  # the tiny LM has 2 layers
    return TrainConfig(
        train_dir=args.data,
        out_dir=args.out,
        model=model,
        seed=args.seed,
        stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps,
        stage2_batch=args.batch,
        stage2_bucket=args.bucket,
        stage2_lr=args.lr,
        save_fp16=args.fp16,
        minutes=args.minutes,
        threads=args.threads,
        pdrop=args.pdrop,
        ground_weight=args.ground_weight,
        ground_layer=ground_layer,
        tally_weight=args.tally_weight,
        tally_mark=args.tally_mark,
        tally_balance=args.tally_balance,
        centre_weight=args.centre_weight,
        match_init=args.match_init,
        drop_share=args.drop_share,
        stage1_checkpoint=args.stage1_checkpoint,
    )


def _check(args) -> None:
    """Refuse bad flags, naming the flag; fill in ``--drop-share``'s default (0.3, 0 with ``--pdrop``)."""
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data} is not a folder (create one with `tokendrop data --out DIR`)")
    if args.val and not Path(args.val).is_dir():
        raise ValueError(f"--val {args.val} is not a folder")
    for name in ("stage1_steps", "stage2_steps", "val_n"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.minutes is not None and args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    for name in ("ground_weight", "tally_weight", "match_init", "centre_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.drop_share is None:
        args.drop_share = 0.0 if args.pdrop else 0.3
    if not 0.0 <= args.drop_share <= 1.0:
        raise ValueError(f"--drop-share must be in [0, 1], got {args.drop_share}")
    if args.drop_share > 0 and args.pdrop:
        raise ValueError("--drop-share cannot be combined with --pdrop (pass --drop-share 0)")
    for name in ("threads", "batch", "bucket"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.rope_theta <= 1:
        raise ValueError(f"--rope-theta must be > 1, got {args.rope_theta}")


def log(message: str) -> None:
    """A timestamped line on stdout, flushed (training logs are followed live)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def validate(model, processor, val_dir: str, n: int) -> dict:
    """Exact match on the first ``n`` validation questions: stock, and with the base image's tokens only."""
    from tokendrop.data import load_dataset
    from tokendrop.evaluation.harness import Config, evaluate

    samples = load_dataset(val_dir, limit=n)
    report = {}
    for record in evaluate(model, processor, samples, [Config("none"), Config("base-only")], progress=False):
        record.pop("predictions")
        report[record["method"]] = record
        by_type = " ".join(f"{t} {v['exact_match']:.3f}" for t, v in record["by_type"].items())
        log(f"val {record['method']:9s} overall {record['metrics']['exact_match']:.3f} ({by_type}) n={record['n']}")
    return report
