"""``tokendrop train``: its flags to a ``TrainConfig``, the run, and the validation report.

The flags themselves are defined with the command, in ``tokendrop.cli.train`` (so that
``tokendrop train --help`` lists them wherever tokendrop is installed), which calls ``run(args)``
here. A bad flag raises ``ValueError`` naming it: the CLI prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tokendrop.data import load_dataset
from tokendrop.evaluation.harness import Config, evaluate

from recipes.default_model.config import TrainConfig
from recipes.default_model.model import ModelConfig
from recipes.default_model.train import train

_TINY = dict(v_hidden=32, v_layers=2, v_heads=2, v_mlp=64, t_hidden=32, t_layers=2, t_heads=2, t_mlp=64)  # --tiny


def run(args, cfg: TrainConfig | None = None) -> int:
    """Train with the flags in ``args`` (or the config already made from them), save to ``--out``, and
    with ``--val`` write val_report.json there."""
    cfg = cfg or config_from_args(args)
    log(f"training: {' '.join(sys.argv[1:]) or 'train'}")
    model, processor, seconds = train(cfg, log=log)
    if args.val and args.val_n:
        report = validate(model, processor, args.val, args.val_n)
        report["train_seconds"] = round(seconds, 1)
        (Path(args.out) / "val_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def config_from_args(args) -> TrainConfig:
    """The ``TrainConfig`` of ``tokendrop train``'s flags (checked first, see ``_check``)."""
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
    samples = load_dataset(val_dir, limit=n)
    report = {}
    for record in evaluate(model, processor, samples, [Config("none"), Config("base-only")], progress=False):
        record.pop("predictions")
        report[record["method"]] = record
        by_type = " ".join(f"{t} {v['exact_match']:.3f}" for t, v in record["by_type"].items())
        log(f"val {record['method']:9s} overall {record['metrics']['exact_match']:.3f} ({by_type}) n={record['n']}")
    return report
