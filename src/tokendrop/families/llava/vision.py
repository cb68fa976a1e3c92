"""The vision half shared by the LLaVA adapters: run the tower once, read features and score rows.

Imported when a pre-LLM method is applied (it needs torch and transformers), not by the family
declarations.

T tiles (all partitions of all images, flattened), N patches per tile, Dv tower width.
"""

from __future__ import annotations

import torch

from tokendrop.compat import record_hidden_states
from tokendrop.methods.base import FEATURE_KINDS, Merged, PreLLMMethod
from tokendrop.scoring import cls_attention_row, received_attention_clip


def feature_block(depth: int, feature_layer: int) -> int:
    """The encoder block whose output is hidden_states[feature_layer] (-2 -> block 22 of 24) in a
    tower of `depth` blocks."""
    index = feature_layer % (depth + 1)
    if index == 0:
        raise ValueError("vision_feature_layer selects the embeddings; HiRED needs an encoder layer")
    return index - 1


def score_blocks(method: PreLLMMethod, depth: int, feature_layer: int, cls: bool = True) -> dict[str, tuple[str, int]]:
    """(kind, encoder block, 0-based) of every score the method reads, validated against a tower of
    `depth` blocks (a config value: `vision_config.num_hidden_layers`); `cls`: the tower has a [CLS]
    token (a "cls" score with a fallback reads the fallback kind on towers without one).

    A score named X comes from the method's field X_layer (HiRED: init_layer, final_layer) or its
    `layer` (DominantDrop); None means the block whose output is `feature_layer`; a `Score.clamp` block
    past the tower's last one is the last one (HiPrune's object layer).
    """
    blocks = {}
    for name, score in method.scores().items():
        kind = score.resolve(cls)
        if kind not in SCORE_KINDS:
            raise ValueError(f"{type(method).__name__} reads a {kind!r} score, which this tower does not "
                             f"compute (known: {', '.join(SCORE_KINDS)})")
        block = feature_block(depth, feature_layer) if score.layer is None else score.layer
        if score.clamp:
            block = min(block, depth - 1)
        if not -depth <= block < depth:
            field = f"{name}_layer" if f"{name}_layer" in method.options() else "layer"
            raise ValueError(f"{field} must be in [{-depth}, {depth}) for a {depth}-layer vision tower, got {block}")
        blocks[name] = (kind, block % depth)
    return blocks


def config_score_blocks(config, method: PreLLMMethod) -> dict[str, tuple[str, int]]:
    """`score_blocks` for a model config whose features are one layer of its tower (`vision_feature_layer`,
    an int): the config-level answer of the [CLS]-tower families (LLaVA, InternVL)."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer must be a single int, got {config.vision_feature_layer!r}")
    cls = config.vision_feature_select_strategy == "default" and config.vision_config.model_type == "clip_vision_model"
    blocks = score_blocks(method, config.vision_config.num_hidden_layers, config.vision_feature_layer, cls)
    if any(kind == "relevance" for kind, _ in blocks.values()):
        check_clip_width(method, config.vision_config.hidden_size)
    return blocks


def check_clip_width(method: PreLLMMethod, width: int) -> None:
    """ValueError unless the method's CLIP head takes the tower's features: its vision width is the tower's."""
    clip = method.clip_config().vision_config.hidden_size
    if clip != width:
        raise ValueError(f"clip: the CLIP's vision width is {clip}, the model's vision tower's is {width}: its "
                         "post_layernorm and visual_projection do not apply to this tower's features (pass the "
                         "CLIP checkpoint the tower comes from)")


def tower_pass(tower, pixel_values: torch.Tensor, feature_layer: int, blocks: dict[str, tuple[str, int]], cls: bool = True,
               projector=None, relevance=None):
    """Run the vision tower once (its own attention backend) and read what selection needs.

    Args:
        pixel_values: (T, 3, S, S) every partition of every image.
        blocks: name -> (score kind, encoder block) of every score to compute.
        cls: the tower puts a [CLS] token in front of the patches (CLIP; SigLIP has none).
        projector: the multi-modal projector, for "projected" inputs.
        relevance: features (T, N, Dv) -> (T, N), for "relevance" inputs (the method's, with each
            tile's instruction).
    Returns:
        outputs: the tower's output object.
        features: (T, N + cls, Dv) features of `feature_layer`, [CLS] first when the tower has one.
        scores: name -> fp32 per patch: "cls", (T, N) the [CLS] row summed over heads; "received",
            (T, N) the attention each patch receives averaged over heads and queries; "features",
            (T, N, Dv) `features`; "projected", (T, N, D) the projector run on every tile's tokens;
            "keys", (T, N, hd) the block's keys averaged over heads; "relevance", (T, N)
            `relevance(patch features)`.
    """
    layers = tower.encoder.layers
    feature_index = feature_layer % (len(layers) + 1)
    scored = [block for kind, block in blocks.values() if kind not in ("features", "projected", "relevance")]
    with record_hidden_states(layers, [feature_index, *scored]) as hidden:
        outputs = tower(pixel_values, return_dict=True)
    first = int(cls)  # the first patch column
    states = hidden[feature_index]
    features = states[:, first:]  # (T, N, Dv) patches: what "relevance" scores ([CLS] has no CLIP image embed here)
    return outputs, states, {name: relevance(features) if kind == "relevance" else
                             block_input(kind, layers[block], hidden.get(block), features, first, projector)
                             for name, (kind, block) in blocks.items()}


