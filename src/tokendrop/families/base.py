"""The model-family contract: what tokendrop must know of a family of stock HF vision-language models.

An adapter wraps one model instance of its family. Its capability flags say which methods can run
on it; `apply()` checks every method's `requires()` against them and names what is missing.

    capability   the family has                                    methods that need it
    pre_llm      a processor seam for the placeholder count and    every pre-LLM method
                 a `get_image_features` to prune (plus geometry)
    cls_token    a vision tower with a [CLS] token in front        HiRED (its scores are [CLS] rows)
    in_llm       a decoder hook the in-LLM loop runs its decoder   PyramidDrop, FastV
                 with (`decoder`, `tokendrop.engine.decoders`),
                 and a decoder that hook can run (`unfit` is "")
    renumber     1-D rotary positions that may be renumbered       positions="renumber"
                 (M-RoPE families keep each token's 3-D position)
    base_image   a downscaled whole image among the partitions    BaseOnly
    features     per-token vision features before and after the   DivPrune, VisPruner
                 projector (`methods.base.Score`'s feature kinds)
    merge        feeds a merging method's merged rows through the   VisionZip
                 stock projector (`PreLLMMethod.merge`)
    instruction  the sample's prompt when its image is encoded,     CDPruner
                 for a CLIP head on the tower's feature block
                 (Score kind "relevance": `tokendrop.instructions`)

A family is a `Family` subclass in its lineage's folder (`tokendrop.families.<lineage>/`), listed
once in the table (`tokendrop.families.FAMILIES`) or registered (`register_family`, or the
`tokendrop.families` entry-point group). Its members (M: must, P: pre-LLM families, O: optional):

    declaration (class attributes)
      M name, model_type, model_classes         how users say it; config.model_type; the model classes
      M config_class, processor_class           transformers class names
      M image_processor_class                   "module:Class" of the PIL image processor (no torchvision)
      M tiny                                    "module:function": a tiny random (model, processor) for tests
      O tokenizer                               "module:function": its tiny tokenizer (default: LLaVA tokens)
      O vllm                                    "module:Class" of its vLLM model class ("": not served)
      M pre_llm, cls_token, base_image,         capability flags (table above; features, instruction optional)
        positions ("rope" / "mrope")
      O decoder                                 "module:Class" of its decoder hook (`tokendrop.engine.decoders`):
                                                grants `in_llm`; "" (default): in-LLM methods are refused
      O projects_all                            the projector runs on every token (select after it)
      O controls                                control name -> "module:Class" of a `Control`: the family's own
                                                setting for fewer visual tokens, run beside the methods by bench / eval
    config-level answers (classmethods: pure functions of the config, shared by both engines)
      O config_capabilities(config)             capabilities a config turns off (default: the flags)
      P config_geometry(config)                 image size -> `Layout` (picklable: processors carry it)
      P config_score_blocks(config, method)     name -> (score kind, 0-based vision block) of a method's scores, validated
      O config_check(config, method)            capability, depth and score-block errors from the config alone
                                                (the CLI calls it before weights load; check() calls it)
    transformers seams (instance methods on a model of the family)
      P encoder_patch(method, record)           a replacement `get_image_features` keeping the selection
      O pre_llm_patches(method, record, geometry)  more seams (M-RoPE positions); default: encoder_patch
      O processor_patches(processor, count, live)  more processor seams (placeholder text, image sizes)
      O processor_geometry(processor)           geometry with the processor's resize settings
      O stock_tokens(image_size, processor)     the stock processor's placeholder count (default: the layout's tokens)
      O processor_expects()                     processor settings the model fixes ("image_processor.patch_size" -> value)
      O check_processor(processor), hint(missing), visual_token_ids, language_model, check(method)
    costs and benchmark models
      M shapes(), O vision_work(layout), token_pixels()
      O build_processor(image_processor, tokenizer), bind_tokenizer(config, tokenizer)

To add a family:
  1. Create its folder `tokendrop/families/<lineage>/` (or a module in an existing lineage's folder)
     with a `Family` subclass declaring the attributes above.
  2. For `pre_llm`: `config_geometry`, `config_score_blocks` (if its methods read scores) and
     `encoder_patch`; `check_processor` names a processor that does not belong to the model.
  3. For `in_llm`: name the decoder hook in `decoder`: `tokendrop.engine.decoders:LlamaDecoder` for a
     Llama-style decoder (Llama, Mistral, Qwen2/3), a hook of your own (a subclass answering what differs:
     masks, rotary tables, inputs added after a layer, layers whose cache has no length) otherwise.
  4. `shapes()` and `stock_tokens(image_size)` for `tokendrop cost` / `bench`, and a tiny random model
     builder in the folder's `tiny.py`, named by `tiny` (the contract tests build it).
  5. One line in `tokendrop.families.FAMILIES` (or `td.register_family(cls)` in a script, or an entry
     point in the `tokendrop.families` group of a package). For vLLM: a `vllm.py` in the folder and
     the `vllm` attribute; the plugin derives its architecture map from the families that have one.
Module-level imports stay light (no transformers): listing the families imports every declaration.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

from tokendrop.methods.base import PreLLMMethod

#: capability -> what it means, for error messages and `tokendrop methods`.
CAPABILITIES = {
    "pre_llm": "dropping before the LLM (a placeholder count known from the image size, prunable image features)",
    "cls_token": "a vision tower with a [CLS] token",
    "in_llm": "a decoder the in-LLM loop can run (in-LLM dropping)",
    "renumber": "renumbered 1-D positions (M-RoPE models keep every token's original position: positions='original')",
    "base_image": "a downscaled whole image among the partitions",
    "features": "per-token vision features before and after the projector (Score kinds 'features', 'projected')",
    "merge": "merged tokens fed through the stock projector (PreLLMMethod.merge)",
    "instruction": "the sample's prompt text when its image is encoded, scored against a CLIP tower's feature block "
                   "(Score kind 'relevance')",
}


@dataclass(frozen=True)
class TokenCount:
    """Visual tokens a pre-LLM method gives one image: known from the image size before encoding.

    Holds only the family's geometry (config and processor values) and the method, so the
    processor patch that uses it can be pickled (spawned DataLoader workers) and never keeps the
    model alive. A geometry answers `layout(image_size)` and `input_layout(image_inputs, i)` ->
    (Layout, (height, width) or None), the latter from what the processor computed for image i.
    """

    geometry: object
    method: PreLLMMethod

    def __call__(self, image_size=None) -> int:
        return self.count(self.geometry.layout(image_size), image_size)

    def of_inputs(self, image_inputs: dict, image_idx: int) -> int:
        """The count for image `image_idx` of the processor's `image_inputs` (replace_image_token's view)."""
        return self.count(*self.geometry.input_layout(image_inputs, image_idx))

    def count(self, layout, image_size) -> int:
        count = self.method.num_tokens(layout)
        if count == 0:
            tokens = layout.num_partitions * layout.patches
            what = "every image" if image_size is None else f"an image of {image_size[0]}x{image_size[1]} pixels"
            raise ValueError(f"{self.method!r} keeps no visual token of {what} ({layout.num_partitions} partition(s) "
                             f"of {layout.patches} patches): the image would be invisible to the model. "
                             f"The smallest budget that keeps one token is {1 / tokens:.4g}")
        return count


@dataclass(frozen=True)
class Shapes:
    """The widths the cost formulas need (`tokendrop.cost`), read from a (meta or real) model."""

    d: int  # LLM width
    m: int  # LLM MLP width (SwiGLU: three d x m matrices)
    depth: int  # LLM layers
    q_width: int  # heads * head_dim
    kv_width: int  # kv_heads * head_dim (GQA)
    vocab: int
    vd: int  # vision width
    vm: int  # vision MLP width
    vision_depth: int  # encoder layers that run (all of them: HF runs the whole tower)
    patch_inputs: int  # 3 * patch * patch
    projector: tuple[int, ...]  # (in, out) of every projector linear layer
    vision_tokens_extra: int = 1  # tokens the tower adds per tile besides the patches ([CLS])
    vision_mlp_matrices: int = 2  # vd x vm matrices of a vision MLP (SwiGLU: 3)
    gated_attention: bool = False  # q_proj also gives an output gate: d x (2 * q_width) (Qwen3-Next, Qwen3.5)
    layer_types: tuple[str, ...] = ()  # per LLM layer: "full_attention" / "linear_attention" (); all full
    linear: LinearAttentionShapes | None = None  # the widths of the linear-attention layers
    attention: tuple[AttentionShapes, ...] = ()  # per LLM layer, when layers differ (Gemma 4); (): q_width, kv_width
    tied_embeddings: bool = False  # the LM head is the embedding matrix (counted once in lm_params)

    def is_linear(self, layer: int) -> bool:
        """Whether LLM layer `layer` is a linear-attention layer (no per-token keys and values)."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    def attn(self, layer: int) -> AttentionShapes:
        """The attention widths of LLM layer `layer`."""
        return self.attention[layer] if self.attention else AttentionShapes(self.q_width, self.kv_width)

    def attention_params(self, layer: int = 0) -> int:
        """Parameters of an attention layer's projections (q with its gate, k, v unless keys are the values, o)."""
        a = self.attn(layer)
        return (3 if self.gated_attention else 2) * self.d * a.q_width + (2 if a.values else 1) * self.d * a.kv_width

    def lm_params(self) -> int:
        """LLM parameters (embeddings and head included, norms, conv and gate biases ignored)."""
        mixers = sum(self.linear.params(self.d) if self.is_linear(i) else self.attention_params(i) for i in range(self.depth))
        return mixers + self.depth * 3 * self.d * self.m + (1 if self.tied_embeddings else 2) * self.vocab * self.d


