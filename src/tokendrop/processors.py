"""Image-only twins of the processors that own a video processor (the Qwen-VL and LLaVA-OneVision families').

The video processors need torchvision, which many CPU machines cannot install; images do not. The
twin of a `transformers.<Name>Processor` is `tokendrop.processors.<Name>Processor`: the same class
with `video_processor=None`, whose sub-processors are the image processor and the tokenizer. It
pickles (DataLoader workers: the class is found by its name in this module), saves with
`save_pretrained` (the files the stock processor writes, without a video processor) and loads with
`from_pretrained` (the checkpoint's processor settings and chat template, the image processor that
`AutoImageProcessor` picks: the PIL one without torchvision).

    processor = image_only(processor_class)(image_processor=images, tokenizer=tok)   # a transformers class
    processor = load_image_only(family.processor_class, "Qwen/Qwen2-VL-2B-Instruct")   # its name, a checkpoint
"""

from __future__ import annotations

_TWINS: dict[str, type] = {}


class ImageOnly:
    """Mixin before a transformers processor class: no video processor, in every ProcessorMixin path."""

    video_processor = None

    @classmethod
    def from_dict(cls, processor_dict: dict, **kwargs):
        """from_pretrained's last step: a stock __init__ that requires its video processor (Gemma 4's) gets None."""
        return super().from_dict({**processor_dict, "video_processor": None}, **kwargs)

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        """from_pretrained's last step before transformers 5.21 (which has no `from_dict` step there): the same."""
        return super().from_args_and_dict(args, {**processor_dict, "video_processor": None}, **kwargs)

    @classmethod
    def get_attributes(cls) -> list[str]:
        """The stock sub-processors except the video processor (what __init__ takes, save and load write)."""
        return [name for name in super().get_attributes() if "video" not in name]


def image_only(processor_class: type) -> type:
    """The image-only twin of a `transformers` processor class that owns a video processor.

    Raises:
        TypeError: `processor_class` is not a class exported by `transformers`.
    """
    import transformers

    name = getattr(processor_class, "__name__", None)
    if not isinstance(processor_class, type) or getattr(transformers, name or "", None) is not processor_class:
        raise TypeError(f"processor_class must be a processor class exported by transformers, got {processor_class!r}")
    return _twin(name)


def _twin(name: str) -> type:
    """The class `tokendrop.processors.<name>`, built on first use."""
    if name not in _TWINS:
        import transformers

        stock = getattr(transformers, name)
        # the stock name: save_pretrained writes it into processor_config.json for AutoProcessor to read
        _TWINS[name] = type(name, (ImageOnly, stock, _without_video_keyword()),
                            {"__module__": __name__, "__qualname__": name,
                             "__doc__": f"{name} without its video processor."})
    return _TWINS[name]


def _without_video_keyword() -> type:
    """A `ProcessorMixin` that drops a `video_processor=None` keyword: placed after the stock class in a
    twin's bases, it catches the stock __init__'s own `super().__init__(..., video_processor=...)`
    (Gemma 4's passes it by keyword; positional ones beyond the attributes are dropped by the mixin)."""
    if "_NoVideoKeyword" not in _TWINS:
        from transformers.processing_utils import ProcessorMixin

        class _NoVideoKeyword(ProcessorMixin):
            def __init__(self, *args, **kwargs):
                if kwargs.pop("video_processor", None) is not None:
                    raise TypeError("an image-only processor takes no video processor")
                super().__init__(*args, **kwargs)

        _TWINS["_NoVideoKeyword"] = _NoVideoKeyword
    return _TWINS["_NoVideoKeyword"]


def __getattr__(name: str):
    """`tokendrop.processors.<Name>Processor`, the twins (pickle finds them by these names)."""
    if name.endswith("Processor") and not name.startswith("_"):
        import transformers

        if isinstance(getattr(transformers, name, None), type):
            return _twin(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def owns_video_processor(processor_class: str) -> bool:
    """Whether the transformers processor class of that name has a video processor."""
    import transformers

    stock = getattr(transformers, processor_class, None)
    return isinstance(stock, type) and any("video" in name for name in stock.get_attributes())


def load_image_only(processor_class: str, name_or_path: str):
    """The image-only twin of `processor_class` (a transformers class name) from a checkpoint folder or id."""
    import transformers

    return image_only(getattr(transformers, processor_class)).from_pretrained(name_or_path)
