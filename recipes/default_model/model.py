"""Build the tokendrop default model: a stock LLaVA-NeXT with a small CLIP tower and a small Llama LM.

Nothing here is special to tokendrop: the result is a ``LlavaNextForConditionalGeneration`` and a
``LlavaNextProcessor`` that ``from_pretrained`` loads like any hub checkpoint. Only the sizes are
small (112-pixel tiles, patch 14 -> 8x8 = 64 tokens per tile) so the model trains on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from recipes.default_model import CHAT_TEMPLATE

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
PATCH = 14


def pinpoints(tile: int) -> list[list[int]]:
    """The five standard LLaVA-NeXT pinpoints ([height, width]: 1x2, 2x1, 2x2, 3x1, 1x3 tiles) for ``tile``."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the default model (vision tower ``v_*``, language model ``t_*``)."""

    tile: int = 112
    v_hidden: int = 128
    v_layers: int = 4
    v_heads: int = 4
    v_mlp: int = 512
    t_hidden: int = 128
    t_layers: int = 8
    t_heads: int = 4
    t_mlp: int = 384
    t_rope_theta: float = 10000.0  # RoPE base of the language model (Llama's default)
    vocab_size: int = 512  # BPE target; the trained vocabulary may be smaller

    def __post_init__(self):
        if self.tile % PATCH:
            raise ValueError(f"tile must be a multiple of the patch size {PATCH}, got {self.tile}")
        if self.t_layers < 2 or self.v_layers < 2:
            raise ValueError(f"t_layers and v_layers must be >= 2, got {self.t_layers}, {self.v_layers}")
        if self.t_rope_theta <= 1:
            raise ValueError(f"t_rope_theta must be > 1, got {self.t_rope_theta}")
        for name in ("v_hidden", "t_hidden"):
            heads = getattr(self, name[0] + "_heads")
            if getattr(self, name) % heads:
                raise ValueError(f"{name} ({getattr(self, name)}) must be divisible by its number of heads ({heads})")

    def to_dict(self) -> dict:
        return asdict(self)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``.

    Byte-level means any input string can be encoded (unseen words fall back to byte pieces).
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(tokenizer, tile: int = 112):
    """LLaVA-NeXT processor (PIL image processor, anyres with the five pinpoints scaled to ``tile``)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints(tile),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: ModelConfig, tokenizer):
    """A randomly initialised ``LlavaNextForConditionalGeneration`` (fp32, SDPA attention)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=cfg.tile,
        patch_size=PATCH,
        hidden_size=cfg.v_hidden,
        intermediate_size=cfg.v_mlp,
        num_hidden_layers=cfg.v_layers,
        num_attention_heads=cfg.v_heads,
        projection_dim=cfg.v_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.t_hidden,
        intermediate_size=cfg.t_mlp,
        num_hidden_layers=cfg.t_layers,
        num_attention_heads=cfg.t_heads,
        num_key_value_heads=cfg.t_heads,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.t_rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints(cfg.tile),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(cfg.tile // PATCH) ** 2,
        tie_word_embeddings=True,
    )
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