def instruction_relevance(method: PreLLMMethod, prompts, blocks: dict[str, tuple[str, int]], layouts: list):
    """features (T, N, Dv) -> (T, N): the method's relevance of every tile to its image's instruction
    (`tokendrop.instructions`), for `tower_pass`; None when the method reads no relevance.

    Args:
        prompts: the `PromptCapture` apply() set on the family; layouts: every image's `Layout`, in order.
    """
    if not any(kind == "relevance" for kind, _ in blocks.values()):
        return None
    texts = prompts.per_image([method.num_tokens(layout) for layout in layouts])
    tiles = [text for text, layout in zip(texts, layouts) for _ in range(layout.num_partitions)]
    return lambda features: method.relevance(features, tiles)


def block_input(kind: str, layer, hidden, features: torch.Tensor, first: int, projector) -> torch.Tensor:
    """One input of `tower_pass`: a score of `layer` from its input `hidden` (T, L, Dv), or a feature kind."""
    if kind == "features":
        return features.detach().float()
    if kind == "projected":
        with torch.no_grad():
            return projector(features).float()  # a per-token MLP: every tile's rows as the stock model projects them
    if kind == "keys":
        return head_mean_keys(layer, hidden)[:, first:]  # (T, N, hd)
    if kind == "cls":
        row = cls_attention_row(layer, hidden)  # (T, H, N+1)
        return row[:, :, 1:].sum(dim=1)  # (T, N): drop [CLS]->[CLS], sum heads (paper)
    return received_attention_clip(layer, hidden)[:, first:]  # (T, N)


def merged_parts(merged: Merged, states: torch.Tensor, projector) -> tuple[torch.Tensor, torch.Tensor]:
    """One partition's fed [CLS] state and merged rows, each through the stock projector (a per-token MLP).

    Args:
        merged: the method's answer for the partition (`PreLLMMethod.merge`).
        states: (L, Dv) the partition's feature-layer states, [CLS] first (when `merged.cls`).
    Returns:
        cls: (1 or 0, D) the projected [CLS] state; rows: (M, D) the projected merged rows.
    """
    cls = projector(states[: int(merged.cls)])
    return cls, projector(merged.rows.to(states.dtype))


def pack_merged_single(states: torch.Tensor, merged: Merged, layout, projector) -> torch.Tensor:
    """One single-partition image's tokens under a merging method (LLaVA-1.5), in the official order: its
    [CLS] state (when fed), the kept patches, the merged rows, each through the stock projector (the
    transformers path and the vLLM model class both call this, each with its own projector).

    Args:
        states: (L, Dv) the image's feature-layer states, [CLS] first when the tower has one (L = N + 1).
        merged: the method's answer for the partition (`PreLLMMethod.merge`); layout: the image's `Layout`.
    Returns:
        (merged.num_tokens, D)
    """
    features = states[states.shape[0] - layout.patches :]  # (N, Dv) patches
    head, tail = merged_parts(merged, states, projector)
    return torch.cat([head, projector(features[merged.keep.to(states.device)]), tail])


def head_mean_keys(layer, hidden: torch.Tensor) -> torch.Tensor:
    """(T, L, hd) fp32: a CLIP / SigLIP layer's key projections of its input (T, L, Dv), mean over heads
    (VisionZip's metric, as its official attention returns them: before any softmax, bias included)."""
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.layer_norm1(hidden)
        T, L, _ = x.shape
        return attn.k_proj(x).view(T, L, attn.num_heads, attn.head_dim).float().mean(dim=2)


SCORE_KINDS = ("cls", "received", *FEATURE_KINDS, "relevance")
