"""Two-stage training of the default model, as plain PyTorch loops: ``train(TrainConfig(...))``.

Stage 1 (``stage1``) trains the vision tower alone; stage 2 (``stage2``) the whole VLM through the
stock forward. The recipe, and how it got there: docs/training_recipe.md.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from tokendrop.data import Sample, load_dataset

from recipes.default_model.checkpoint import save_model
from recipes.default_model.config import TrainConfig
from recipes.default_model.data_order import STAGE2, generator, stage2_batches
from recipes.default_model.match_init import start_matching_heads
from recipes.default_model.model import build_model, build_processor, train_tokenizer
from recipes.default_model.stage1 import vision_stage
from recipes.default_model.stage2 import train_vlm
from recipes.default_model.vision_heads import VisionHeads
from recipes.default_model.words import tokenizer_corpus

_SAVE_MARGIN = 20.0  # seconds kept free at the end of a time-budgeted run for saving


def build(cfg: TrainConfig, samples: list[Sample]) -> tuple:
    """(processor, model, vision heads) of a fresh run: tokenizer trained on ``samples``, random weights."""
    tokenizer = train_tokenizer(tokenizer_corpus(samples), cfg.model.vocab_size)
    heads = VisionHeads(cfg.model.v_hidden, centre=cfg.centre_weight > 0)
    return build_processor(tokenizer, cfg.model.tile), build_model(cfg.model, tokenizer), heads


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple:
    """Run both stages and save the model; returns (model, processor, seconds).

    With ``cfg.stage1_checkpoint`` naming an existing file, stage 1 is loaded from it instead of
    run (the vision tower and its training heads); otherwise stage 1 runs and is saved there. Each
    stage draws its data order from its own generator, so two runs that share a stage-1
    checkpoint see the same stage-2 batches (e.g. vanilla vs ``pdrop``).
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    samples = _training_samples(cfg.train_dir)
    processor, model, head = build(cfg, samples)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{len(samples)} training samples, vocab {len(processor.tokenizer)}, {n_params / 1e6:.2f}M parameters")
    steps1 = vision_stage(model, head, processor, cfg, samples, log)
    start_matching_heads(model, processor, cfg)
    rng2 = generator(cfg.seed, STAGE2)  # stage 2's batches and the derived turns of its examples
    batches2 = stage2_batches(cfg, samples, processor, rng2)
    budget2 = None
    if cfg.minutes is not None:  # what is left of the budget, minus a margin for saving
        budget2 = max(1.0, cfg.minutes * 60 - (time.perf_counter() - start) - _SAVE_MARGIN)
    start2 = time.perf_counter()
    steps2 = train_vlm(model, head, processor, cfg, batches2, rng2, log, seconds=budget2)
    model.eval()
    seconds = time.perf_counter() - start
    done = {"train_seconds": round(seconds, 1), "stage2_seconds": round(time.perf_counter() - start2, 1),
            "parameters": n_params, "stage1_steps_done": steps1, "stage2_steps_done": steps2}
    save_model(model, processor, cfg.out_dir, cfg, done)
    log(f"saved to {cfg.out_dir} after {seconds / 60:.1f} min")
    return model, processor, seconds


def _training_samples(train_dir: str) -> list[Sample]:
    samples = load_dataset(train_dir)
    if "objects" not in samples[0].meta:
        raise ValueError(f"{train_dir}: training needs synthetic data with 'objects' (tokendrop data)")
    return samples
