"""Loading a model and its processor the way users do (`from_pretrained` on an id or a folder).

The same path loads `llava-hf/llava-v1.6-vicuna-7b-hf` on a user's GPU and the bundled model here.
On CPU the model runs in fp32 (bf16 is several times slower on CPUs without bf16 units); on CUDA
in the checkpoint's own dtype.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

SUPPORTED = ("LlavaNextForConditionalGeneration", "LlavaForConditionalGeneration")


def bundled_model_path() -> Path | None:
    """The trained model shipped inside the package, if this install has it."""
    path = Path(str(resources.files("tokendrop") / "assets" / "model"))
    return path if (path / "config.json").exists() else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str, device: torch.device | str | None = None):
    """(model, processor) from a hub id or a local folder, in eval mode on `device`."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    device = torch.device(device) if device is not None else default_device()
    config = AutoConfig.from_pretrained(name_or_path)
    architecture = (config.architectures or [None])[0]
    if architecture not in SUPPORTED:
        raise ValueError(f"model {name_or_path!r} is a {architecture}; supported: {', '.join(SUPPORTED)}")
    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = getattr(transformers, architecture).from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    return model, processor


def format_prompt(processor, question: str) -> str:
    """The model's own prompt around one image and a question (chat template when it has one)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{processor.image_token}\n{question}"
