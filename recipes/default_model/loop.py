"""Two-stage training of the default model, as plain PyTorch loops (recipe: docs/training_recipe.md).

Stage 1 (vision): the CLIP tower alone, on scene views and glyph sheets. Multi-label prediction from
its [CLS] output (``pooler_output`` = post_layernorm(CLS)) of which shapes, colours, (colour, shape)
pairs and glyphs are visible, on the base image and on every anyres tile: a tile's [CLS] has to
attend to the glyph in that tile, the meaning HiRED relies on when it ranks tokens by [CLS]
attention. Per-patch colour / shape / glyph classes on the feature layer the LM receives.

Stage 2 (VLM): the stock ``model(**inputs, labels=labels)`` forward, LM loss on answer tokens only
(labels -100 elsewhere), plus a word-alignment loss on the projector's output and a grounding loss
(one LM attention head must look at the patches each question is about) and a tally loss (another
head's share of attention on itself must be 1 / (n + 1) for n matching objects); a share of the steps
see their images through a pre-LLM dropping method. The tower is frozen by default.
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
from PIL import Image

import tokendrop as td
from tokendrop.data import Sample, load_dataset
from tokendrop.data.synth import COLORS, GLYPHS, SHAPES, TEMPLATES
from tokendrop.scoring import query_attention_rows
from recipes.default_model import ANSWER_TEMPLATE, PROMPT_TEMPLATE
from recipes.default_model.batches import collate, encode_example, encode_sheets, encode_views
from recipes.default_model.model import ModelConfig, build_model, build_processor, train_tokenizer
from recipes.default_model.targets import CAPTION_QUESTION, LABELS, PATCH_FIELDS, TALLY_MARKS, caption

_SAVE_MARGIN = 20.0  # seconds kept free at the end of a time-budgeted run for saving


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved next to the model as training_args.json)."""

    train_dir: str
    out_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    stage1_steps: int = 850
    stage1_batch: int = 16  # images per step (each gives 3-5 views)
    sheets: int = 32  # glyph sheets per stage-1 step (dense glyph-reading material, tokendrop.data.synth.glyph_sheet)
    stage1_lr: float = 1e-3
    centre_weight: float = 0.0  # stage-1 loss: mark the patch holding each object's centre (runs 10-11; 0: off)
    stage2_steps: int = 2650
    stage2_batch: int = 8
    stage2_bucket: int = 1  # stage-2 batches per length-sorted pool (less padding); 1: plain shuffled batches
    stage2_lr: float = 1e-3
    vision_lr_scale: float = 0.0  # stage-2 learning rate of the vision tower, relative (0: frozen, no backward)
    aux_weight: float = 0.5  # weight of the stage-1 losses in stage 2 (when the tower trains)
    align_weight: float = 1.0  # weight of the projector's word-alignment loss in stage 2
    extra_turns: int = 5  # derived question/answer turns appended to each training sequence
    caption: bool = True  # a "What is in the image?" turn listing the objects left to right (last turn)
    ground_weight: float = 1.0  # weight of the grounding loss in stage 2 (0: off)
    ground_layer: int = 3  # LM layer whose attention head ``ground_head`` is grounded
    ground_head: int = 0
    ground_lead: bool = True  # also ground the question's shape word and the tokens up to the answer
    tally_weight: float = 1.0  # weight of the tally loss (head ``tally_head`` of ``ground_layer``; 0: off)
    tally_head: int = 1
    tally_balance: bool = False  # every count n weighs the same in the tally loss (n >= 2 is rare; run 11)
    tally_mark: str = "objects"  # the tally's object tokens: "objects" (all) or "centres" (one patch per object per view; runs 10-11)
    match_init: float = 0.0  # start the grounded and tally heads as word matchers with this logit (0: random start)
    drop_share: float = 0.3  # share of stage-2 steps whose images are dropped (HiRED / random / spatial)
    drop_budget: tuple[float, float] = (0.1, 0.5)  # budget range of those steps (uniform)
    warmup: int = 50
    weight_decay: float = 0.05
    threads: int = 2
    log_every: int = 20
    save_fp16: bool = False
    minutes: float | None = None  # wall-clock budget: stages run by time instead of by step count
    stage1_share: float = 0.25  # share of ``minutes`` given to stage 1
    pdrop: bool = False  # stage 2 with PyramidDrop (tokendrop.PyramidDrop(), default schedule) patched in
    stage1_checkpoint: str | None = None  # file: load stage 1 from it if it exists, else save stage 1 to it

    def __post_init__(self):
        for name in ("stage1_batch", "stage2_batch", "stage2_bucket", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_steps", "stage2_steps", "extra_turns", "warmup", "sheets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ground_weight < 0:
            raise ValueError(f"ground_weight must be >= 0, got {self.ground_weight}")
        if not 0 <= self.ground_layer < self.model.t_layers:
            raise ValueError(f"ground_layer must be in [0, {self.model.t_layers - 1}] (the LM's layers), got {self.ground_layer}")
        if not 0 <= self.ground_head < self.model.t_heads:
            raise ValueError(f"ground_head must be in [0, {self.model.t_heads - 1}] (the LM's heads), got {self.ground_head}")
        if self.tally_weight < 0:
            raise ValueError(f"tally_weight must be >= 0, got {self.tally_weight}")
        if self.tally_weight > 0 and not 0 <= self.tally_head < self.model.t_heads:
            raise ValueError(f"tally_head must be in [0, {self.model.t_heads - 1}] (the LM's heads), got {self.tally_head}")
        if self.match_init < 0:
            raise ValueError(f"match_init must be >= 0, got {self.match_init}")
        if self.centre_weight < 0:
            raise ValueError(f"centre_weight must be >= 0, got {self.centre_weight}")
        if self.tally_mark not in TALLY_MARKS:
            raise ValueError(f"tally_mark must be one of {TALLY_MARKS}, got {self.tally_mark!r}")
        if self.tally_weight > 0 and self.ground_weight > 0 and self.tally_head == self.ground_head:
            raise ValueError(f"tally_head must differ from ground_head ({self.ground_head}): they have different targets")
        if not 0.0 <= self.drop_share <= 1.0:
            raise ValueError(f"drop_share must be in [0, 1], got {self.drop_share}")
        if not 0.0 < self.drop_budget[0] <= self.drop_budget[1] <= 1.0:
            raise ValueError(f"drop_budget must be (low, high) with 0 < low <= high <= 1, got {self.drop_budget}")
        if self.drop_share > 0 and self.pdrop:
            raise ValueError("drop_share > 0 cannot be combined with pdrop (one method per training run)")
        if self.drop_share > 0 and self.vision_lr_scale > 0:
            raise ValueError("drop_share > 0 needs a frozen tower (vision_lr_scale 0): the tower losses need every patch")
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


_NONE_WEIGHT = 0.1  # weight of the glyph field's "none" class: about 60 of a tile's 64 patches hold no glyph


class VisionHeads(torch.nn.Module):
    """Training-only heads on the vision tower: [CLS] multi-label, per-patch classes and (``centre``)
    the object-centre mark (not saved in the model)."""

    def __init__(self, width: int, centre: bool = False):
        super().__init__()
        self.cls = torch.nn.Linear(width, len(LABELS))
        self.sizes = [len(v) for v in PATCH_FIELDS.values()]
        self.patch = torch.nn.Linear(width, sum(self.sizes))
        self.centre = torch.nn.Linear(width, 1) if centre else None
        glyph_weight = torch.ones(len(PATCH_FIELDS["glyph"]))
        glyph_weight[-1] = _NONE_WEIGHT
        self.register_buffer("glyph_weight", glyph_weight, persistent=False)

    def loss(self, pooled: torch.Tensor, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([CLS] loss, patch loss). pooled (T, Dv) [CLS] outputs, hidden (T, 1 + N, Dv) the feature layer."""
        cls = cls_loss(self.cls, pooled, batch["targets"], batch["mask"])
        feats = hidden[:, 1:]  # (T, N, Dv): what the LM sees
        logits = self.patch(feats).split(self.sizes, dim=-1)  # 3 x (T, N, C)
        target = batch["patch_targets"]  # (T, N, 3)
        weights = (None, None, self.glyph_weight)  # PATCH_FIELDS order: colour, shape, glyph
        losses = [F.cross_entropy(lg.flatten(0, 1), target[..., k].flatten(), weight=weights[k], ignore_index=-100)
                  for k, lg in enumerate(logits)]
        return cls, sum(losses) / len(losses)

    def centre_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of "this patch holds an object's centre" on the feature layer.
        hidden (T, 1 + N, Dv), targets (T, N) bool (``targets.centre_targets``)."""
        logits = self.centre(hidden[:, 1:])[..., 0]  # (T, N)
        return F.binary_cross_entropy_with_logits(logits, targets.float())

    def sheet_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Glyph classification on every patch of glyph sheets. hidden (S, 1 + N, Dv), targets (S, N)."""
        glyph = self.patch(hidden[:, 1:]).split(self.sizes, dim=-1)[2]  # (S, N, C)
        return F.cross_entropy(glyph.flatten(0, 1), targets.flatten(), weight=self.glyph_weight, ignore_index=-100)


def word_ids(tokenizer) -> list[torch.Tensor]:
    """Token id of each class word of each ``PATCH_FIELDS`` field ("none" excluded), as it follows a space."""
    out = []
    for values in PATCH_FIELDS.values():
        ids = [tokenizer(" " + v, add_special_tokens=False)["input_ids"] for v in values[:-1]]
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise ValueError(f"every class word must be its own token, got {dict(zip(values, ids))}")
        out.append(torch.tensor([i[0] for i in ids]))
    return out


def init_matching_heads(model, layer: int, heads: list[int], words: torch.Tensor, logit: float, pairs: int = 4) -> None:
    """Start attention ``heads`` of LM layer ``layer`` as content matchers (``TrainConfig.match_init``).

    The grounding and tally losses ask those heads to attend by content (question word -> image
    tokens showing it); from random weights that match first has to emerge, and stage 2 sat on a
    plateau for 1000-2400 steps until it did (runs 5-12). Here the query and key projections of each
    head, on its ``pairs`` most slowly turning RoPE frequency pairs (they rotate least over the
    hundreds of positions between a question and the image tokens), are both set to ``a * B``: B an
    orthonormal basis of the span of ``words`` (embedding rows, (W, D)), ``a`` such that two
    normalised hidden states that both lie along one word score ``logit`` before the softmax.
    The head's other dimensions keep their random start. Weights change in place.
    """
    attn = model.model.language_model.layers[layer].self_attn
    inv_freq = model.model.language_model.rotary_emb.inv_freq  # (hd / 2,): dims j and j + hd / 2 turn at inv_freq[j]
    hd, dim = attn.head_dim, words.shape[1]
    if not 1 <= 2 * pairs <= min(hd, words.shape[0]):
        raise ValueError(f"pairs must be in [1, {min(hd, words.shape[0]) // 2}], got {pairs}")
    slow = inv_freq.argsort()[:pairs]  # slowest frequencies first
    dims = torch.cat([slow, slow + hd // 2])  # (2 * pairs,)
    basis = torch.linalg.svd(F.normalize(words.float(), dim=-1), full_matrices=False).Vh[: 2 * pairs]  # (2 * pairs, D)
    a = math.sqrt(logit * math.sqrt(hd) / dim)  # an RMS-normalised state has norm sqrt(D)
    group = attn.config.num_attention_heads // attn.config.num_key_value_heads
    with torch.no_grad():
        for h in heads:
            attn.q_proj.weight[h * hd + dims] = a * basis.to(attn.q_proj.weight.dtype)
            attn.k_proj.weight[(h // group) * hd + dims] = a * basis.to(attn.k_proj.weight.dtype)


def align_loss(projected: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor, ids: list[torch.Tensor]):
    """Word alignment of the projector's output (the role of LLaVA's feature-alignment stage).

    Each object patch's projected feature, scored against the (tied) word embeddings of the colours,
    shapes and glyphs, must pick its own colour, shape and glyph word: cross-entropy within each
    field. projected (T, N, D), embeddings (vocab, D), targets (T, N, 3) patch classes (-100 ignored,
    the last class of a field = "none", not aligned).
    """
    losses = []
    for k, field_ids in enumerate(ids):
        target = targets[..., k]
        keep = (target >= 0) & (target < len(field_ids))  # object / glyph patches only
        if keep.any():
            logits = projected[keep] @ embeddings[field_ids].T  # (M, C)
            losses.append(F.cross_entropy(logits, target[keep]))
    return sum(losses) / max(1, len(losses))


def image_token_patches(model, input_ids: torch.Tensor, image_sizes: torch.Tensor, views: list[int]) -> torch.Tensor:
    """Which patch every image token of each sequence shows: (B, L) long, ``v * N + n`` for patch n
    of view v (base first), -1 for text and newline tokens.

    Asks the model's own ``pack_image_features`` (unpadding, newlines) to pack patch indices instead
    of features, so the map is the stock layout by construction. ``views`` = views per image.
    """
    base = model.model
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    newline = torch.tensor([-1.0])
    out = torch.full(input_ids.shape, -1, dtype=torch.long)
    for b, v in enumerate(views):
        index = torch.arange(v * n, dtype=torch.float32).view(v, n, 1)  # (V, N, 1): exact in fp32
        packed = base.pack_image_features([index], image_sizes[b : b + 1], "default", image_newline=newline)[0][0]  # (K, 1)
        where = (input_ids[b] == model.config.image_token_id).nonzero().squeeze(1)  # (K,)
        if where.numel() != packed.shape[0]:
            raise ValueError(f"sequence {b} has {where.numel()} image tokens, the image packs to {packed.shape[0]}")
        out[b, where] = packed[:, 0].round().long()
    return out


def kept_token_patches(input_ids: torch.Tensor, selections: list[torch.Tensor], grid: int, image_token_id: int) -> torch.Tensor:
    """``image_token_patches`` for a batch encoded under a pre-LLM method (no newline tokens): the
    handle's ``selections`` (K, 3) (partition, row, col) per image, in packed order. Returns (B, L)."""
    out = torch.full(input_ids.shape, -1, dtype=torch.long)
    for b, where in enumerate(selections):
        pos = (input_ids[b] == image_token_id).nonzero().squeeze(1)  # (K,)
        if pos.numel() != where.shape[0]:
            raise ValueError(f"sequence {b} has {pos.numel()} image tokens, the method kept {where.shape[0]}")
        out[b, pos] = (where[:, 0] * grid + where[:, 1]) * grid + where[:, 2]
    return out


def grounding_targets(batch: dict, patch: torch.Tensor, key: str = "focus") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query positions and target keys of the grounding loss (``key="tally"``: of the tally loss).

    ``patch`` (B, L): the patch each image token shows (``image_token_patches`` / ``kept_token_patches``).
    Returns ``query`` (B, Q) long (the grounded tokens of ``batch["focus"]``: the token predicting each
    answer, and the lead tokens when ``encode_example`` added them), ``target`` (B, Q, L) bool (the
    image tokens of the patches that answer is about) and ``valid`` (B, Q) bool (False for unused
    slots and for answers whose patches were all dropped).
    """
    B, L = patch.shape
    focus = batch[key]
    Q = max(1, max(len(f) for f in focus))
    query = torch.zeros((B, Q), dtype=torch.long)
    target = torch.zeros((B, Q, L), dtype=torch.bool)
    for b, items in enumerate(focus):
        for q, (pos, mask, *_) in enumerate(items):
            flat = mask.flatten()  # (V * N,)
            query[b, q] = pos
            target[b, q] = (patch[b] >= 0) & flat[patch[b].clamp(min=0)]
    return query, target, target.any(dim=-1)


def batch_token_patches(model, batch: dict) -> torch.Tensor:
    """``image_token_patches`` of a stock training batch (``collate``). Returns (B, L)."""
    return image_token_patches(model, batch["inputs"]["input_ids"], batch["inputs"]["image_sizes"], batch["views"])


def tally_counts(tally: list[list[tuple]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching-object counts (B, Q) float and used slots (B, Q) bool of ``batch["tally"]``."""
    counts = torch.zeros((len(tally), width))
    valid = torch.zeros((len(tally), width), dtype=torch.bool)
    for b, items in enumerate(tally):
        for q, (_, _, n) in enumerate(items):
            counts[b, q], valid[b, q] = n, True
    return counts, valid


def tally_loss(rows: torch.Tensor, query: torch.Tensor, target: torch.Tensor, counts: torch.Tensor,
               valid: torch.Tensor, balance: bool = False) -> torch.Tensor:
    """Cross-entropy of the tally head's attention, coarsened to (itself, the matching objects, the rest),
    against (1 / (n + 1), n / (n + 1), 0) for n matching objects.

    The head's output then carries n: its share of the query's own value vector is 1 / (n + 1), so
    "how many" and "is there" become a read-out of one number. rows (B, Q, L) softmax rows of one
    head, query (B, Q) their positions, target (B, Q, L) bool the matching objects' image tokens,
    counts (B, Q) float n, valid (B, Q) bool. ``balance``: every count present in the batch weighs the
    same (the mean over counts of the mean loss per count), as n >= 2 is rare next to n = 0 and 1.
    """
    own = rows.gather(-1, query[..., None])[..., 0].clamp(min=1e-6)  # (B, Q)
    mass = (rows * target).sum(dim=-1).clamp(min=1e-6)  # (B, Q)
    share = counts / (counts + 1)
    loss = -((1 - share) * own.log() + share * mass.log())
    if not balance:
        return (loss * valid).sum() / valid.sum().clamp(min=1)
    per_n = [loss[valid & (counts == n)].mean() for n in counts[valid].unique()]  # one mean per count
    return torch.stack(per_n).mean() if per_n else loss.sum() * 0


def ground_loss(rows: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass an answer's query puts on the patches the answer is about.

    rows (B, Q, L) softmax rows of one head, target (B, Q, L) bool, valid (B, Q) bool.
    """
    mass = (rows * target).sum(dim=-1).clamp(min=1e-6)  # (B, Q)
    return -(mass.log() * valid).sum() / valid.sum().clamp(min=1)


class _Batches:
    """Endless, seeded stream of sample batches (a new permutation each epoch).

    With ``lengths`` (one number per sample) and ``bucket`` > 1, each draw of ``bucket * batch``
    samples is sorted by length and cut into ``bucket`` batches, served in a random order: batches
    of similar length waste less compute on padding. ``bucket`` 1 is the plain shuffled stream.
    """

    def __init__(self, samples: list[Sample], batch: int, rng: np.random.Generator,
                 lengths: np.ndarray | None = None, bucket: int = 1):
        if bucket > 1 and (lengths is None or len(lengths) != len(samples)):
            raise ValueError("bucket > 1 needs one length per sample")
        self.samples, self.batch, self.rng = samples, batch, rng
        self.lengths, self.bucket, self.ready = lengths, bucket, []
        self.order, self.pos = rng.permutation(len(samples)), 0

    def _draw(self) -> np.ndarray:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.samples)), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx

    def next(self) -> list[Sample]:
        if self.bucket == 1:
            idx = self._draw()
        else:
            if not self.ready:
                pool = np.concatenate([self._draw() for _ in range(self.bucket)])
                pool = pool[np.argsort(self.lengths[pool], kind="stable")]  # (bucket * batch,) shortest first
                chunks = [pool[i * self.batch : (i + 1) * self.batch] for i in range(self.bucket)]
                self.ready = [chunks[int(i)] for i in self.rng.permutation(self.bucket)]
            idx = self.ready.pop()
        return [self.samples[int(i)] for i in idx]


def image_token_counts(processor, samples: list[Sample]) -> np.ndarray:
    """Image tokens the stock processor writes for each sample's image (read from the file header)."""
    sizes = []
    for s in samples:
        with Image.open(s.image_path) as im:
            sizes.append((im.height, im.width))
    return np.asarray(processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"])


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_vision(model, head, image_processor, cfg: TrainConfig, batches: _Batches, log: Callable,
                 sheet_rng: np.random.Generator | None = None) -> int:
    """Stage 1: the vision tower alone, on scenes ([CLS] multi-label + per-patch classes) and glyph
    sheets (per-patch glyph classes); returns the steps taken."""
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay)
    tower.train()
    sheet_rng = sheet_rng if sheet_rng is not None else np.random.default_rng((cfg.seed, 3))
    seconds = None if cfg.minutes is None else cfg.minutes * 60 * cfg.stage1_share
    schedule = _Schedule(cfg.stage1_steps, seconds, cfg.warmup, cfg.stage1_lr)
    layer = model.config.vision_feature_layer
    step = 0
    while not schedule.done(step):
        _set_lr(optimizer, schedule.lr(step))
        batch = encode_views(image_processor, batches.next(), cfg.model.tile, centres=cfg.centre_weight > 0)
        pixel_values, n_views = batch["pixel_values"], batch["pixel_values"].shape[0]
        if cfg.sheets:
            sheets = encode_sheets(image_processor, sheet_rng, cfg.sheets, cfg.model.tile)
            pixel_values = torch.cat([pixel_values, sheets["pixel_values"]])
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[layer]
        cls, patch = head.loss(out.pooler_output[:n_views], hidden[:n_views], batch)
        sheet = head.sheet_loss(hidden[n_views:], sheets["glyph_targets"]) if cfg.sheets else torch.zeros(())
        centre = head.centre_loss(hidden[:n_views], batch["centre_targets"]) if cfg.centre_weight > 0 else torch.zeros(())
        loss = cls + patch + sheet + cfg.centre_weight * centre
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % cfg.log_every == 0:
            log(f"stage1 step {step:5d} lr {schedule.lr(step):.2e} cls_loss {cls.item():.4f} patch_loss {patch.item():.4f} "
                f"sheet_loss {sheet.item():.4f} centre_loss {centre.item():.4f} views {n_views} elapsed {time.perf_counter() - schedule.start:7.1f}s")
        step += 1
    log(f"stage1 done: {step} steps in {time.perf_counter() - schedule.start:.1f}s")
    return step


def _stage2_optimizer(model, head, cfg: TrainConfig) -> torch.optim.AdamW:
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


def train_vlm(model, head, processor, cfg: TrainConfig, batches: _Batches, rng, log: Callable, seconds=None) -> int:
    """Stage 2: the stock LLaVA-NeXT forward with LM loss on answers + the projector's word alignment
    + the grounding loss (``cfg.ground_*``) (+ the stage-1 losses as auxiliaries when the tower trains,
    ``cfg.vision_lr_scale > 0``); ``cfg.drop_share`` of the steps run under a pre-LLM method.

    Returns the steps taken; ``seconds`` (a wall-clock budget) replaces ``cfg.stage2_steps`` when given.
    """
    optimizer = _stage2_optimizer(model, head, cfg)
    captured: dict = {}
    layer = model.config.vision_feature_layer
    words = word_ids(processor.tokenizer)

    def grab(module, args, out):  # read now: LLaVA-NeXT later replaces out.pooler_output in place
        captured["tower"] = (out.pooler_output, out.hidden_states[layer])

    def grab_projected(module, args, out):  # (T, N, D): every view's patches, before unpadding and packing
        captured["projected"] = out

    def grab_layer_input(module, args, kwargs):  # the grounded layer's input and RoPE tables
        captured["layer"] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

    tower = model.model.vision_tower
    frozen = cfg.vision_lr_scale == 0
    hooks = [model.model.multi_modal_projector.register_forward_hook(grab_projected)]
    ground = cfg.ground_weight > 0 and not cfg.pdrop
    tally = cfg.tally_weight > 0 and not cfg.pdrop
    if (cfg.ground_weight > 0 or cfg.tally_weight > 0) and cfg.pdrop:
        log("grounding and tally losses off: with PyramidDrop the grounded layer sees a shortened sequence")
    if ground or tally:
        grounded = model.model.language_model.layers[cfg.ground_layer]
        hooks.append(grounded.register_forward_pre_hook(grab_layer_input, with_kwargs=True))
    if not frozen:
        hooks.append(tower.register_forward_hook(grab))
    model.train()
    tower.requires_grad_(not frozen)  # frozen: no autograd graph through the tower at all
    schedule = _Schedule(cfg.stage2_steps, seconds, cfg.warmup, cfg.stage2_lr)
    step = 0
    pdrop = td.apply(model, processor, td.PyramidDrop()) if cfg.pdrop else None  # the same stock forward below
    drop_rng = np.random.default_rng((cfg.seed, 4))  # its own stream: drop_share 0 leaves the run unchanged
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    try:
        while not schedule.done(step):
            _set_lr(optimizer, schedule.lr(step))
            method = _drop_method(cfg, drop_rng, step)
            dropped = td.apply(model, processor, method) if method is not None else None
            try:  # under a pre-LLM method the processor writes its token count and the encoder drops
                examples = [encode_example(processor, s, rng, cfg.extra_turns, cfg.model.tile, cfg.caption,
                                           lead=(ground or tally) and cfg.ground_lead, tally=tally, tally_mark=cfg.tally_mark)
                            for s in batches.next()]
                batch = collate(examples, processor.tokenizer.pad_token_id)
                lm_loss = model(**batch["inputs"], labels=batch["labels"]).loss
                selections = dropped.selections if dropped is not None else None
            finally:
                if dropped is not None:
                    dropped.remove()
            cls, patch = head.loss(*captured.pop("tower"), batch) if not frozen else (torch.zeros(()),) * 2
            projected = captured.pop("projected")  # with a method: the last image's kept tokens only
            align = torch.zeros(())
            if selections is None:
                align = align_loss(projected, model.get_input_embeddings().weight, batch["patch_targets"], words)
            grounding, tallying = torch.zeros(()), torch.zeros(())
            if ground or tally:
                hidden, rope = captured.pop("layer")
                ids = batch["inputs"]["input_ids"]
                mask = batch["inputs"]["attention_mask"].bool()
                token_patch = (batch_token_patches(model, batch) if selections is None
                               else kept_token_patches(ids, selections, grid, model.config.image_token_id))
            if ground:
                query, target, valid = grounding_targets(batch, token_patch)
                rows = query_attention_rows(grounded, hidden, rope, query, key_mask=mask)[:, cfg.ground_head]  # (B, Q, L)
                grounding = ground_loss(rows, target, valid)
            if tally and selections is None:  # dropped inputs may have lost whole objects: counts unknown
                query, target, _ = grounding_targets(batch, token_patch, key="tally")
                counts, valid = tally_counts(batch["tally"], query.shape[1])
                rows = query_attention_rows(grounded, hidden, rope, query, key_mask=mask)[:, cfg.tally_head]
                tallying = tally_loss(rows, query, target, counts, valid, balance=cfg.tally_balance)
            loss = (lm_loss + cfg.aux_weight * (cls + patch) + cfg.align_weight * align
                    + cfg.ground_weight * grounding + cfg.tally_weight * tallying)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % cfg.log_every == 0:
                log(f"stage2 step {step:5d} lr {schedule.lr(step):.2e} lm_loss {lm_loss.item():.4f} "
                    f"cls_loss {cls.item():.4f} patch_loss {patch.item():.4f} align_loss {align.item():.4f} "
                    f"ground_loss {grounding.item():.4f} tally_loss {tallying.item():.4f} "
                    f"seq {batch['labels'].shape[1]} {'' if method is None else type(method).__name__ + ' ' + format(method.budget, '.2f') + ' '}"
                    f"elapsed {time.perf_counter() - schedule.start:7.1f}s")
            step += 1
    finally:
        tower.requires_grad_(True)
        for hook in hooks:
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


def build(cfg: TrainConfig, samples: list[Sample]) -> tuple:
    """(processor, model, vision heads) of a fresh run: tokenizer trained on ``samples``, random weights."""
    tokenizer = train_tokenizer(tokenizer_corpus(samples), cfg.model.vocab_size)
    heads = VisionHeads(cfg.model.v_hidden, centre=cfg.centre_weight > 0)
    return build_processor(tokenizer, cfg.model.tile), build_model(cfg.model, tokenizer), heads


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
    samples = load_dataset(cfg.train_dir)
    if "objects" not in samples[0].meta:
        raise ValueError(f"{cfg.train_dir}: training needs synthetic data with 'objects' (tokendrop data)")
    processor, model, head = build(cfg, samples)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{len(samples)} training samples, vocab {len(processor.tokenizer)}, {n_params / 1e6:.2f}M parameters")
    checkpoint = Path(cfg.stage1_checkpoint) if cfg.stage1_checkpoint else None
    if checkpoint is not None and checkpoint.is_file():
        steps1 = load_stage1(model, head, torch.load(checkpoint, map_location="cpu", weights_only=True))
        log(f"stage1 loaded from {checkpoint} ({steps1} steps)")
    else:
        batches1 = _Batches(samples, cfg.stage1_batch, np.random.default_rng((cfg.seed, 1)))
        steps1 = train_vision(model, head, processor.image_processor, cfg, batches1, log)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"tower": model.model.vision_tower.state_dict(), "head": head.state_dict(), "steps": steps1},
                       checkpoint)
    heads = [h for h, w in ((cfg.ground_head, cfg.ground_weight), (cfg.tally_head, cfg.tally_weight)) if w > 0]
    if cfg.match_init > 0 and heads:
        words = model.get_input_embeddings().weight.detach()[torch.cat(word_ids(processor.tokenizer)[:2])]  # colours, shapes
        init_matching_heads(model, cfg.ground_layer, heads, words, cfg.match_init)
    rng2 = np.random.default_rng((cfg.seed, 2))
    lengths = image_token_counts(processor, samples) if cfg.stage2_bucket > 1 else None
    batches2 = _Batches(samples, cfg.stage2_batch, rng2, lengths, cfg.stage2_bucket)
    budget2 = None
    if cfg.minutes is not None:  # what is left of the budget, minus a margin for saving
        budget2 = max(1.0, cfg.minutes * 60 - (time.perf_counter() - start) - _SAVE_MARGIN)
    start2 = time.perf_counter()
    steps2 = train_vlm(model, head, processor, cfg, batches2, rng2, log, seconds=budget2)
    model.eval()
    seconds = time.perf_counter() - start
    done = {"train_seconds": round(seconds, 1), "stage2_seconds": round(time.perf_counter() - start2, 1),
            "parameters": n_params, "stage1_steps_done": steps1, "stage2_steps_done": steps2}
    save(model, processor, cfg.out_dir, cfg, done)
    log(f"saved to {cfg.out_dir} after {seconds / 60:.1f} min")
    return model, processor, seconds
