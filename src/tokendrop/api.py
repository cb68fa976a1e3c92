"""`apply()` / `remove()`: patch a stock model instance (and its processor) with token-dropping methods.

    handle = td.apply(model, processor, td.HiRED(budget=0.2), td.PyramidDrop())
    out = model.generate(**processor(images=..., text=..., return_tensors="pt"))
    handle.remove()  # or: with td.apply(...): ...

Patches are instance attributes and hooks only (never classes), each recorded with its undo; a
failure half-way undoes what was done. A pre-LLM method (HiRED, DominantDrop, RandomDrop,
SpatialDrop, BaseOnly) replaces `get_image_features` (and what the model family needs besides:
Qwen-VL's `get_rope_index`) and the processor's `replace_image_token` (and its token-count query
`_get_num_multimodal_tokens`, when it has one); an in-LLM method (PyramidDrop, FastV) replaces the
language model's `forward`. One of each kind composes. Which methods a model runs is its family's
capabilities (`tokendrop.families.base`).
"""

from __future__ import annotations

import copy
import weakref

import torch

from tokendrop import compat
from tokendrop.families.base import TokenCount
from tokendrop.engine.decoder import LLMDropper
from tokendrop.methods.base import InLLMMethod, PreLLMMethod
from tokendrop.registry import family_for

#: handles whose patches are in place. Weak: a model that is never `remove()`d is still freed.
_ACTIVE: "weakref.WeakSet[Handle]" = weakref.WeakSet()


class Handle:
    """What `apply()` did, what the last call selected, and how to undo it.

    Attributes:
        selections: for every image of the last encoder call, a (K, 3) long tensor of the kept patch
            tokens as (partition, row, col) in the order they reach the LLM; partition 0 is the base
            image, 1..k the tiles in raster order (Qwen-VL: partition 0, the merged token grid).
            A merging method (VisionZip) adds a row per merged token, at the patch it stands for
            (its target), and a row (partition, -1, -1) per [CLS] state it feeds.
        layer_tokens: (B, depth) long, image tokens each LLM layer saw in the last prefill (in-LLM
            methods), or None.
        kept_positions: (B, L') long, for in-LLM methods: the input position of every position of
            the model's output (logits) in the last prefill; -1 for padding added by the drop.
    """

    def __init__(self, model, processor, methods):
        self.model, self.processor, self.methods = model, processor, methods
        self.selections: list[torch.Tensor] = []
        self.layer_tokens: torch.Tensor | None = None
        self.kept_positions: torch.Tensor | None = None
        self._patches: list[tuple] = []  # (object, attribute, had, old) or (module, hook handle)
        self._count: TokenCount | None = None  # the pre-LLM method's count per image
        self._live = Live()

    @property
    def equivalent_tokens(self) -> torch.Tensor | None:
        """(B,) image tokens averaged over LLM layers: the figure in-LLM methods are compared by."""
        return None if self.layer_tokens is None else self.layer_tokens.float().mean(dim=1)

    def num_tokens(self, image_size) -> int:
        """Visual tokens an image of (height, width) pixels gives the LLM under this handle's pre-LLM method."""
        if self._count is None:
            raise ValueError("this handle has no pre-LLM method; the stock processor counts the tokens")
        return self._count(image_size)

    def remove(self) -> None:
        """Restore the model and processor exactly (idempotent)."""
        self._live.active = False
        while self._patches:
            _undo(self._patches.pop())
        _ACTIVE.discard(self)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._patches else "removed"
        return f"Handle({', '.join(map(repr, self.methods))}, {state})"


class Live:
    """Whether a handle's patches are in place, shared by shallow copies of a patched processor
    (`copy.copy` shares its attributes): such a copy writes the stock counts once the handle is
    removed. A deep copy is stock at once (`StockCopy`); a pickled copy (a DataLoader worker)
    keeps its own state."""

    def __init__(self):
        self.active = True

    def __deepcopy__(self, memo):
        return self


def _set_attr(handle: Handle, obj, name: str, value) -> None:
    """Set an instance attribute and record its exact undo (delete it, or restore the old one)."""
    had = name in vars(obj)
    handle._patches.append((obj, name, had, vars(obj).get(name)))
    setattr(obj, name, value)


def _add_hook(handle: Handle, module, hook) -> None:
    handle._patches.append((module, hook))


def _undo(patch, target=None) -> None:
    """Undo one recorded patch on its object, or on `target` (a deep copy of that object)."""
    if len(patch) == 2:  # a hook
        module, hook = patch
        if target is None:
            hook.remove()
        else:  # the copy's hook dicts hold the same id
            for name, table in vars(target).items():
                if name.startswith(("_forward", "_backward")) and isinstance(table, dict):
                    table.pop(hook.id, None)
        return
    obj, name, had, old = patch
    obj = target if target is not None else obj
    if had:
        setattr(obj, name, old)
    else:
        vars(obj).pop(name, None)


