"""The vision half shared by the LLaVA adapters: run the tower once, read features and [CLS] rows.

Imported when a pre-LLM method is applied (it needs torch and transformers), not by the family
declarations.

T tiles (all partitions of all images, flattened), N patches per tile, Dv tower width.
"""

from __future__ import annotations

import torch

from tokendrop.compat import record_hidden_states
from tokendrop.methods.base import PreLLMMethod
from tokendrop.scoring import cls_attention_row


def feature_block(tower, feature_layer: int) -> int:
    """The encoder block whose output is hidden_states[feature_layer] (-2 -> block 22 of 24)."""
    depth = len(tower.encoder.layers)
    index = feature_layer % (depth + 1)
    if index == 0:
        raise ValueError("vision_feature_layer selects the embeddings; HiRED needs an encoder layer")
    return index - 1


def score_blocks(method: PreLLMMethod, tower, feature_layer: int) -> dict[str, int]:
    """Encoder block (0-based) of every [CLS] row the method needs, validated against the tower.

    A score named X comes from the method's field X_layer (HiRED: init_layer, final_layer).
    """
    depth = len(tower.encoder.layers)
    blocks = {}
    for name, score in method.scores().items():
        block = feature_block(tower, feature_layer) if score.layer is None else score.layer
        if not -depth <= block < depth:
            raise ValueError(f"{name}_layer must be in [{-depth}, {depth}) for a {depth}-layer vision tower, got {block}")
        blocks[name] = block % depth
    return blocks


def tower_pass(tower, pixel_values: torch.Tensor, feature_layer: int, blocks: dict[str, int]):
    """Run the vision tower once (its own attention backend) and read what selection needs.

    Args:
        pixel_values: (T, 3, S, S) every partition of every image.
        blocks: name -> encoder block whose [CLS] row to compute.
    Returns:
        outputs: the tower's output object.
        features: (T, N, Dv) patch features of `feature_layer`, [CLS] dropped.
        rows: name -> (T, N) fp32 [CLS] -> patch attention summed over heads.
    """
    layers = tower.encoder.layers
    feature_index = feature_layer % (len(layers) + 1)
    with record_hidden_states(layers, [feature_index, *blocks.values()]) as hidden:
        outputs = tower(pixel_values, return_dict=True)
    rows = {}
    for name, block in blocks.items():
        row = cls_attention_row(layers[block], hidden[block])  # (T, H, N+1)
        rows[name] = row[:, :, 1:].sum(dim=1)  # (T, N): drop [CLS]->[CLS], sum heads (paper)
    return outputs, hidden[feature_index][:, 1:], rows
