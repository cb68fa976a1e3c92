"""A budget (and the served method's other options) per request, through vLLM's `mm_processor_kwargs`.

    client.chat.completions.create(..., extra_body={"mm_processor_kwargs": {"budget": 0.1}})
    llm.generate({"prompt": ..., "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"budget": 0.1}})

What vLLM 0.32 does with a request's `mm_processor_kwargs`, and what tokendrop does at each step:
  1. The OpenAI server refuses them (400) unless started with `--trust-request-mm-kwargs`, which
     `tokendrop serve` passes. The flag also lets clients pass any Hugging Face processor option, so
     tokendrop's processor accepts only the served method's options (`request_method`) and refuses
     every other key: the flag opens nothing else.
  2. vLLM hashes the dict with each image into the processor-cache, encoder-cache and prefix-cache
     keys, so the same image at two budgets never shares a cached row (and a request with no dict
     hashes apart from one that spells the default: two entries, both correct).
  3. The processor's `apply` validates the dict (`RequestMethodProcessor`): an exception there becomes
     a 400 and the engine keeps serving (one raised inside the model would end the engine). The
     count comes from where the dict is (`_apply_hf_processor_main`, around `_call_hf_processor`, and
     `_get_prompt_updates`), never from `get_num_image_tokens`, which vLLM calls without it.
  4. The model never sees the request: each image's method travels as a field of the processor
     output (`FIELD`, the method's settings as JSON bytes, batched per image), which vLLM caches and
     hashes with the image; the model class reads it (`RequestMethodModel`).
  5. vLLM sizes its encoder cache (and profiles memory) at startup from the count hooks, with no
     request: they answer for the largest per-request ask (`largest`: budget 1.0, newlines kept).
Options that change which vision blocks are scored (e.g. HiRED's `init_layer`) are refused per request:
the model class hooks the scored blocks when it is built. Changing the method per request is not
supported: start one server per method.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from tokendrop.methods.base import PreLLMMethod

#: the processor-output field holding each image's method settings (uint8 JSON bytes, one row per image)
FIELD = "tokendrop_method"
#: what a request may ask for at most: vLLM's startup sizing answers for it
LARGEST = {"budget": 1.0, "keep_newlines": True}


def settings_json(method: PreLLMMethod) -> str:
    """The method's name and options as JSON: the config's `tokendrop_method` and the per-image field."""
    return json.dumps({"name": method.name, **{f: getattr(method, f) for f in method.options()}})


@functools.lru_cache(maxsize=256)
def method_from_json(settings: str) -> PreLLMMethod:
    """The method `settings_json` wrote (JSON lists read back as tuples)."""
    from tokendrop.registry import method_class

    fields = json.loads(settings)
    cls = method_class(fields.pop("name"))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def largest(method: PreLLMMethod) -> PreLLMMethod:
    """The served method at the largest count a request may ask for (budget 1.0, newlines kept)."""
    return dataclasses.replace(method, **LARGEST)


def request_method(served: PreLLMMethod, kwargs, config=None) -> PreLLMMethod:
    """The method a request asks for: `served` with the request's options; ValueError naming the field.

    Args:
        served: the server's method (its `--budget` is the default).
        kwargs: the request's `mm_processor_kwargs` (option name -> value).
        config: the model's HF config: when given, the options may not change the scored vision blocks.
    """
    options = type(served).options()
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"mm_processor_kwargs: {unknown[0]!r} is not an option of the served method "
                         f"{type(served).__name__}; allowed per request: {', '.join(options)}")
    if not kwargs:
        return served
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        method = dataclasses.replace(served, **values)  # the method class's own validation
    except (TypeError, ValueError) as error:
        raise ValueError(f"mm_processor_kwargs: {error}") from None
    if config is not None:
        check_same_blocks(served, method, values, config)
    return method


def check_same_blocks(served: PreLLMMethod, method: PreLLMMethod, values: dict, config) -> None:
    """ValueError naming the options that move the scored vision blocks away from the served ones."""
    from tokendrop.vllm.checks import score_blocks

    if score_blocks(config, method) == score_blocks(config, served):
        return
    moved = [k for k in values if score_blocks(config, dataclasses.replace(served, **{k: values[k]}))
             != score_blocks(config, served)] or sorted(values)
    now = ", ".join(f"{k}={getattr(served, k)!r}" for k in moved)
    raise ValueError(f"mm_processor_kwargs: {', '.join(moved)} cannot change per request: it moves the vision "
                     f"blocks the server scores, hooked at startup ({now}); start a server with that setting")


def encode(method: PreLLMMethod, images: int):
    """(images, bytes) uint8: the method's settings once per image (the processor-output `FIELD`)."""
    import torch

    row = torch.frombuffer(bytearray(settings_json(method).encode()), dtype=torch.uint8)
    return row.expand(images, -1).clone()


