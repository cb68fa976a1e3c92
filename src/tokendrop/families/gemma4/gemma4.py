"""Gemma 4 (`Gemma4ForConditionalGeneration`): a vision encoder whose patches are pooled k x k into
LLM tokens, then a decoder with sliding-window and full-attention layers.

The image processor resizes an image, aspect ratio kept, to the largest size whose patches fit
`max_soft_tokens * k^2` with both sides multiples of k * patch pixels (16 * 3 = 48 in the
checkpoints), so an image gives one partition of (H' / 48) x (W' / 48) LLM tokens, raster order,
no [CLS], no base image: the count follows from the size and the processor's budget before anything
is encoded. The processor writes `<|image>` + that many `<|image|>` + `<image|>`.

Pre-LLM methods replace `get_image_features` (an instance attribute, undone by `remove()`): the
stock one (tower, pooler, embedder), then each image's kept rows, in stock order; scored methods
read the tower's attention in the same pass (`scoring.py`). The prompt is then just shorter: the
decoder's 1-D positions, its per-layer inputs (from `input_ids`) and its masks (the bidirectional
image blocks come from `mm_token_type_ids`, which the processor writes for the short prompt) are the
stock model's for that prompt. Videos pass through unpruned.

In-LLM methods run through `Gemma4Decoder` (`tokendrop.engine.decoders`): `Gemma4Model` hands the
decoder its masks already built, so the hook rebuilds them for every shortened sequence from the 2-D
padding mask and `mm_token_type_ids` of the outer call (the sliding layers' bidirectional image
blocks gathered with the kept slots); each kept slot takes its own row of per-layer inputs; the
`shared_kv_states` dict is passed to every layer. Refused: a drop between a layer that stores keys
for KV-shared layers and a layer that reuses them, and ranking with a KV-shared layer
(docs/design.md, "In-LLM on Gemma 4").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tokendrop.families.base import AttentionShapes, Family, Shapes
from tokendrop.lazy import torch
from tokendrop.methods.base import PreLLMMethod
from tokendrop.methods.layout import Layout

IMAGE_PROCESSOR = "transformers.models.gemma4.image_processing_pil_gemma4:Gemma4ImageProcessorPil"
DEFAULT_SOFT_TOKENS = 280  # the image processor's default `max_soft_tokens`

#: Gemma 4's special tokens: turns, image soft token and its begin / end, audio and video tokens
GEMMA4_SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image|>", "<|image>", "<image|>",
                         "<|audio|>", "<|audio>", "<audio|>", "<|video|>"]

#: Gemma 4's chat template, reduced to user turns with images and text (tiny and arch-built models,
#: whose tokenizers carry no template of their own)
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def gemma4_token_ids(tokenizer) -> dict[str, int]:
    """The config fields naming Gemma 4's special tokens, as `tokenizer` numbers them."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image|>"), ("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"),
        ("video_token_id", "<|video|>"), ("audio_token_id", "<|audio|>"), ("boa_token_id", "<|audio>"))}


def image_processor_class() -> type:
    """The PIL image processor (no torchvision)."""
    from tokendrop.families.base import resolve

    return resolve(IMAGE_PROCESSOR)


def processor_class() -> type:
    """The image-only twin of transformers' Gemma 4 processor (its video processor needs torchvision).

    Raises:
        ImportError: this transformers cannot import the processor without torchvision (its module
            imports the torchvision image processor before 5.21); the message says what to install.
    """
    import transformers

    from tokendrop.processors import image_only

    try:
        stock = transformers.Gemma4Processor
    except ImportError as err:
        raise ImportError(f"Gemma 4 needs transformers' Gemma4Processor, which transformers {transformers.__version__} "
                          "cannot import without torchvision (pip install torchvision, or transformers>=5.21)") from err
    return image_only(stock)


