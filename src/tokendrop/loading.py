"""Loading a model and its processor the way users do (`from_pretrained` on an id or a folder).

The same path loads `llava-hf/llava-v1.6-vicuna-7b-hf` on a user's GPU and the bundled model here.
On CPU the model runs in fp32 (bf16 is several times slower on CPUs without bf16 units); on CUDA
in the checkpoint's own dtype.

    model, processor = load_model("llava-hf/llava-v1.6-vicuna-7b-hf")
    model, processor, note = load_default(None)      # the bundled model (or a tiny random one)
    prompt = format_prompt(processor, "What is written on the sign?")
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

TINY = "tiny"  # `--model tiny`: a tiny random LLaVA-NeXT (no download; answers are noise)


class ModelLoadError(ValueError):
    """A model id or folder that cannot be loaded (missing, not a supported checkpoint, offline)."""


def bundled_model_path() -> Path | None:
    """The trained model shipped inside the package, if this install has it."""
    path = Path(str(resources.files("tokendrop") / "assets" / "model"))
    return path if (path / "config.json").exists() else None


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str, device=None):
    """(model, processor) from a hub id or a local folder, in eval mode on `device`.

    Raises:
        ModelLoadError: the id or folder cannot be loaded, or its architecture is not supported
            (the message names both and says why).
    """
    import torch

    from tokendrop.families.base import resolve
    from tokendrop.registry import family_of, supported_models

    device = torch.device(device) if device is not None else default_device()
    config = load_config(name_or_path)
    architecture = (config.architectures or [None])[0]
    try:
        family = family_of(architecture=architecture)
    except ValueError:
        what = architecture or f"{config.model_type!r} model with no architecture named"
        raise ModelLoadError(f"{name_or_path!r} is a {what}; supported: {', '.join(supported_models())}") from None
    dtype = torch.float32 if device.type == "cpu" else "auto"
    try:
        processor = load_processor(name_or_path, family.processor_class)  # first: it fails faster than weights
        model = resolve(architecture).from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as err:  # missing or corrupt weights / processor files
        raise ModelLoadError(f"{name_or_path!r} cannot be loaded: {first_line(err)}") from err
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    return model, processor


def save_hub_layout(model, processor, folder, **save_options) -> Path:
    """Save `model` (and `processor`, unless None) to `folder` as its family's hub checkpoints are laid out.

    transformers 5 `save_pretrained` writes some weight names its own way (the LLaVA towers without
    their `vision_model.` level); the family's `hub_layout` rules rename them back, so that the folder
    loads like a hub checkpoint in transformers 5 (the same tensors) and in stock vLLM, which reads the
    hub layout only. Every safetensors shard (and the shard index) is rewritten; `save_options` go to
    the model's `save_pretrained` (e.g. `max_shard_size`).
    """
    import json

    from safetensors.torch import load_file, save_file

    from tokendrop.families import family_of

    folder = Path(folder)
    model.save_pretrained(folder, **save_options)
    if processor is not None:
        processor.save_pretrained(folder)
    hub_name = _hub_name(family_of(architecture=type(model).__name__))
    if hub_name is None:
        return folder
    for shard in sorted(folder.glob("*.safetensors")):
        save_file({hub_name(k): v for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"] = {hub_name(k): v for k, v in content["weight_map"].items()}
        index.write_text(json.dumps(content, indent=2) + "\n")
    return folder


def check_hub_layout(name_or_path: str) -> None:
    """Raise ModelLoadError when a local folder's weights are not in its family's hub layout, the only one
    vLLM loads (a folder written by transformers 5 `save_pretrained`); reads weight names only. Hub ids,
    folders without safetensors and architectures tokendrop does not know pass."""
    from safetensors import safe_open

    from tokendrop.families import family_of

    folder = Path(name_or_path)
    shards = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not shards:
        return
    try:
        hub_name = _hub_name(family_of(architecture=(load_config(name_or_path).architectures or [None])[0]))
    except ValueError:
        return
    for shard in shards if hub_name else []:
        with safe_open(shard, "pt") as weights:
            name = next((name for name in weights.keys() if hub_name(name) != name), None)
        if name is not None:
            raise ModelLoadError(f"{name_or_path!r} has its weights in the layout transformers 5 save_pretrained "
                                 f"writes ({name!r}, the hub's checkpoints have {hub_name(name)!r}), which vLLM cannot "
                                 "load: re-save it with tokendrop.loading.save_hub_layout(model, processor, folder)")


def _hub_name(family):
    """weight name -> its name in the family's hub layout (`Family.hub_layout`); None: the same names."""
    import re

    rules = [(re.compile(pattern), to) for pattern, to in family.hub_layout]
    if not rules:
        return None

    def hub_name(name: str) -> str:
        for pattern, to in rules:
            name = pattern.sub(to, name)
        return name

    return hub_name


