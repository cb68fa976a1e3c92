"""Tiny random-weight LLaVA models built from configs, with a tokenizer trained in a second.

For tests and for trying the library without any download. The widths are toy-sized; the
structure (CLIP tower with [CLS], anyres tiles, unpad, newlines, Llama LM, SDPA) is the real one.
"""

from __future__ import annotations

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A red circle and a blue square.",
    "Q: what colour is the triangle? A: green. Q: how many shapes are there? A: three.",
    "Is there a star in the picture? yes no maybe the digit seven is written on the box.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()[]{}<>-_/\\",
]


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with LLaVA's special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def _vision_config(tile: int, layers: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=tile, patch_size=14, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=4)


def _text_config(vocab: int, layers: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2)


def tiny_llava_next(tile: int = 112, vision_layers: int = 3, text_layers: int = 4, kv_heads: int = 4, seed: int = 0):
    """(model, processor): a random `LlavaNextForConditionalGeneration` with 5 pinpoints scaled to `tile`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_tokenizer()
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    config = LlavaNextConfig(vision_config=_vision_config(tile, vision_layers),
                             text_config=_text_config(len(tok), text_layers, kv_heads),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def tiny_llava(tile: int = 112, vision_layers: int = 3, text_layers: int = 4, kv_heads: int = 4, seed: int = 0):
    """(model, processor): a random LLaVA-1.5-style `LlavaForConditionalGeneration`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = tiny_tokenizer()
    config = LlavaConfig(vision_config=_vision_config(tile, vision_layers),
                         text_config=_text_config(len(tok), text_layers, kv_heads),
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def image_only(processor_class):
    """A subclass of `processor_class` that accepts `video_processor=None`.

    Processors that own a video processor (LLaVA-OneVision, Qwen2-VL, ...) refuse to build without
    one, and the video processors need torchvision, which these CPU machines cannot import.
    """

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def tiny_llava_onevision(tile: int = 56, vision_layers: int = 2, text_layers: int = 6, kv_heads: int = 2, seed: int = 0):
    """(model, processor): a random `LlavaOnevisionForConditionalGeneration`, SigLIP tower (no [CLS]),
    Qwen2 LM with grouped-query attention and qkv biases."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tok = tiny_tokenizer()
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=tile, patch_size=14, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=vision_layers, num_attention_heads=4),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                                num_attention_heads=4, num_key_value_heads=kv_heads, pad_token_id=3, bos_token_id=1,
                                eos_token_id=2),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    grid = tile // 14
    processor = image_only(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                                    num_image_tokens=grid * grid, vision_feature_select_strategy="full")
    return model, processor