@dataclass(frozen=True)
class Gemma4Geometry:
    """Image size -> `Layout` (one partition of pooled tokens) as the Gemma 4 image processor resizes it."""

    patch: int  # pixels per patch side (16)
    pool: int  # patches per LLM token side (3)
    soft_tokens: int  # the processor's `max_soft_tokens`: the most LLM tokens an image gets

    def resized(self, image_size) -> tuple[int, int]:
        """(height, width) in pixels the processor resizes an image of `image_size` to."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

        if image_size is None:
            raise ValueError("image_size must be (height, width): Gemma 4's token count follows from the aspect ratio")
        return get_aspect_ratio_preserving_size(int(image_size[0]), int(image_size[1]), patch_size=self.patch,
                                                max_patches=self.soft_tokens * self.pool**2,
                                                pooling_kernel_size=self.pool)

    def layout(self, image_size) -> Layout:
        height, width = self.resized(image_size)
        side = self.patch * self.pool
        return Layout(grid=height // side, grid_cols=width // side)

    def input_layout(self, image_inputs: dict, image_idx: int):
        """(Layout, resized (height, width)) of image `image_idx` from its `image_position_ids`."""
        rows, cols = patch_grid(torch.as_tensor(image_inputs["image_position_ids"][image_idx]))
        return Layout(grid=rows // self.pool, grid_cols=cols // self.pool), (rows * self.patch, cols * self.patch)


def patch_grid(positions: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of patches of one image from its (max_patches, 2) (x, y) positions (-1: padding)."""
    valid = positions[(positions >= 0).all(dim=-1)]
    if valid.numel() == 0:
        raise ValueError("an image has no patch (image_position_ids are all padding)")
    return int(valid[:, 1].max()) + 1, int(valid[:, 0].max()) + 1


