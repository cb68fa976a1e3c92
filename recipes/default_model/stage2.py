"""Stage 2: the whole VLM through the stock ``model(**inputs, labels=labels)`` forward.

Language-model loss on answer tokens only (labels -100 elsewhere), plus the projector's word
alignment, a grounding loss (one LM attention head must look at the patches each question is about)
and a tally loss (another head's share of attention on itself must be 1 / (n + 1) for n matching
objects) (``losses``); a share of the steps see their images through a pre-LLM dropping method. The
tower is frozen by default (``cfg.vision_lr_scale`` 0); when it trains, the stage-1 losses come along
as auxiliaries.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

import tokendrop as td
from tokendrop.scoring import query_attention_rows

from recipes.default_model.batches import collate, encode_example
from recipes.default_model.config import TrainConfig
from recipes.default_model.data_order import DROPS, Batches, generator
from recipes.default_model.losses import align_loss, ground_loss, tally_loss
from recipes.default_model.schedule import Schedule, set_lr, update
from recipes.default_model.token_patches import batch_token_patches, grounding_targets, kept_token_patches, tally_counts
from recipes.default_model.vision_heads import VisionHeads
from recipes.default_model.words import word_ids


def train_vlm(model, head: VisionHeads, processor, cfg: TrainConfig, batches: Batches, rng: np.random.Generator,
              log: Callable, seconds: float | None = None) -> int:
    """Stage 2: the stock LLaVA-NeXT forward with LM loss on answers + the projector's word alignment
    + the grounding loss (``cfg.ground_*``) (+ the stage-1 losses as auxiliaries when the tower trains,
    ``cfg.vision_lr_scale > 0``); ``cfg.drop_share`` of the steps run under a pre-LLM method.

    ``rng`` draws the derived turns of each example. Returns the steps taken; ``seconds`` (a
    wall-clock budget) replaces ``cfg.stage2_steps`` when given.
    """
    optimizer = _optimizer(model, head, cfg)
    run = _Run(model, processor, cfg, log)
    model.train()
    run.tower.requires_grad_(not run.frozen)  # frozen: no autograd graph through the tower at all
    schedule = Schedule(cfg.stage2_steps, seconds, cfg.warmup, cfg.stage2_lr)
    step = 0
    pdrop = td.apply(model, processor, td.PyramidDrop()) if cfg.pdrop else None  # the same stock forward below
    drop_rng = generator(cfg.seed, DROPS)  # its own stream: drop_share 0 leaves the run unchanged
    try:
        while not schedule.done(step):
            set_lr(optimizer, schedule.lr(step))
            method = _drop_method(cfg, drop_rng, step)
            batch, losses = _losses(model, head, processor, cfg, run, batches, rng, method)
            update(optimizer, _total(cfg, losses), model.parameters())
            if step % cfg.log_every == 0:
                _log_step(log, step, schedule, losses, batch, method)
            step += 1
    finally:
        run.tower.requires_grad_(True)
        run.remove_hooks()
        if pdrop is not None:
            pdrop.remove()
    log(f"stage2 done: {step} steps in {time.perf_counter() - schedule.start:.1f}s")
    return step


class _Run:
    """What stays fixed across the steps of stage 2: which losses are on, the class-word ids, the
    patch grid, and the forward hooks that keep the tensors the losses read from the stock forward."""

    def __init__(self, model, processor, cfg: TrainConfig, log: Callable):
        self.words = word_ids(processor.tokenizer)
        self.captured: dict = {}
        self.feature_layer = model.config.vision_feature_layer
        self.tower = model.model.vision_tower
        self.frozen = cfg.vision_lr_scale == 0
        self.hooks = [model.model.multi_modal_projector.register_forward_hook(self._grab_projected)]
        self.ground = cfg.ground_weight > 0 and not cfg.pdrop
        self.tally = cfg.tally_weight > 0 and not cfg.pdrop
        if (cfg.ground_weight > 0 or cfg.tally_weight > 0) and cfg.pdrop:
            log("grounding and tally losses off: with PyramidDrop the grounded layer sees a shortened sequence")
        self.grounded = None
        if self.ground or self.tally:
            self.grounded = model.model.language_model.layers[cfg.ground_layer]
            self.hooks.append(self.grounded.register_forward_pre_hook(self._grab_layer_input, with_kwargs=True))
        if not self.frozen:
            self.hooks.append(self.tower.register_forward_hook(self._grab_tower))
        self.grid = model.config.vision_config.image_size // model.config.vision_config.patch_size

    def _grab_tower(self, module, args, out):  # read now: LLaVA-NeXT later replaces out.pooler_output in place
        self.captured["tower"] = (out.pooler_output, out.hidden_states[self.feature_layer])

    def _grab_projected(self, module, args, out):  # (T, N, D): every view's patches, before unpadding and packing
        self.captured["projected"] = out

    def _grab_layer_input(self, module, args, kwargs):  # the grounded layer's input and RoPE tables
        self.captured["layer"] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _optimizer(model, head: VisionHeads, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the language model and projector, and over the tower and its heads at
    ``cfg.vision_lr_scale`` times the learning rate when that is > 0."""
    vision = list(model.model.vision_tower.parameters()) + list(head.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if cfg.vision_lr_scale > 0:
        groups.append({"params": vision, "lr_scale": cfg.vision_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay)


def _drop_method(cfg: TrainConfig, rng: np.random.Generator, step: int):
    """The pre-LLM method of this step's images (None: all tokens): with probability ``cfg.drop_share``
    HiRED, RandomDrop or SpatialDrop (equally likely) at a budget uniform in ``cfg.drop_budget``."""
    if cfg.drop_share == 0 or rng.random() >= cfg.drop_share:
        return None
    budget = float(rng.uniform(*cfg.drop_budget))
    kind = int(rng.integers(3))
    return (td.HiRED(budget), td.RandomDrop(budget, seed=step), td.SpatialDrop(budget))[kind]


def _forward(model, processor, cfg: TrainConfig, run: _Run, batches: Batches, rng: np.random.Generator, method) -> tuple:
    """Encode the next batch (right padding) and run the stock forward with labels, under the pre-LLM
    ``method`` when given (the processor writes its token count and the encoder drops).

    Returns (batch, LM loss, the method's ``selections`` or None).
    """
    dropped = td.apply(model, processor, method) if method is not None else None
    try:
        lead = (run.ground or run.tally) and cfg.ground_lead
        examples = [encode_example(processor, s, rng, cfg.extra_turns, cfg.model.tile, cfg.caption,
                                   lead=lead, tally=run.tally, tally_mark=cfg.tally_mark) for s in batches.next()]
        batch = collate(examples, processor.tokenizer.pad_token_id)
        lm_loss = model(**batch["inputs"], labels=batch["labels"]).loss
        selections = dropped.selections if dropped is not None else None
    finally:
        if dropped is not None:
            dropped.remove()
    return batch, lm_loss, selections


def _losses(model, head: VisionHeads, processor, cfg: TrainConfig, run: _Run, batches: Batches,
            rng: np.random.Generator, method) -> tuple[dict, dict]:
    """One step's forward and every stage-2 loss: (batch, {"lm", "cls", "patch", "align", "ground", "tally"});
    the losses that are off are zero."""
    batch, lm_loss, selections = _forward(model, processor, cfg, run, batches, rng, method)
    cls, patch = head.loss(*run.captured.pop("tower"), batch) if not run.frozen else (torch.zeros(()),) * 2
    projected = run.captured.pop("projected")  # with a method: the last image's kept tokens only
    align = torch.zeros(())
    if selections is None:
        align = align_loss(projected, model.get_input_embeddings().weight, batch["patch_targets"], run.words)
    grounding, tallying = _attention_losses(model, cfg, run, batch, selections)
    return batch, {"lm": lm_loss, "cls": cls, "patch": patch, "align": align, "ground": grounding, "tally": tallying}


def _attention_losses(model, cfg: TrainConfig, run: _Run, batch: dict, selections) -> tuple[torch.Tensor, torch.Tensor]:
    """(grounding, tally) losses on the grounded layer's heads ``cfg.ground_head`` / ``cfg.tally_head``.

    Under a pre-LLM method the image tokens are mapped to patches through its ``selections``, and the
    tally is skipped: dropped inputs may have lost whole objects, so the counts are unknown.
    """
    grounding, tallying = torch.zeros(()), torch.zeros(())
    if not (run.ground or run.tally):
        return grounding, tallying
    hidden, rope = run.captured.pop("layer")
    ids = batch["inputs"]["input_ids"]
    mask = batch["inputs"]["attention_mask"].bool()
    token_patch = (batch_token_patches(model, batch) if selections is None
                   else kept_token_patches(ids, selections, run.grid, model.config.image_token_id))
    if run.ground:
        query, target, valid = grounding_targets(batch, token_patch)
        rows = query_attention_rows(run.grounded, hidden, rope, query, key_mask=mask)[:, cfg.ground_head]  # (B, Q, L)
        grounding = ground_loss(rows, target, valid)
    if run.tally and selections is None:
        query, target, _ = grounding_targets(batch, token_patch, key="tally")
        counts, valid = tally_counts(batch["tally"], query.shape[1])
        rows = query_attention_rows(run.grounded, hidden, rope, query, key_mask=mask)[:, cfg.tally_head]
        tallying = tally_loss(rows, query, target, counts, valid, balance=cfg.tally_balance)
    return grounding, tallying


def _total(cfg: TrainConfig, losses: dict) -> torch.Tensor:
    """The weighted sum the step minimises."""
    return (losses["lm"] + cfg.aux_weight * (losses["cls"] + losses["patch"]) + cfg.align_weight * losses["align"]
            + cfg.ground_weight * losses["ground"] + cfg.tally_weight * losses["tally"])


def _log_step(log: Callable, step: int, schedule: Schedule, losses: dict, batch: dict, method) -> None:
    dropped = "" if method is None else f"{type(method).__name__} {method.budget:.2f} "
    log(f"stage2 step {step:5d} lr {schedule.lr(step):.2e} lm_loss {losses['lm'].item():.4f} "
        f"cls_loss {losses['cls'].item():.4f} patch_loss {losses['patch'].item():.4f} align_loss {losses['align'].item():.4f} "
        f"ground_loss {losses['ground'].item():.4f} tally_loss {losses['tally'].item():.4f} "
        f"seq {batch['labels'].shape[1]} {dropped}elapsed {time.perf_counter() - schedule.start:7.1f}s")
