"""``TrainConfig``: everything a training run of the default model depends on, checked on creation.

The recipe and what each option is for: docs/training_recipe.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recipes.default_model.model import ModelConfig
from recipes.default_model.targets import TALLY_MARKS


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
    centre_weight: float = 0.0  # stage-1 loss: mark the patch holding each object's centre (0: off)
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
    tally_balance: bool = False  # every count n weighs the same in the tally loss (n >= 2 is rare in the data)
    tally_mark: str = "objects"  # the tally's object tokens: "objects" (all) or "centres" (one patch per object per view)
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