class Gemma4Adapter(Family):
    name = "gemma4"
    model_type = "gemma4"
    model_classes = ("Gemma4ForConditionalGeneration",)
    config_class = "Gemma4Config"
    processor_class = "Gemma4Processor"
    image_processor_class = IMAGE_PROCESSOR
    tiny = "tokendrop.families.gemma4.tiny:tiny_gemma4"
    tokenizer = "tokendrop.families.gemma4.tiny:tiny_gemma4_tokenizer"
    pre_llm = projects_all = True  # the embedder works per token: rows are kept after it
    decoder = "tokendrop.engine.decoders:Gemma4Decoder"
    controls = {"gemma4-budget": "tokendrop.families.gemma4.control:SoftTokenBudget"}  # its own max_soft_tokens
    vllm = "tokendrop.families.gemma4.vllm:TokendropGemma4ForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        self.geometry = self.config_geometry(self.config)

    @classmethod
    def config_capabilities(cls, config) -> set[str]:
        caps = super().config_capabilities(config)
        if config.vision_config is None:  # a text-only checkpoint
            caps.discard("pre_llm")
        return caps

    @classmethod
    def config_geometry(cls, config) -> Gemma4Geometry | None:
        """The pooled-token grid at the config's soft-token budget (a processor's own: `processor_geometry`)."""
        vision = config.vision_config
        if vision is None:
            return None
        soft_tokens = getattr(config, "vision_soft_tokens_per_image", None) or DEFAULT_SOFT_TOKENS
        return Gemma4Geometry(vision.patch_size, vision.pooling_kernel_size, soft_tokens)

    @classmethod
    def config_score_blocks(cls, config, method: PreLLMMethod) -> dict[str, tuple[str, int]]:
        """name -> (score kind, 0-based encoder layer) of every score `method` reads ('received' only: no [CLS]).
        None: the last layer, whose output the pooler averages into the LLM's tokens."""
        depth = config.vision_config.num_hidden_layers
        blocks = {}
        for name, score in method.scores().items():
            if score.kind != "received":
                raise ValueError(f"{type(method).__name__} reads a {score.kind!r} score; the {cls.name} vision encoder "
                                 "has no [CLS] token and gives 'received' attention scores only")
            block = depth - 1 if score.layer is None else score.layer
            if score.clamp:  # a block past the last one reads the last one (`Score.clamp`)
                block = min(block, depth - 1)
            if not -depth <= block < depth:
                raise ValueError(f"layer must be in [{-depth}, {depth}) for a {depth}-layer vision encoder, got {block}")
            blocks[name] = (score.kind, block % depth)
        return blocks

    def hint(self, missing: list[str]) -> str:
        if "cls_token" in missing:
            return ": its vision encoder has no [CLS]; DominantDrop ranks by the attention each token receives"
        if "base_image" in missing:
            return ": an image is one partition, the whole image (BaseOnly would be the stock model)"
        return ""

    @property
    def tower(self):
        return self.base.vision_tower

    # ---- processor -----------------------------------------------------------------------------------
    def processor_geometry(self, processor) -> Gemma4Geometry:
        images = processor.image_processor
        return Gemma4Geometry(images.patch_size, images.pooling_kernel_size, images.max_soft_tokens)

    def processor_expects(self) -> dict:
        vision = self.config.vision_config
        return {"image_processor.patch_size": vision.patch_size, "image_processor.pooling_kernel_size": vision.pooling_kernel_size}

    @classmethod
    def build_processor(cls, image_processor, tokenizer, chat_template=None, **settings):
        from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

        return processor_class()(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor,
                                 tokenizer=tokenizer, video_processor=None,
                                 chat_template=chat_template or GEMMA4_CHAT_TEMPLATE, **settings)

    @classmethod
    def bind_tokenizer(cls, config, tokenizer) -> None:
        for name, value in gemma4_token_ids(tokenizer).items():
            setattr(config, name, value)

    # ---- pre-LLM -------------------------------------------------------------------------------------
    def encoder_patch(self, method: PreLLMMethod, record):
        """A `get_image_features` with the stock signature: the stock one, then each image's kept rows."""
        from tokendrop.families.gemma4.scoring import ReceivedScores

        stock = type(self.base).get_image_features.__get__(self.base)  # this model's stock method
        blocks = self.config_score_blocks(self.config, method)
        pool = self.config.vision_config.pooling_kernel_size

        @functools.wraps(stock)  # its signature: generate() picks the arguments it passes from it
        def get_image_features(pixel_values, image_position_ids=None, **kwargs):
            tuple_out = kwargs.pop("return_dict", True) is False
            with ReceivedScores(self.tower, blocks, image_position_ids, pool) as scores:
                outputs = stock(pixel_values, image_position_ids, return_dict=True, **kwargs)
            packed, selections = [], []
            for i, rows in enumerate(outputs.pooler_output):  # (N_i, D) per image, raster order of its grid
                r, c = patch_grid(image_position_ids[i])
                layout = Layout(grid=r // pool, grid_cols=c // pool)
                keep = method.select(layout, {name: s[i][None] for name, s in scores.items()})[0].to(rows.device)
                packed.append(rows[keep])  # (K, D)
                selections.append(torch.stack([torch.zeros_like(keep), keep // layout.cols, keep % layout.cols], dim=1))
            outputs.pooler_output = tuple(packed)
            record(selections)
            return outputs.to_tuple() if tuple_out else outputs

        return get_image_features

    # ---- costs ---------------------------------------------------------------------------------------
    def vision_work(self, layout) -> tuple[int, int]:
        """One pass over the padded patch sequence: the processor pads every image to `max_soft_tokens * k^2`
        patches and the encoder runs on all of them (padding is masked, not skipped)."""
        return 1, self.geometry.soft_tokens * self.geometry.pool**2

    def token_pixels(self) -> int:
        return self.geometry.patch * self.geometry.pool

    def shapes(self) -> Shapes:
        """The decoder's widths layer by layer: sliding-window layers (many narrow heads, a window) and
        full-attention layers (fewer, wider heads whose keys may also be the values: no v_proj)."""
        lm, tower, vision = self.language_model, self.tower, self.config.vision_config
        attn, mlp = lm.layers[0].self_attn, lm.layers[0].mlp
        projection = self.base.embed_vision.embedding_projection.weight  # (d, vd)
        layers = tuple(AttentionShapes(a.q_proj.weight.shape[0], a.k_proj.weight.shape[0],
                                       values=getattr(a, "v_proj", None) is not None,
                                       window=a.sliding_window if a.is_sliding else None)
                       for a in (layer.self_attn for layer in lm.layers))
        return Shapes(d=attn.q_proj.weight.shape[1], m=mlp.gate_proj.weight.shape[0], depth=len(lm.layers),
                      q_width=attn.q_proj.weight.shape[0], kv_width=attn.k_proj.weight.shape[0],
                      vocab=self.model.lm_head.weight.shape[0], vd=vision.hidden_size, vm=vision.intermediate_size,
                      vision_depth=len(tower.encoder.layers), patch_inputs=tower.patch_embedder.input_proj.weight.shape[1],
                      projector=(projection.shape[1], projection.shape[0]), vision_tokens_extra=0,
                      vision_mlp_matrices=3, attention=layers,
                      tied_embeddings=bool(self.config.get_text_config().tie_word_embeddings))