def load_config(name_or_path: str):
    """The config of a hub id or a local folder (`AutoConfig`), without loading any weight.

    Raises:
        ModelLoadError: no such folder (a spec that looks like a local path: absolute, ./ or ../, or
            with a separator and an existing parent), or the id or folder has no readable config.
    """
    from transformers import AutoConfig

    if looks_local(name_or_path) and not Path(name_or_path).exists():
        raise ModelLoadError(f"no such folder: {name_or_path}")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # no such id, offline, not a model folder
        raise ModelLoadError(f"{name_or_path!r} cannot be loaded: {first_line(err)}") from err


def looks_local(spec: str) -> bool:
    """Whether a --model spec names a local path rather than a hub id ("org/name" has a separator
    too, but its parent "org" is not a folder here)."""
    if os.path.isabs(spec) or spec.startswith(("./", "../", f".{os.sep}", f"..{os.sep}")):
        return True
    return os.sep in spec and Path(spec).parent.is_dir()


def load_processor(name_or_path: str, processor_class: str):
    """The checkpoint's processor (`AutoProcessor`); without torchvision, when `processor_class` owns a
    video processor, its image-only twin (`tokendrop.processors`: video processors need torchvision,
    images do not).

    Raises:
        ModelLoadError: the image-only processor cannot be built either (the message names torchvision).
    """
    from transformers import AutoProcessor

    from tokendrop.processors import load_image_only, owns_video_processor

    if importlib.util.find_spec("torchvision") is not None or not owns_video_processor(processor_class):
        return AutoProcessor.from_pretrained(name_or_path)
    try:
        return load_image_only(processor_class, name_or_path)
    except ImportError as err:
        raise ModelLoadError(f"{name_or_path!r}: its {processor_class} needs torchvision here (pip install "
                             f"torchvision), and the image-only processor failed: {first_line(err)}") from err


def load_default(name_or_path: str | None = None, seed: int = 0, device=None):
    """(model, processor, note): `name_or_path`, else the bundled model, else a tiny random one.

    `name_or_path` may also be "tiny" for the tiny random LLaVA-NeXT. `note` says what was loaded
    when it was not the caller's choice (None otherwise). `device` as in `load_model`.
    """
    if name_or_path not in (None, TINY):
        return (*load_model(name_or_path, device), None)
    bundled = bundled_model_path()
    if name_or_path is None and bundled is not None:
        return (*load_model(str(bundled), device), f"the bundled trained model, from_pretrained({str(bundled)!r})")
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=8, seed=seed)
    if device is not None:
        model.to(device)
    processor.tokenizer.padding_side = "left"
    why = "" if name_or_path == TINY else " (no bundled model in this install)"
    return model, processor, f"tiny_llava_next(), a tiny RANDOM-WEIGHT LLaVA-NeXT{why}: answers are noise"


def format_prompt(processor, question: str, images: int = 1) -> str:
    """The model's prompt for `images` images (default one) and a question: the chat template when the
    processor has one, else one "<image>\\n" per image before the question; a question that already holds
    the image token is used as is."""
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in question:
        return question
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"{image_token}\n" * images + question


def first_line(err: Exception) -> str:
    """The first line of an error's message (the class name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
