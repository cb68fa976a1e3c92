"""Stage-2 training step time, vanilla against PyramidDrop, measured in alternating blocks.

    python -m recipes.default_model.steptime --data /work/data/train --stage1-checkpoint /work/data/stage1_v3.pt

(from the repository root, where ``recipes`` imports as a package)

Both modes start from the same stage-1 checkpoint and train on the same batches (the stage-2 data
order of ``python -m recipes.default_model train``); blocks of ``--steps`` steps alternate vanilla, PyramidDrop, vanilla,
... so that a machine whose speed drifts slows both alike. Each block builds a fresh model, so every
block times the same first steps. Prints one line per block and the medians, as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokendrop.data import load_dataset

from recipes.default_model.checkpoint import load_stage1
from recipes.default_model.config import TrainConfig
from recipes.default_model.data_order import STAGE2, Batches, generator
from recipes.default_model.stage2 import train_vlm
from recipes.default_model.train import build


def time_block(samples, cfg: TrainConfig, checkpoint: dict, pdrop: bool, steps: int) -> float:
    """Seconds for ``steps`` stage-2 steps of a fresh model with ``checkpoint``'s vision tower."""
    torch.manual_seed(cfg.seed)
    processor, model, head = build(cfg, samples)
    load_stage1(model, head, checkpoint)
    rng = generator(cfg.seed, STAGE2)
    # grounding, tally and dropped inputs off in both: PyramidDrop training cannot use them, and the comparison is of the LM forward
    block = TrainConfig(**{**cfg.__dict__, "pdrop": pdrop, "ground_weight": 0.0, "tally_weight": 0.0, "drop_share": 0.0, "stage2_steps": steps,
                           "log_every": 10**9})
    start = time.perf_counter()
    train_vlm(model, head, processor, block, Batches(samples, cfg.stage2_batch, rng), rng, log=lambda _: None)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.default_model.steptime", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training dataset folder")
    parser.add_argument("--stage1-checkpoint", required=True, help="stage-1 file written by python -m recipes.default_model train")
    parser.add_argument("--steps", type=int, default=30, help="steps per block (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per mode (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the block times here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    samples = load_dataset(args.data)
    checkpoint = torch.load(args.stage1_checkpoint, map_location="cpu", weights_only=True)
    cfg = TrainConfig(train_dir=args.data, out_dir="-", threads=args.threads)
    times: dict[str, list[float]] = {"vanilla": [], "pdrop": []}
    for rep in range(args.repeats):
        for mode in ("vanilla", "pdrop"):
            seconds = time_block(samples, cfg, checkpoint, mode == "pdrop", args.steps)
            times[mode].append(seconds)
            print(f"block {rep + 1} {mode:7s} {args.steps} steps {seconds:7.1f} s ({seconds / args.steps:.3f} s/step)", flush=True)
    medians = {mode: statistics.median(t) / args.steps for mode, t in times.items()}
    print(f"median s/step: vanilla {medians['vanilla']:.3f}, pdrop {medians['pdrop']:.3f}, "
          f"pdrop/vanilla {medians['pdrop'] / medians['vanilla']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps": args.steps, "block_seconds": times, "median_seconds_per_step": medians}, fh, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
