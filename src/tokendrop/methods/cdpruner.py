"""CDPruner: keep the tokens a conditional DPP picks: diverse, and relevant to the instruction.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", arXiv 2506.10967. Official code: github.com/Theia-4869/CDPruner, commit 9541616 read
(`llava/model/llava_arch.py` `encode_images`, `llava/model/multimodal_encoder/clip_encoder.py`
`load_text_tower` and `forward(images, texts)`).

  1. similarity S_ij = cosine of the projected features (`Score` "projected": the rows the LLM gets), fp32;
  2. relevance r_i = minus the cosine between token i's CLIP image embedding
     `visual_projection(post_layernorm(feature-block state))` and the CLIP text embedding of the
     instruction (the prompt cut into segments of the text tower's length, mean over segments);
     min-max normalised over the image: (r - min + 1e-6) / (max - min);
  3. kernel L_ij = r_i * S_ij * r_j (the conditional DPP);
  4. B = floor(budget * P * N) tokens per image, split evenly over the P partitions as the official
     LLaVA-NeXT code keeps the same count in the base image and every tile (`even_counts`);
  5. every partition: fast greedy MAP inference of the DPP (incremental Cholesky: each step takes the
     token of largest remaining gain d_j^2, ties to the lower index); kept in raster order.
Relevance arrives as `scores["relevance"]` (P, N), computed by the family with `relevance()` from the
feature block and the sample's prompt text (capability "instruction"); `select` normalises it.

The CLIP: `clip` is a transformers `CLIPModel` (with `clip_tokenizer`) or a path / hub id from which
both are loaded on first use; by default the checkpoint LLaVA-1.5 / LLaVA-NeXT's tower comes from, as
the official loads the text tower of its vision tower's checkpoint.

Deviations from the official code:
  - Relevance is normalised per image (the official normalises over the whole batch of tiles and
    images, so a sample's tokens would depend on its batch), over its tokens that survive unpadding.
  - The instruction is the sample's prompt text (its token ids decoded, placeholders, padding and
    special tokens removed: `tokendrop.instructions`); the official passes the dataset's question with
    "Answer the question using a single word or phrase." cut off.
  - Exact counts known before encoding: B = floor(budget * P * N) per image (official: T per
    partition); shares B // P, the first B % P partitions one more, capped at the tokens that survive
    unpadding, which alone are candidates (the official picks among all of a tile's tokens and
    unpadding then drops the padding ones).
  - A step whose best gain is not positive (the kernel's rank is spent: more picks than feature
    dimensions, or duplicate tokens) takes that token without a Cholesky update instead of dividing by
    sqrt(gain <= 0) (NaN in the official, which then picks token 0 again and keeps fewer).
  - An image whose relevance is the same for every token is read as relevance 1 (the official divides by 0).
  - A zero feature vector has norm 1e-12 (no 0 / 0); the text segments are padded with id 0, as the
    official, and every step is in fp32 (official: the kernel in fp32, the features in fp16).
  - Row newlines are dropped by default (`keep_newlines=True` keeps them, as the official).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod, Score, set_field
from tokendrop.methods.fastervlm import even_counts
from tokendrop.methods.layout import Layout

#: the CLIP the official loads the text tower from: LLaVA-1.5 / LLaVA-NeXT's vision tower checkpoint
OFFICIAL_CLIP = "openai/clip-vit-large-patch14-336"
#: added to the relevance before dividing by its range (the official's constant)
RELEVANCE_EPS = 1e-6


@dataclass(frozen=True, repr=False)
class CDPruner(PreLLMMethod):
    """Keep the tokens a conditional DPP picks: diverse projected features, relevant to the instruction (CDPruner).

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep (official: T tokens per partition of N).
        keep_newlines: pack one newline token per unpadded canvas row (LLaVA-NeXT), as the official does.
        clip: a CLIP checkpoint (folder or hub id, loaded on first use with `CLIPModel.from_pretrained`
            and `AutoTokenizer`), or a transformers `CLIPModel` whose vision width is the model's tower's.
        clip_tokenizer: the tokenizer of `clip` when `clip` is a model (required then); a path, or None
            to load it from `clip`'s folder.
    """

    name = "cdpruner"

    clip: str | object = OFFICIAL_CLIP
    clip_tokenizer: object | None = None

    def __post_init__(self):
        super().__post_init__()
        clip, tok = self.clip, self.clip_tokenizer
        if isinstance(clip, str):
            if not clip.strip():
                raise ValueError("clip must be a CLIP checkpoint (a folder or hub id) or a transformers CLIPModel, got ''")
            set_field(self, "clip", clip.strip())
        elif not all(hasattr(clip, a) for a in ("vision_model", "visual_projection", "text_model", "text_projection")):
            raise TypeError(f"clip must be a CLIP checkpoint (a folder or hub id) or a transformers CLIPModel, "
                            f"got {type(clip).__name__}")
        elif tok is None:
            raise TypeError("clip_tokenizer is required when clip is a model: pass the CLIPModel's tokenizer")
        if tok is not None and not (isinstance(tok, str) or callable(tok)):
            raise TypeError(f"clip_tokenizer must be a tokenizer, a folder or hub id, or None; got {type(tok).__name__}")

    def __repr__(self) -> str:
        def show(value):
            return repr(value) if value is None or isinstance(value, str) else f"<{type(value).__name__}>"

        return (f"CDPruner(budget={self.budget!r}, keep_newlines={self.keep_newlines!r}, clip={show(self.clip)}, "
                f"clip_tokenizer={show(self.clip_tokenizer)})")

    def __getstate__(self):  # a loaded checkpoint is not carried along (DataLoader workers): the path is
        return {k: v for k, v in vars(self).items() if k != "_loaded"}

    @classmethod
    def tiny_options(cls) -> dict:
        """A tiny random CLIP whose vision width is the tiny models' tower's (tests, no download)."""
        from tokendrop.tiny import tiny_clip

        model, tokenizer = tiny_clip()
        return {"clip": model, "clip_tokenizer": tokenizer}

    def scores(self) -> dict[str, Score]:
        return {"projected": Score("projected"), "relevance": Score("relevance")}

    def counts(self, layout: Layout, scores=None) -> list[int]:
        return even_counts(self.budget, layout)

    def select(self, layout: Layout, scores: dict) -> list[torch.Tensor]:
        features, relevance = scores["projected"], scores["relevance"].float()  # (P, N, D), (P, N)
        valid = layout.valid().to(features.device)
        # 2. min-max over the image's candidates (the official: over the batch)
        low, high = relevance[valid].min(), relevance[valid].max()
        if high > low:
            relevance = (relevance - low + RELEVANCE_EPS) / (high - low)
        else:  # nothing to tell the tokens apart (the official divides by 0): diversity alone
            relevance = torch.ones_like(relevance)
        keep = []
        for p, count in enumerate(self.counts(layout)):  # 4.
            candidates = valid[p].nonzero().squeeze(1)  # (V,)
            unit = features[p, candidates].float()
            unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
            r = relevance[p, candidates]
            kernel = r[:, None] * (unit @ unit.T) * r[None, :]  # 1. 3. (V, V)
            keep.append(candidates[greedy_map(kernel, count)].sort().values)  # 5.
        return keep

    # ---- the instruction side (the family calls it for Score kind "relevance") ---------------------
    def relevance(self, features: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """Step 2 before normalising: minus the cosine of every token's CLIP image embedding to the
        instruction's CLIP text embedding, averaged over the text's segments.

        Args:
            features: (T, N, Dv) feature-block states of T partitions (the tower's, [CLS] dropped).
            instructions: the prompt text of each partition's sample (T strings).
        Returns:
            (T, N) fp32.
        """
        clip, _ = self.loaded()
        with torch.no_grad():
            head = clip.visual_projection
            image = head(clip.vision_model.post_layernorm(features.to(head.weight.dtype))).float()  # (T, N, C)
            image = image / image.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            texts = {text: self.text_embeds(text) for text in dict.fromkeys(instructions)}  # each (M, C)
            return torch.stack([-(image[t] @ texts[text].T).mean(dim=-1) for t, text in enumerate(instructions)])

    def text_embeds(self, text: str) -> torch.Tensor:
        """(M, C) unit CLIP text embeddings of `text` cut into M segments of the text tower's length
        (the last padded with id 0 and a zero mask, as the official)."""
        clip, tokenizer = self.loaded()
        length = clip.config.text_config.max_position_embeddings
        ids = torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        segments = max(1, -(-ids.numel() // length))
        padded = torch.zeros(segments * length, dtype=torch.long)
        padded[: ids.numel()] = ids
        mask = (torch.arange(segments * length) < ids.numel()).long()
        device = clip.text_projection.weight.device
        pooled = clip.text_model(input_ids=padded.view(segments, length).to(device),
                                 attention_mask=mask.view(segments, length).to(device)).pooler_output
        embeds = clip.text_projection(pooled).float()
        return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def clip_config(self):
        """The CLIP's config (a checkpoint's is read without its weights)."""
        if not isinstance(self.clip, str):
            return self.clip.config
        if "_loaded" in vars(self):
            return self._loaded[0].config
        from transformers import CLIPConfig

        try:
            return CLIPConfig.from_pretrained(self.clip)
        except OSError as err:  # no such folder or hub id (or no network): the user's value, named in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"clip: cannot read a CLIP checkpoint at {self.clip!r}: {first}") from err

    def loaded(self):
        """(CLIPModel, tokenizer): `clip` itself, or the checkpoint loaded once."""
        if "_loaded" not in vars(self):
            object.__setattr__(self, "_loaded", load_clip(self.clip, self.clip_tokenizer))
        return self._loaded


def load_clip(clip, tokenizer):
    """(CLIPModel in eval mode, tokenizer) from a model or a checkpoint, the tokenizer from its own path when given."""
    from transformers import AutoTokenizer, CLIPModel

    if isinstance(clip, str):
        source = clip
        clip = CLIPModel.from_pretrained(clip).eval()
        tokenizer = AutoTokenizer.from_pretrained(source) if tokenizer is None else tokenizer
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return clip, tokenizer


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018): (k,) long indices into `kernel` (V, V), in pick order.

    Each step takes j = argmax of the remaining gains d^2 (initially the kernel's diagonal; ties to
    the lower index), then updates every token's Cholesky row: e = (L_j - c_j . C) / d_j, d^2 -= e^2.
    A step with no positive gain left picks without an update (the kernel's rank is spent).
    """
    count = kernel.shape[0]
    k = min(k, count)
    gains = kernel.diagonal().clone()  # (V,) d^2
    rows = torch.zeros(k, count, dtype=kernel.dtype, device=kernel.device)  # (k, V) Cholesky rows c
    picks = torch.empty(k, dtype=torch.long, device=kernel.device)
    taken = torch.zeros(count, dtype=torch.bool, device=kernel.device)
    for i in range(k):
        j = torch.argmax(gains.masked_fill(taken, float("-inf")))
        picks[i], taken[j] = j, True
        if gains[j] > 0:
            rows[i] = (kernel[j] - rows[:i, j] @ rows[:i]) / gains[j].sqrt()
            gains = gains - rows[i].square()
    return picks
