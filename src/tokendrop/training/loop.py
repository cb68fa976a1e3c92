"""Two-stage training of the default model, as plain PyTorch loops.

Stage 1 (vision): the CLIP tower alone learns multi-label prediction from its [CLS] output
(``pooler_output`` = post_layernorm(CLS)) of which shapes, colours, (colour, shape) pairs and glyphs
are visible, on the base image and on every anyres tile. A tile's [CLS] thus has to attend to the
glyph in that tile: the meaning HiRED relies on when it ranks tokens by [CLS] attention.

Stage 2 (VLM): the stock ``model(**inputs, labels=labels)`` forward, LM loss on answer tokens only
(labels -100 elsewhere), plus the stage-1 [CLS] loss as an auxiliary, read from the vision tower's
output through a forward hook (no second vision pass).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import tokendrop as td
from tokendrop.data.dataset import Sample, load_dataset
from tokendrop.data.synth import COLORS, GLYPHS, SHAPES, TEMPLATES
from tokendrop.training import ANSWER_TEMPLATE, PROMPT_TEMPLATE
from tokendrop.training.batches import collate, encode_example, encode_views
from tokendrop.training.model import ModelConfig, build_model, build_processor, train_tokenizer
from tokendrop.training.targets import CAPTION_QUESTION, LABELS, PATCH_FIELDS, caption

_SAVE_MARGIN = 20.0  # seconds kept free at the end of a time-budgeted run for saving


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved next to the model as training_args.json)."""

    train_dir: str
    out_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    stage1_steps: int = 350
    stage1_batch: int = 24  # images per step (each gives 3-5 views)
    stage1_lr: float = 1e-3
    stage2_steps: int = 760
    stage2_batch: int = 8
    stage2_lr: float = 1e-3
    vision_lr_scale: float = 0.3  # stage-2 learning rate of the vision tower, relative
    aux_weight: float = 0.5  # weight of the [CLS] loss in stage 2
    extra_turns: int = 5  # derived question/answer turns appended to each training sequence
    caption: bool = True  # a "What is in the image?" turn listing the objects left to right
    warmup: int = 50
    weight_decay: float = 0.05
    threads: int = 2
    log_every: int = 20
    save_fp16: bool = False
    minutes: float | None = None  # wall-clock budget: stages run by time instead of by step count
    stage1_share: float = 0.25  # share of ``minutes`` given to stage 1
    pdrop: bool = False  # stage 2 with PyramidDrop (tokendrop.PyramidDrop(), default schedule) patched in

    def __post_init__(self):
        for name in ("stage1_batch", "stage2_batch", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_steps", "stage2_steps", "extra_turns", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0 or None, got {self.minutes}")
        if not 0.0 < self.stage1_share < 1.0:
            raise ValueError(f"stage1_share must be in (0, 1), got {self.stage1_share}")


class _Schedule:
    """Learning rate and stopping rule of one stage: by step count, or by wall-clock seconds.

    By steps the run is bit-for-bit reproducible (same seed, same thread count). By time the
    cosine schedule follows the elapsed share of the budget; the steps actually taken are logged
    and saved, so passing them as step counts reproduces the run exactly.
    """

    def __init__(self, steps: int, seconds: float | None, warmup: int, peak: float):
        self.steps, self.seconds, self.warmup, self.peak = steps, seconds, warmup, peak
        self.start = time.perf_counter()

    def progress(self, step: int) -> float:
        if self.seconds is None:
            return step / max(1, self.steps)
        return (time.perf_counter() - self.start) / self.seconds

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0 if self.seconds is not None else step >= self.steps

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        return self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress(step)))))