class StockCopy:
    """The `__deepcopy__` of a patched model or processor: an independent STOCK copy (the original
    stays patched), one rule for both halves of a (model, processor) pair.

    The patches are closures over the original's modules and handle, so a copy that kept them would
    read the original's tower and write the original's handle. Picklable when `patches` are (the
    processor's are: a patched processor pickled for a DataLoader worker carries this along).
    """

    def __init__(self, obj, patches: list):
        self.obj, self.patches = obj, patches  # the undo records that may concern obj or what it holds

    def __call__(self, memo):
        own = vars(self.obj).pop("__deepcopy__")  # copy without coming back here
        try:
            twin = copy.deepcopy(self.obj, memo)
        finally:
            vars(self.obj)["__deepcopy__"] = own
        for patch in reversed(self.patches):  # last patch first, as remove() does (an attribute may be patched twice)
            target = memo.get(id(patch[0]))
            if target is not None:
                _undo(patch, target)
        return twin


def apply(model, processor=None, *methods) -> Handle:
    """Patch `model` (and `processor`) in place with one pre-LLM and/or one in-LLM method.

    Args:
        model: a stock model of a supported family (`tokendrop methods` lists them and which
            methods each runs).
        processor: the model's processor; required by pre-LLM methods, which change how many
            `<image>` placeholders it writes. May be None for in-LLM methods alone.
        methods: e.g. `td.HiRED(budget=0.2)`, `td.PyramidDrop()`, or both; none at all gives a
            handle that changes nothing (the stock model), so callers need no special case.
    Returns:
        a `Handle`; `handle.remove()` (or leaving its `with` block) restores everything.
    """
    family, pre, inner = check(model, processor, *methods)
    if any(h.model is model for h in _ACTIVE):
        raise ValueError("model is already patched by tokendrop; call handle.remove() first")
    handle = Handle(model, processor, tuple(methods))
    if not methods:
        return handle
    try:
        _set_attr(handle, model, "__deepcopy__", StockCopy(model, handle._patches))
        if pre is not None:
            _patch_pre_llm(handle, family, pre)
        if inner is not None:
            _patch_in_llm(handle, family, inner)
    except BaseException:
        handle.remove()
        raise
    _ACTIVE.add(handle)
    return handle


def check(model, processor=None, *methods):
    """Everything `apply()` checks, without patching: the family, each method's needs and options
    against the model, and the processor. Returns (family adapter, pre-LLM method, in-LLM method).

    Raises:
        TypeError / ValueError naming the problem (an unsupported model, a missing capability, a
            layer beyond the model's depth, a processor of another model).
    """
    pre, inner = _split_methods(methods)
    family = family_for(model)
    for method in (pre, inner):
        if method is not None:
            family.check(method)
    if pre is not None and processor is None:
        raise TypeError("processor is required for pre-LLM methods: it writes the number of <image> placeholders")
    if processor is not None:
        family.check_processor(processor)
    return family, pre, inner


def _split_methods(methods):
    for m in methods:
        if not isinstance(m, (PreLLMMethod, InLLMMethod)):
            what = f"class {m.__name__}" if isinstance(m, type) else type(m).__name__
            raise TypeError(f"methods must be method instances such as td.HiRED(budget=0.2); got {what}")
    pre = [m for m in methods if isinstance(m, PreLLMMethod)]
    inner = [m for m in methods if isinstance(m, InLLMMethod)]
    if len(pre) > 1 or len(inner) > 1:
        raise ValueError(f"apply() takes at most one pre-LLM method and one in-LLM method; got "
                         f"{', '.join(type(m).__name__ for m in methods)}")
    return (pre[0] if pre else None), (inner[0] if inner else None)


def _patch_pre_llm(handle: Handle, adapter, method: PreLLMMethod) -> None:
    def record(selections):
        handle.selections = selections

    processor = handle.processor
    geometry = adapter.processor_geometry(processor)
    handle._count = count = TokenCount(geometry, method)
    if "instruction" in method.requires():
        _capture_prompts(handle, adapter)
    attributes, hooks = adapter.pre_llm_patches(method, record, geometry)
    for name, value in attributes.items():
        _set_attr(handle, adapter.base, name, value)
    for hook in hooks:
        _add_hook(handle, adapter.base, adapter.base.register_forward_pre_hook(hook, with_kwargs=True))
    first = len(handle._patches)
    _set_attr(handle, processor, "replace_image_token", Placeholders(processor, count, handle._live))
    if hasattr(processor, "_get_num_multimodal_tokens"):  # the count serving engines (vLLM) ask for
        _set_attr(handle, processor, "_get_num_multimodal_tokens", TokenQuery(processor, count, handle._live))
    for obj, name, value in adapter.processor_patches(processor, count, handle._live):  # the family's own
        _set_attr(handle, obj, name, value)
    stock_copy = StockCopy(processor, [])
    _set_attr(handle, processor, "__deepcopy__", stock_copy)
    stock_copy.patches.extend(handle._patches[first:])  # the processor's own records, this one's included