def decode(rows) -> list[PreLLMMethod]:
    """Each image's method from a batch of `FIELD` rows (a (B, bytes) tensor or a list of (bytes,) rows)."""
    return [method_from_json(bytes(row.tolist()).decode()) for row in rows]


class RequestMethodProcessor:
    """Mixin for a vLLM multimodal processor (put first): each image's method from the request.

    The processing info answers `served_method()` and `kept_count(method, item_idx, mm_items, out_item)`.
    """

    def served(self) -> PreLLMMethod:
        return self.info.served_method()

    def without_ours(self, kwargs) -> dict:
        """The processor kwargs without the method's options: vLLM's and Hugging Face's calls never see them."""
        ours = type(self.served()).options()
        return {k: v for k, v in kwargs.items() if k not in ours}

    def apply(self, inputs, timing_ctx):
        # refuse a bad request here, in the front end: vLLM answers 400 and keeps serving
        request_method(self.served(), inputs.hf_processor_mm_kwargs, self.info.get_hf_config())
        return super().apply(inputs, timing_ctx)

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        # vLLM profiles memory and sizes its encoder cache on these: the largest count a request may ask for
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, **LARGEST})

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # every family's processing runs through here (LLaVA-OneVision calls the HF processor itself, not
        # `_call_hf_processor`): the method's options kept from vLLM's and Hugging Face's calls, the field added
        from vllm.multimodal.parse import ImageProcessorItems

        options = {k: v for k, v in hf_kwargs.items() if k in type(self.served()).options()}
        method = request_method(self.served(), options)
        out = super()._apply_hf_processor_main(mm_items, self.without_ours(hf_kwargs))
        images = mm_items.get("image")
        if isinstance(images, ImageProcessorItems) and len(images):
            out[FIELD] = encode(method, len(images))  # (images, bytes): the model reads each image's method here
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = super()._get_mm_fields_config(hf_inputs, self.without_ours(hf_processor_mm_kwargs))
        return {**fields, FIELD: MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.parse import ImageEmbeddingItems

        updates = super()._get_prompt_updates(mm_items, self.without_ours(hf_processor_mm_kwargs), out_mm_kwargs)

        def kept_placeholders(item_idx: int, update):
            item = out_mm_kwargs["image"][item_idx]
            if isinstance(mm_items.get("image"), ImageEmbeddingItems):  # the caller's tokens, counted by their size
                return update.replacement(item_idx) if callable(update.replacement) else update.replacement
            if FIELD not in item:
                raise RuntimeError(f"an image's processor output has no {FIELD!r} field: the family's processor "
                                   "does not run through RequestMethodProcessor._apply_hf_processor_main")
            method = decode([item[FIELD].data])[0]
            return list(update.target) * self.info.kept_count(method, item_idx, mm_items, item)

        return [dataclasses.replace(u, replacement=functools.partial(kept_placeholders, update=u))
                if u.modality == "image" else u for u in updates]


class RequestMethodModel:
    """Mixin for a vLLM model class (put first): `image_methods`, each image's method of the current
    `embed_multimodal` call, read from the processor output (`FIELD`)."""

    image_methods: list[PreLLMMethod] | None = None

    def embed_multimodal(self, **kwargs):
        rows = kwargs.pop(FIELD, None)
        self.image_methods = decode(rows) if rows is not None else None
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self.image_methods = None

    def methods_for(self, images: int) -> list[PreLLMMethod]:
        """The method of each of this call's `images` images (the served one when the field is absent)."""
        methods = self.image_methods or [self.method] * images
        if len(methods) != images:
            raise RuntimeError(f"{images} images and {len(methods)} {FIELD} rows in one encoder call")
        return methods
