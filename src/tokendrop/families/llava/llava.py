"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one partition of G x G patches per image.

HiRED's phase 1 has nothing to allocate here: the image keeps its top floor(r * N) tokens by the
feature layer's [CLS] attention (the paper's single-partition rule, also used for ShareGPT4V).
Each image gets its own selection (the official code applied image 0's mask to the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.families.llava.common import LlavaStyle
from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout


@dataclass(frozen=True)
class SingleGeometry:
    """One partition of G x G patches whatever the image size (config values only, picklable)."""

    grid: int

    def layout(self, image_size=None) -> Layout:
        return Layout(grid=self.grid)

    def input_layout(self, image_inputs: dict, image_idx: int):
        return self.layout(), None  # every image is resized to one tile


class LlavaAdapter(LlavaStyle):
    name = "llava"
    model_type = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    config_class = "LlavaConfig"
    processor_class = "LlavaProcessor"
    image_processor_class = "transformers.models.llava.image_processing_pil_llava:LlavaImageProcessorPil"
    tiny = "tokendrop.families.llava.tiny:tiny_llava"
    vllm = "tokendrop.families.llava.vllm:TokendropLlavaForConditionalGeneration"
    pre_llm = cls_token = base_image = merges = instruction = True  # the one partition is the whole image

    def __init__(self, model):
        super().__init__(model)
        self.geometry = self.config_geometry(self.config)
        self.grid = self.geometry.grid

    @classmethod
    def config_geometry(cls, config) -> SingleGeometry:
        return SingleGeometry(config.vision_config.image_size // config.vision_config.patch_size)

    def stock_tokens(self, image_size=None, processor=None) -> int:
        return self.grid * self.grid

    def encoder_patch(self, method: PreLLMMethod, record):
        from tokendrop.families.llava.vision import instruction_relevance, pack_merged_single, score_blocks, tower_pass

        layout = self.layout()
        cls = self.config.vision_feature_select_strategy == "default"
        projector = self.base.multi_modal_projector

        def get_image_features(pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
            layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            blocks = score_blocks(method, self.config.vision_config.num_hidden_layers, layer, cls)
            relevance = instruction_relevance(method, self.prompts, blocks, [layout] * pixel_values.shape[0])
            outputs, states, rows = tower_pass(self.tower, pixel_values, layer, blocks, cls=cls, projector=projector,
                                               relevance=relevance)
            features = states[:, int(cls):]  # (T, N, Dv) patches
            packed, selections = [], []
            for i in range(features.shape[0]):
                inputs = {name: row[i : i + 1] for name, row in rows.items()}
                if method.merges:  # [CLS], kept patches, merged rows: their slots in this order
                    merged = method.merge(layout, inputs, cls)[0]
                    packed.append(pack_merged_single(states[i], merged, layout, projector))
                    # merged rows drawn at their targets
                    keep = torch.cat([merged.keep, merged.anchors]).to(features.device)
                else:
                    keep = method.select(layout, inputs)[0].to(features.device)
                    packed.append(projector(features[i, keep]))  # (K, D)
                where = torch.stack([torch.zeros_like(keep), keep // self.grid, keep % self.grid], dim=1)
                if method.merges and merged.cls:  # the [CLS] state: no place on the grid
                    where = torch.cat([where.new_tensor([[0, -1, -1]]), where])
                selections.append(where)
            record(selections)
            outputs.pooler_output = packed
            return outputs

        return get_image_features