def _capture_prompts(handle: Handle, adapter) -> None:
    """Give the encoder the prompt ids of the call under way (`tokendrop.instructions`): `generate`
    records them before it encodes the images, the inner model's forward before it does."""
    from tokendrop.instructions import PromptCapture

    adapter.prompts = prompts = PromptCapture(handle.processor.tokenizer, adapter.image_token_id)
    _set_attr(handle, handle.model, "generate", prompts.generate(handle.model.generate))
    base = adapter.base
    _add_hook(handle, base, base.register_forward_pre_hook(prompts.enter_forward, with_kwargs=True))
    _add_hook(handle, base, base.register_forward_hook(prompts.leave_forward, with_kwargs=True, always_call=True))


class Placeholders:
    """The processor's `replace_image_token` under a pre-LLM method: the method's count of placeholders.

    Picklable and model-free (the processor, a `TokenCount` and the handle's `Live` flag): a patched
    processor can go to spawned DataLoader workers, and it never keeps the model alive.
    """

    def __init__(self, processor, count: TokenCount, live: Live):
        self.processor, self.count, self.live = processor, count, live

    def __call__(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        stock = type(self.processor).replace_image_token(self.processor, image_inputs, image_idx, **kwargs)
        if not self.live.active:  # a copy made while patched, after remove(): stock again
            return stock
        # the stock text around the placeholders stays (Gemma 4: <|image> ... <image|>)
        token = self.processor.image_token
        head, tail = stock[:stock.find(token)], stock[stock.rfind(token) + len(token):]
        return head + token * self.count.of_inputs(image_inputs, image_idx) + tail


class TokenQuery:
    """The processor's `_get_num_multimodal_tokens` answering with the method's count per image."""

    def __init__(self, processor, count: TokenCount, live: Live):
        self.processor, self.count, self.live = processor, count, live

    def __call__(self, image_sizes=None, **kwargs):
        data = type(self.processor)._get_num_multimodal_tokens(self.processor, image_sizes=image_sizes, **kwargs)
        if image_sizes is not None and self.live.active:
            data.num_image_tokens = [self.count(list(size)) for size in image_sizes]
        return data


def _patch_in_llm(handle: Handle, adapter, method: InLLMMethod) -> None:
    lm = adapter.language_model

    def record(counts, origin):
        handle.layer_tokens, handle.kept_positions = counts, origin

    decoder = adapter.decoder_hook()
    # a renamed keyword fails here, not in torch
    compat.check_signature(type(lm).forward, LLMDropper.forward, known=decoder.keywords)
    dropper = LLMDropper(decoder, method, record)
    token_ids = adapter.visual_token_ids

    def find_images(module, args, kwargs):
        decoder.capture(kwargs)  # what the hook reads from the outer call (Gemma 4: its 2-D mask, image blocks)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            dropper.image_mask = torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            tokens = module.get_input_embeddings()(torch.tensor(token_ids, device=embeds.device))  # (V, D)
            dropper.image_mask = (embeds[:, :, None] == tokens).all(dim=-1).any(dim=-1)

    _add_hook(handle, adapter.base, adapter.base.register_forward_pre_hook(find_images, with_kwargs=True))
    _set_attr(handle, lm, "forward", dropper.forward)
    _patch_labels(handle, adapter.model, dropper)


def _patch_labels(handle: Handle, model, dropper: LLMDropper) -> None:
    """Training: take `labels` out of the stock forward and compute the loss on the kept tokens.

    The language model returns the shortened sequence, so the stock loss would compare logits and
    labels of different lengths. Labels are gathered with the tokens (dropped tokens are image
    tokens, whose labels are -100 anyway), and the answer spans tell the scorer its queries.
    """

    def take_labels(module, args, kwargs):
        dropper.labels = kwargs.pop("labels", None)
        return args, kwargs

    def loss_on_kept(module, args, kwargs, output):
        labels, dropper.labels = dropper.labels, None
        if labels is None or dropper.origin is None:
            return output
        kept = labels.gather(1, dropper.origin.clamp(min=0)).masked_fill(dropper.origin < 0, -100)
        output["loss"] = module.loss_function(logits=output.logits, labels=kept,
                                              vocab_size=module.config.text_config.vocab_size)
        return output

    _add_hook(handle, model, model.register_forward_pre_hook(take_labels, with_kwargs=True))
    _add_hook(handle, model, model.register_forward_hook(loss_on_kept, with_kwargs=True))