@dataclass(frozen=True)
class AttentionShapes:
    """One attention layer's widths where a decoder's layers differ (Gemma 4: sliding-window layers with
    many narrow heads, full-attention layers with few wide ones whose keys are also the values)."""

    q_width: int  # heads * head_dim
    kv_width: int  # kv_heads * head_dim
    values: bool = True  # a v_proj of its own (False: the keys are the values)
    window: int | None = None  # sliding window: a query attends to at most this many keys, the cache keeps as many

    def keys(self, L: int) -> int:
        """Keys a token at position L (1-based) attends to, and the cache keeps after L tokens."""
        return L if self.window is None else min(L, self.window)

    def attended_pairs(self, L: int) -> int:
        """(query, key) pairs of a causal prefill of L tokens: sum over i of keys(i)."""
        if self.window is None or L <= self.window:
            return L * (L + 1) // 2
        return self.window * (self.window + 1) // 2 + (L - self.window) * self.window


@dataclass(frozen=True)
class LinearAttentionShapes:
    """The widths of a Gated-DeltaNet linear-attention layer (Qwen3-Next, Qwen3.5): `key_heads` query /
    key heads of `key_dim`, `value_heads` value heads of `value_dim`, a depthwise causal convolution of
    `conv_kernel` taps over q, k and v. Each value head keeps a key_dim x value_dim state matrix."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    conv_kernel: int

    @property
    def conv_width(self) -> int:
        """Channels of q, k and v (the convolution's)."""
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def params(self, d: int) -> int:
        """in_proj_qkv, in_proj_z, in_proj_a / in_proj_b, out_proj (d wide) and the convolution."""
        values = self.value_heads * self.value_dim
        return d * (self.conv_width + 2 * values + 2 * self.value_heads) + self.conv_width * self.conv_kernel


class Control:
    """A family's own setting that asks the stock model for fewer visual tokens (Gemma 4's
    `max_soft_tokens`): the baseline a token-dropping method at the same budget must beat.

    Nothing is dropped and the model is not patched: `applied(processor)` changes the processor's
    setting for a block (restored after), so the stock model sees fewer tokens of a smaller resize.
    A family names its controls in `Family.controls`; `tokendrop bench` and `tokendrop eval` run one
    by that name beside the methods (`tokendrop.controls`). Subclasses are frozen dataclasses with a
    `budget` field: the fraction of the processor's current setting asked for.
    """

    name: ClassVar[str] = ""

    def setting(self, processor) -> dict:
        """The processor settings that ask for `budget` of its tokens, e.g. {"max_soft_tokens": 70};
        ValueError naming the budgets that have a setting."""
        raise NotImplementedError

    def applied(self, processor):
        """A context manager: inside it `processor` writes the smaller count (restored after)."""
        raise NotImplementedError

    def describe(self, processor) -> str:
        """The setting as results show it: "max_soft_tokens=70"."""
        return ", ".join(f"{key}={value}" for key, value in self.setting(processor).items())


def resolve(path: str):
    """The object at "module:attribute" (or a `transformers` attribute name), imported on demand."""
    module, _, attribute = path.rpartition(":")
    return getattr(importlib.import_module(module or "transformers"), attribute)


class Family:
    """Base of the model-family adapters (see the module docstring for the contract)."""

    name: ClassVar[str] = ""  # as users and docs say it: "llava-next"
    model_type: ClassVar[str] = ""  # config.model_type
    model_classes: ClassVar[tuple[str, ...]] = ()  # transformers class names this adapter accepts
    config_class: ClassVar[str] = ""
    processor_class: ClassVar[str] = ""
    image_processor_class: ClassVar[str] = ""  # "module:Class" (the PIL processor: no torchvision)
    tiny: ClassVar[str] = ""  # "module:function" building a tiny random (model, processor), in the family's folder
    vllm: ClassVar[str] = ""  # "module:Class" of the vLLM model class serving it (its folder's vllm.py); "": not served
    tokenizer: ClassVar[str] = "tokendrop.tiny:tiny_tokenizer"  # a tiny tokenizer with the family's special tokens
    decoder: ClassVar[str] = ""  # "module:Class" of the decoder hook the in-LLM loop runs (grants in_llm); "": none
    projects_all: ClassVar[bool] = False  # the projector runs on every token (pre-LLM selection after it)
    #: (regex, replacement) weight-name rules from what transformers 5 saves to the layout of the family's hub
    #: checkpoints, which transformers 5 and stock vLLM both load (`tokendrop.loading.save_hub_layout`); (): the same
    hub_layout: ClassVar[tuple[tuple[str, str], ...]] = ()
    controls: ClassVar[dict[str, str]] = {}  # control name -> "module:Class" of a `Control` (Gemma 4's own budget)
    # capabilities of the family (an instance may lack some: see `capabilities`)
    pre_llm: ClassVar[bool] = False
    cls_token: ClassVar[bool] = False
    positions: ClassVar[str] = "rope"  # "rope" (1-D, renumberable) or "mrope"
    base_image: ClassVar[bool] = False  # a downscaled whole image among the partitions (BaseOnly keeps it)
    features: ClassVar[bool] = False  # per-token features before / after the projector (DivPrune, VisPruner)
    merges: ClassVar[bool] = False  # feeds merged rows (VisionZip: `PreLLMMethod.merge`)
    instruction: ClassVar[bool] = False  # the prompt at encoding + a CLIP tower ("relevance" scores: CDPruner)

    prompts = None  # `tokendrop.instructions.PromptCapture` of an instruction-conditioned method (set by apply)

    geometry = None  # image size -> Layout (pre_llm families)

    def __init__(self, model):
        self.model = model  # the *ForConditionalGeneration wrapper
        self.base = model.model  # the inner model: vision tower, projector, language model
        self.config = model.config

    # ---- capabilities ----------------------------------------------------------------------
    @classmethod
    def family_capabilities(cls) -> set[str]:
        """What every model of the family can do."""
        flags = {"pre_llm": cls.pre_llm, "cls_token": cls.cls_token, "in_llm": bool(cls.decoder),
                 "renumber": cls.positions == "rope", "base_image": cls.base_image, "features": cls.features,
                 "merge": cls.merges, "instruction": cls.instruction}
        return {name for name, on in flags.items() if on}

    @classmethod
    def config_capabilities(cls, config) -> set[str]:
        """What a model with this config can do, from the config alone (both engines ask this)."""
        caps = cls.family_capabilities()
        if "in_llm" in caps and cls.decoder_unfit(config):
            caps.discard("in_llm")
        return caps

    @classmethod
    def decoder_unfit(cls, config, language_model=None) -> str:
        """Why the in-LLM loop cannot run this config's (or this loaded) decoder under the family's
        hook ("" when it can, or when the family names no hook)."""
        if not cls.decoder:
            return ""
        hook = resolve(cls.decoder)
        return hook.unfit(language_model) if language_model is not None else hook.config_unfit(config.get_text_config())

    @classmethod
    def config_geometry(cls, config):
        """Image size -> `Layout` from the config alone (picklable; None for families without pre-LLM)."""
        return None

    @classmethod
    def config_score_blocks(cls, config, method: PreLLMMethod) -> dict:
        """The vision blocks `method`'s scores come from, validated against the config (ValueError)."""
        return {}

    def capabilities(self) -> set[str]:
        """What this model can do (its config may turn a family capability off)."""
        caps = self.config_capabilities(self.config)
        if "in_llm" in caps and self.decoder_unfit(self.config, self.language_model):
            caps.discard("in_llm")
        return caps

    def decoder_hook(self):
        """The family's decoder hook around this model's language model (`tokendrop.engine.decoders`)."""
        return resolve(self.decoder)(self.language_model, mrope=self.positions == "mrope")

    @classmethod
    def config_check(cls, config, method, capabilities: set[str] | None = None, model_name: str | None = None,
                     hint=None) -> None:
        """ValueError naming what `method` needs and a model of this `config` lacks, or an option that
        does not fit it (an in-LLM layer beyond the LM's depth, a pre-LLM score block the tower has not),
        from the config alone: before any weight is loaded (the CLI), and by `check` on a loaded model.

        Args:
            capabilities: the model's (default: `config_capabilities(config)`).
            model_name: the model class the messages name (default: the config's architecture).
            hint: missing capabilities -> what to use instead (default: the family's `hint`).
        """
        capabilities = cls.config_capabilities(config) if capabilities is None else capabilities
        missing = sorted(method.requires() - capabilities)
        if missing:
            name = model_name or (getattr(config, "architectures", None) or [*cls.model_classes, cls.name])[0]
            hint = hint or (lambda names: cls.unfit_reason(config, None, names) + cls.hint(cls, names))
            need = "; ".join(f"{CAPABILITIES[c]} (capability {c!r})" for c in missing)
            raise ValueError(f"{type(method).__name__} needs {need}, which {name} "
                             f"({cls.name}) does not have{hint(missing)}")
        if method.stage == "in":
            method.boundaries(config.get_text_config().num_hidden_layers)
            resolve(cls.decoder).check_method(config.get_text_config(), method)  # e.g. a ranking layer that cannot rank
        elif method.stage == "pre":
            cls.config_score_blocks(config, method)

    def check(self, method) -> None:
        """ValueError naming the capability `method` needs and this model lacks, or an option that
        does not fit this model (a layer beyond its depth): `config_check` with this model's
        capabilities and class name, and its depth counted on the loaded decoder."""
        self.config_check(self.config, method, self.capabilities(), type(self.model).__name__, self._hint)
        if method.stage == "in":
            method.boundaries(len(self.language_model.layers))

    def hint(self, missing: list[str]) -> str:
        """What to use instead, appended to a capability error."""
        return ""

    def _hint(self, missing: list[str]) -> str:
        return self.unfit_reason(self.config, self.language_model, missing) + self.hint(missing)

    @classmethod
    def unfit_reason(cls, config, language_model, missing: list[str]) -> str:
        """": <why the family's hook cannot run this decoder>" when `in_llm` is missing for that reason."""
        unfit = cls.decoder_unfit(config, language_model) if "in_llm" in missing else ""
        return f": {unfit}" if unfit else ""

    # ---- what every family answers -----------------------------------------------------------
    @property
    def language_model(self):
        return self.base.language_model

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids whose tokens in-LLM methods rank and drop (images, and videos where a family has them)."""
        video = getattr(self.config, "video_token_id", None)
        return (self.image_token_id,) if video is None else (self.image_token_id, video)

    def layout(self, image_size=None):
        """`Layout` of an image of (height, width) pixels."""
        return self.geometry.layout(image_size)

    def num_tokens(self, method: PreLLMMethod, image_size=None) -> int:
        """Visual tokens `method` gives an image of (height, width) pixels; ValueError if none."""
        return TokenCount(self.geometry, method)(image_size)

    def processor_geometry(self, processor):
        """The geometry the processor's placeholder patch carries (some families need the processor's
        resize settings; the LLaVA ones read everything from the config)."""
        return self.geometry

    def stock_tokens(self, image_size=None, processor=None) -> int:
        """Visual tokens the stock processor writes for an image of (height, width) pixels (some
        families' counts depend on the processor's resize settings: pass it when there is one).
        Default: every token of the image's layout (the processor's geometry when given)."""
        geometry = self.geometry if processor is None else self.processor_geometry(processor)
        return geometry.layout(image_size).patches

    def processor_expects(self) -> dict:
        """Processor settings the model fixes: "attribute" or "image_processor.attribute" -> the value."""
        return {}

    def check_processor(self, processor) -> None:
        """ValueError if `processor` was not built for this model (placeholder counts would not line up)."""
        got = getattr(processor, "image_token_id", None)
        if got is not None and got != self.image_token_id:
            raise ValueError(f"processor does not belong to the model: image_token_id is {got!r}, "
                             f"the model expects {self.image_token_id!r}")
        if "replace_image_token" in vars(processor):
            raise ValueError("processor is already patched (replace_image_token is overridden); call handle.remove() first")
        for path, want in self.processor_expects().items():
            got = processor
            for part in path.split("."):
                got = getattr(got, part, None)
            if got != want:
                raise ValueError(f"processor does not belong to the model: {path} is {got!r}, the model expects {want!r}")

    def encoder_patch(self, method: PreLLMMethod, record):
        """A replacement `get_image_features` keeping `method`'s tokens; `record(selections)` gets the picks."""
        raise NotImplementedError

    def processor_patches(self, processor, count: TokenCount, live) -> list[tuple[object, str, object]]:
        """(object, attribute, replacement) the family sets on the processor or its parts besides the
        placeholder count (undone by `remove()`, picklable: DataLoader workers carry them); default none.
        `live.active` is False once the handle is removed (a copy then behaves as the stock processor)."""
        return []

    def pre_llm_patches(self, method: PreLLMMethod, record, geometry):
        """(attribute -> replacement on the inner model, forward pre-hooks on it) for a pre-LLM method.

        Most families replace `get_image_features` only; families with positions that depend on the
        image (M-RoPE) patch more.
        """
        return {"get_image_features": self.encoder_patch(method, record)}, []

    def shapes(self) -> Shapes:
        raise NotImplementedError

    def vision_work(self, layout) -> tuple[int, int]:
        """(tiles, patches per tile) the vision tower runs on for an image of `layout` (cost)."""
        return layout.num_partitions, layout.patches

    def token_pixels(self) -> int:
        """Image pixels per LLM token side (pictures of the kept tokens)."""
        return self.config.vision_config.patch_size

    @classmethod
    def build_processor(cls, image_processor, tokenizer, **settings):
        """The family's processor around an image processor and a tokenizer (benchmark models)."""
        return resolve(cls.processor_class)(image_processor=image_processor, tokenizer=tokenizer, **settings)

    @classmethod
    def bind_tokenizer(cls, config, tokenizer) -> None:
        """Point `config`'s special-token ids at `tokenizer`'s (benchmark models built from an arch)."""
        config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

