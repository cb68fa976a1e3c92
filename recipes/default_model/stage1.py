"""Stage 1: the CLIP tower alone, on scene views and glyph sheets.

Multi-label prediction from each view's [CLS] output (``pooler_output`` = post_layernorm(CLS)) of
which shapes, colours, (colour, shape) pairs and glyphs it shows, on the base image and on every
anyres tile: a tile's [CLS] has to attend to the glyph in that tile, the meaning HiRED relies on when
it ranks tokens by [CLS] attention. Per-patch colour / shape / glyph classes on the feature layer the
LM receives (the heads: ``vision_heads``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recipes.default_model.batches import encode_sheets, encode_views
from recipes.default_model.checkpoint import load_stage1, save_stage1
from recipes.default_model.config import TrainConfig
from recipes.default_model.data_order import SHEETS, STAGE1, Batches, generator
from recipes.default_model.schedule import Schedule, set_lr, update
from recipes.default_model.vision_heads import VisionHeads


def vision_stage(model, head: VisionHeads, processor, cfg: TrainConfig, samples: list, log: Callable) -> int:
    """Stage 1 of a run, or its checkpoint; returns the stage-1 steps.

    With ``cfg.stage1_checkpoint`` naming an existing file, the tower and its heads are loaded from
    it instead of trained; otherwise stage 1 runs and, when a file is named, is saved there.
    """
    checkpoint = Path(cfg.stage1_checkpoint) if cfg.stage1_checkpoint else None
    if checkpoint is not None and checkpoint.is_file():
        steps = load_stage1(model, head, torch.load(checkpoint, map_location="cpu", weights_only=True))
        log(f"stage1 loaded from {checkpoint} ({steps} steps)")
        return steps
    batches = Batches(samples, cfg.stage1_batch, generator(cfg.seed, STAGE1))
    steps = train_vision(model, head, processor.image_processor, cfg, batches, log)
    if checkpoint is not None:
        save_stage1(model, head, steps, checkpoint)
    return steps


def train_vision(model, head: VisionHeads, image_processor, cfg: TrainConfig, batches: Batches, log: Callable,
                 sheet_rng: np.random.Generator | None = None) -> int:
    """Stage 1: the vision tower alone, on scenes ([CLS] multi-label + per-patch classes) and glyph
    sheets (per-patch glyph classes); returns the steps taken."""
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay)
    tower.train()
    sheet_rng = sheet_rng if sheet_rng is not None else generator(cfg.seed, SHEETS)
    seconds = None if cfg.minutes is None else cfg.minutes * 60 * cfg.stage1_share
    schedule = Schedule(cfg.stage1_steps, seconds, cfg.warmup, cfg.stage1_lr)
    step = 0
    while not schedule.done(step):
        set_lr(optimizer, schedule.lr(step))
        cls, patch, sheet, centre, n_views = _losses(model, head, image_processor, cfg, batches, sheet_rng)
        update(optimizer, cls + patch + sheet + cfg.centre_weight * centre, params)
        if step % cfg.log_every == 0:
            log(f"stage1 step {step:5d} lr {schedule.lr(step):.2e} cls_loss {cls.item():.4f} patch_loss {patch.item():.4f} "
                f"sheet_loss {sheet.item():.4f} centre_loss {centre.item():.4f} views {n_views} elapsed {time.perf_counter() - schedule.start:7.1f}s")
        step += 1
    log(f"stage1 done: {step} steps in {time.perf_counter() - schedule.start:.1f}s")
    return step


def _losses(model, head: VisionHeads, image_processor, cfg: TrainConfig, batches: Batches,
            sheet_rng: np.random.Generator) -> tuple:
    """The stage-1 losses of the next batch of scenes (and fresh glyph sheets, one tower forward for
    both): ([CLS], patch, sheet, centre) losses and the number of scene views."""
    batch = encode_views(image_processor, batches.next(), cfg.model.tile, centres=cfg.centre_weight > 0)
    pixel_values, n_views = batch["pixel_values"], batch["pixel_values"].shape[0]
    if cfg.sheets:
        sheets = encode_sheets(image_processor, sheet_rng, cfg.sheets, cfg.model.tile)
        pixel_values = torch.cat([pixel_values, sheets["pixel_values"]])
    out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[model.config.vision_feature_layer]
    cls, patch = head.loss(out.pooler_output[:n_views], hidden[:n_views], batch)
    sheet = head.sheet_loss(hidden[n_views:], sheets["glyph_targets"]) if cfg.sheets else torch.zeros(())
    centre = head.centre_loss(hidden[:n_views], batch["centre_targets"]) if cfg.centre_weight > 0 else torch.zeros(())
    return cls, patch, sheet, centre, n_views