def tokenizer_corpus(samples: list[Sample]) -> list[str]:
    """Text the tokenizer is trained on: every template filled in, the prompt, and all answers."""
    texts = [PROMPT_TEMPLATE.replace("<image>", "")]
    for s in SHAPES:
        for c in COLORS:
            texts += [t.format(shape=s, color=c) for t in TEMPLATES.values()]
    answers = list(COLORS) + list(GLYPHS) + ["yes", "no", "0", "1", "2", "3", "4", "5"]
    texts += [ANSWER_TEMPLATE.format(answer=a) for a in answers]
    texts += [CAPTION_QUESTION] + [ANSWER_TEMPLATE.format(answer=caption(s.meta["objects"])) for s in samples[:2000] if "objects" in s.meta]
    texts += [s.question for s in samples[:2000]] + [ANSWER_TEMPLATE.format(answer=s.answer) for s in samples[:2000]]
    return texts


def cls_loss(head: torch.nn.Module, pooled: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked multi-label BCE on [CLS] outputs. pooled (T, Dv), targets/mask (T, K)."""
    logits = head(pooled)  # (T, K)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


class VisionHeads(torch.nn.Module):
    """Training-only heads on the vision tower: [CLS] multi-label and per-patch classes (not saved in the model)."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, len(LABELS))
        self.sizes = [len(v) for v in PATCH_FIELDS.values()]
        self.patch = torch.nn.Linear(width, sum(self.sizes))

    def loss(self, pooled: torch.Tensor, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([CLS] loss, patch loss). pooled (T, Dv) [CLS] outputs, hidden (T, 1 + N, Dv) the feature layer."""
        cls = cls_loss(self.cls, pooled, batch["targets"], batch["mask"])
        feats = hidden[:, 1:]  # (T, N, Dv): what the LM sees
        logits = self.patch(feats).split(self.sizes, dim=-1)  # 3 x (T, N, C)
        target = batch["patch_targets"]  # (T, N, 3)
        losses = [F.cross_entropy(lg.flatten(0, 1), target[..., k].flatten(), ignore_index=-100)
                  for k, lg in enumerate(logits)]
        return cls, sum(losses) / len(losses)


class _Batches:
    """Endless, seeded stream of sample batches (a new permutation each epoch)."""

    def __init__(self, samples: list[Sample], batch: int, rng: np.random.Generator):
        self.samples, self.batch, self.rng = samples, batch, rng
        self.order, self.pos = rng.permutation(len(samples)), 0

    def next(self) -> list[Sample]:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.samples)), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return [self.samples[int(i)] for i in idx]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_vision(model, head, image_processor, cfg: TrainConfig, batches: _Batches, log: Callable) -> int:
    """Stage 1: [CLS] multi-label pre-training of the vision tower alone; returns the steps taken."""
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay)
    tower.train()
    seconds = None if cfg.minutes is None else cfg.minutes * 60 * cfg.stage1_share
    schedule = _Schedule(cfg.stage1_steps, seconds, cfg.warmup, cfg.stage1_lr)
    step = 0
    while not schedule.done(step):
        _set_lr(optimizer, schedule.lr(step))
        batch = encode_views(image_processor, batches.next(), cfg.model.tile)
        out = tower(pixel_values=batch["pixel_values"], output_hidden_states=True)
        cls, patch = head.loss(out.pooler_output, out.hidden_states[model.config.vision_feature_layer], batch)
        loss = cls + patch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % cfg.log_every == 0:
            log(f"stage1 step {step:5d} lr {schedule.lr(step):.2e} cls_loss {cls.item():.4f} patch_loss {patch.item():.4f} "
                f"views {batch['pixel_values'].shape[0]} elapsed {time.perf_counter() - schedule.start:7.1f}s")
        step += 1
    log(f"stage1 done: {step} steps in {time.perf_counter() - schedule.start:.1f}s")
    return step


def _stage2_optimizer(model, head, cfg: TrainConfig) -> torch.optim.AdamW:
    vision = list(model.model.vision_tower.parameters()) + list(head.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [
        {"params": rest, "lr_scale": 1.0},
        {"params": vision, "lr_scale": cfg.vision_lr_scale},
    ]
    return torch.optim.AdamW(groups, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay)


def train_vlm(model, head, processor, cfg: TrainConfig, batches: _Batches, rng, log: Callable, seconds=None) -> int:
    """Stage 2: the stock LLaVA-NeXT forward with LM loss on answers + the auxiliary [CLS] loss.

    Returns the steps taken; ``seconds`` (a wall-clock budget) replaces ``cfg.stage2_steps`` when given.
    """
    optimizer = _stage2_optimizer(model, head, cfg)
    captured: dict = {}
    layer = model.config.vision_feature_layer

    def grab(module, args, out):  # read now: LLaVA-NeXT later replaces out.pooler_output in place
        captured["tower"] = (out.pooler_output, out.hidden_states[layer])

    hook = model.model.vision_tower.register_forward_hook(grab)
    model.train()
    schedule = _Schedule(cfg.stage2_steps, seconds, cfg.warmup, cfg.stage2_lr)
    step = 0
    pdrop = td.apply(model, processor, td.PyramidDrop()) if cfg.pdrop else None  # the same stock forward below
    try:
        while not schedule.done(step):
            _set_lr(optimizer, schedule.lr(step))
            examples = [encode_example(processor, s, rng, cfg.extra_turns, cfg.model.tile, cfg.caption) for s in batches.next()]
            batch = collate(examples, processor.tokenizer.pad_token_id)
            lm_loss = model(**batch["inputs"], labels=batch["labels"]).loss
            cls, patch = head.loss(*captured.pop("tower"), batch)
            aux = cls + patch
            loss = lm_loss + cfg.aux_weight * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % cfg.log_every == 0:
                log(f"stage2 step {step:5d} lr {schedule.lr(step):.2e} lm_loss {lm_loss.item():.4f} "
                    f"cls_loss {cls.item():.4f} patch_loss {patch.item():.4f} seq {batch['labels'].shape[1]} "
                    f"elapsed {time.perf_counter() - schedule.start:7.1f}s")
            step += 1
    finally:
        hook.remove()
        if pdrop is not None:
            pdrop.remove()
    log(f"stage2 done: {step} steps in {time.perf_counter() - schedule.start:.1f}s")
    return step


def save(model, processor, out_dir: str | Path, cfg: TrainConfig, extra: dict) -> None:
    """``save_pretrained`` for model and processor (safetensors), plus training_args.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if cfg.save_fp16:
        import copy

        to_save = copy.deepcopy(model).half()
    to_save.save_pretrained(out)
    processor.save_pretrained(out)
    args = asdict(cfg)
    args.update(extra)
    (out / "training_args.json").write_text(json.dumps(args, indent=2) + "\n")


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple:
    """Run both stages and save the model; returns (model, processor, seconds)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    samples = load_dataset(cfg.train_dir)
    if "objects" not in samples[0].meta:
        raise ValueError(f"{cfg.train_dir}: training needs synthetic data with 'objects' (tokendrop data)")
    tokenizer = train_tokenizer(tokenizer_corpus(samples), cfg.model.vocab_size)
    processor = build_processor(tokenizer, cfg.model.tile)
    model = build_model(cfg.model, tokenizer)
    head = VisionHeads(cfg.model.v_hidden)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{len(samples)} training samples, vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters")
    batches1 = _Batches(samples, cfg.stage1_batch, rng)
    steps1 = train_vision(model, head, processor.image_processor, cfg, batches1, log)
    batches2 = _Batches(samples, cfg.stage2_batch, rng)
    budget2 = None
    if cfg.minutes is not None:  # what is left of the budget, minus a margin for saving
        budget2 = max(1.0, cfg.minutes * 60 - (time.perf_counter() - start) - _SAVE_MARGIN)
    steps2 = train_vlm(model, head, processor, cfg, batches2, rng, log, seconds=budget2)
    model.eval()
    seconds = time.perf_counter() - start
    done = {"train_seconds": round(seconds, 1), "parameters": n_params, "stage1_steps_done": steps1,
            "stage2_steps_done": steps2}
    save(model, processor, cfg.out_dir, cfg, done)
    log(f"saved to {cfg.out_dir} after {seconds / 60:.1f} min")
    return model, processor, seconds
