"""Data order: the seeded streams of sample batches the two stages draw from.

Every random stream of a run has its own generator, seeded ``(cfg.seed, stream)``: stage 1's batches,
stage 2's batches (shared with the derived turns of its examples), the glyph sheets, and the choice of
dropped inputs. So two runs that share a stage-1 checkpoint see the same stage-2 batches, and turning
one option off leaves the other streams unchanged.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from tokendrop.data import Sample

from recipes.default_model.config import TrainConfig

STAGE1, STAGE2, SHEETS, DROPS = 1, 2, 3, 4  # the streams


def generator(seed: int, stream: int) -> np.random.Generator:
    """The generator of ``stream`` in a run with ``seed``."""
    return np.random.default_rng((seed, stream))


class Batches:
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


def stage2_batches(cfg: TrainConfig, samples: list[Sample], processor, rng: np.random.Generator) -> Batches:
    """Stage 2's stream: ``cfg.stage2_batch`` samples per batch, length-bucketed with ``cfg.stage2_bucket`` > 1."""
    lengths = image_token_counts(processor, samples) if cfg.stage2_bucket > 1 else None
    return Batches(samples, cfg.stage2_batch, rng, lengths, cfg.stage2_bucket)
