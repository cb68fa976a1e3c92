"""What a run writes: the trained model (hub-layout checkpoint + training_args.json) and the stage-1
checkpoint (vision tower + its training heads) that later runs can start from."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch

from tokendrop.loading import save_hub_layout

from recipes.default_model.config import TrainConfig
from recipes.default_model.vision_heads import VisionHeads


def save_model(model, processor, out_dir: str | Path, cfg: TrainConfig, extra: dict) -> None:
    """Model and processor in the layout of hub checkpoints (``save_hub_layout``: stock vLLM loads it too),
    plus training_args.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if cfg.save_fp16:
        to_save = copy.deepcopy(model).half()
    save_hub_layout(to_save, processor, out)
    args = asdict(cfg)
    args.update(extra)
    (out / "training_args.json").write_text(json.dumps(args, indent=2) + "\n")


def save_stage1(model, head: VisionHeads, steps: int, path: Path) -> None:
    """The vision tower, its training heads and the steps stage 1 took, to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tower": model.model.vision_tower.state_dict(), "head": head.state_dict(), "steps": steps}, path)


def load_stage1(model, head: VisionHeads, state: dict) -> int:
    """Put a stage-1 checkpoint (``tower``, ``head``, ``steps``) into ``model`` and ``head``; returns its steps."""
    marked = any(k.startswith("centre.") for k in state["head"])
    if marked != (head.centre is not None):
        need = "> 0" if marked else "0"
        raise ValueError(f"the stage-1 checkpoint was trained {'with' if marked else 'without'} the centre mark: "
                         f"load it with centre_weight {need} (--centre-weight {need})")
    model.model.vision_tower.load_state_dict(state["tower"])
    head.load_state_dict(state["head"])
    return int(state["steps"])
