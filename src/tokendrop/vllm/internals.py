"""Every vLLM internal tokendrop's plugin reads, in one table, and the check that they are still there.

The plugin (`tokendrop/vllm/*.py`, `families/*/vllm.py`) subclasses vLLM's model classes, overrides
some of their methods, calls others and reads attributes of the modules vLLM builds. None of that is
public API: any vLLM release may move or rename it. `VLLM_INTERNALS` lists each one (module, name,
what tokendrop relies on) as `tokendrop.compat` does for transformers; `check_all` reads every entry
from a vLLM release and names the ones that moved or whose signature changed:

    check_all(ImportedVllm())                       # the installed vLLM (tests/serving/test_internals.py)
    check_all(SourceTree("/tmp/vllm-0.34.0"))       # an unpacked release: its AST, nothing imported

`python -m tokendrop.vllm.internals ROOT...` prints the problems of each unpacked release (a folder
holding the `vllm` package, e.g. a wheel unzipped). Which releases match is written in docs/design.md
("vLLM versions"); `pyproject.toml`'s vllm range is those releases. This module imports no vLLM.

An entry's name is "Top" (a module-level class, function or object), "Class.member" (a method,
property, class attribute or annotated field, inherited ones included) or "Class.attribute" with
`instance=True` (set as `self.attribute = ...` in one of the class's methods). `params`: the exact
parameters (after self) of a method tokendrop overrides; `keywords`: the parameters a call from
tokendrop needs; `contains`: a piece of source the definition must contain (a behaviour read there).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Internal:
    """One vLLM name tokendrop reads."""

    module: str
    name: str
    relies_on: str
    params: tuple[str, ...] | None = None  # exact parameters after self ("*name" / "**name" for var-args)
    keywords: tuple[str, ...] = ()  # parameters tokendrop passes by name (a subset)
    instance: bool = False  # an attribute set on instances in a method, not a class member
    contains: str = ""  # source text the definition contains

    @property
    def label(self) -> str:
        return f"{self.module}:{self.name}"


M = "vllm.model_executor.models."
INIT = ("*", "vllm_config", "prefix")  # every model class's keyword-only constructor


#: vLLM's Gemma 4 class shares its name with transformers' (named once, by prefix, as `_llava` does)
GEMMA4 = "Gemma4"


def _model_class(module: str, cls: str, use: str) -> list[Internal]:
    """A vLLM model class tokendrop subclasses: the class, its constructor, `_process_image_input`, `config`."""
    return [Internal(M + module, cls, use),
            Internal(M + module, f"{cls}.__init__", "tokendrop's subclass calls it with the same keywords", INIT),
            Internal(M + module, f"{cls}._process_image_input", "overridden: returns each image's kept rows",
                     ("image_input",)),
            Internal(M + module, f"{cls}.config", "the HF config holding the method's settings", instance=True)]


def _llava(module: str, prefix: str, tiles: bool) -> list[Internal]:
    """LLaVA-1.5 / LLaVA-NeXT / OneVision classes (`families/llava/vllm.py`)."""
    cls = f"{prefix}ForConditionalGeneration"
    entries = [
        *_model_class(module, cls, "subclassed (Tokendrop...ForConditionalGeneration)"),
        Internal(M + module, f"{prefix}MultiModalProcessor", "registered with tokendrop's processing info"),
        Internal(M + module, f"{prefix}ProcessingInfo", "subclassed: the method's placeholder count"),
        Internal(M + module, f"{prefix}ProcessingInfo.get_num_image_tokens",
                 "overridden: the method's count per image size (prompt replacement writes that many)",
                 ("*", "image_width", "image_height")),
        Internal(M + module, f"{prefix}ImageEmbeddingInputs", "precomputed embeddings pass through"),
        Internal(M + module, f"{prefix}ImageEmbeddingInputs.data", "their rows"),
        Internal(M + module, f"{prefix}ImagePixelInputs.pixel_values", "the tiles the tower encodes"),
        Internal(M + module, f"{cls}._image_pixels_to_features", "one tower pass (features of the feature layer)",
                 keywords=("vision_tower", "pixel_values")),
        Internal(M + module, f"{cls}.vision_tower", "the tower (CLIP / SigLIP) whose blocks are hooked", instance=True),
        Internal(M + module, f"{cls}.multi_modal_projector", "projects the kept rows", instance=True),
    ]
    if tiles:
        entries += [Internal(M + module, f"{prefix}ImagePixelInputs.image_sizes", "each image's size: its tiles"),
                    Internal(M + module, f"{cls}.image_newline", "packed as the transformers path packs it",
                             instance=True)]
    return entries


def _tower(module: str, prefix: str) -> list[Internal]:
    """The attributes `scores.py` reads from vLLM's CLIP / SigLIP tower: blocks[b].self_attn.qkv_proj."""
    attn = f"{prefix}Attention"
    return [Internal(M + module, f"{prefix}VisionModel.vision_model", "the path to the blocks", instance=True),
            Internal(M + module, f"{prefix}VisionTransformer.encoder", "the path to the blocks", instance=True),
            Internal(M + module, f"{prefix}Encoder.layers", "the blocks (built only up to the feature layer: the "
                     "last one's output hooked, the [CLS] state a merging method feeds)", instance=True),
            Internal(M + module, f"{prefix}EncoderLayer.self_attn", "the hooked attention", instance=True),
            Internal(M + module, f"{attn}.qkv_proj", "forward hook: fused q, k, v of every token", instance=True),
            Internal(M + module, f"{attn}.scale", "the softmax scale of the recomputed rows", instance=True),
            Internal(M + module, f"{attn}.head_dim", "splits the fused output into heads", instance=True),
            Internal(M + module, f"{attn}.num_heads", "tensor-parallel towers are refused", instance=True),
            Internal(M + module, f"{attn}.num_heads_per_partition", "heads in this process", instance=True)]


def _qwen(module: str, prefix: str, tower: str, block: str, attention: str, pixels: str) -> list[Internal]:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL classes (`families/qwen_vl/vllm.py`)."""
    cls = f"{prefix}ForConditionalGeneration"
    qwen = M + module
    return [
        *_model_class(module, cls, "subclassed with the PreLLMQwen mixin"),
        Internal(qwen, f"{prefix}DummyInputsBuilder", "registered with tokendrop's processor"),
        Internal(qwen, f"{prefix}MultiModalProcessor", "subclassed with the KeptPlaceholders mixin"),
        Internal(qwen, f"{prefix}MultiModalProcessor._get_prompt_updates",
                 "overridden: each image's replacement writes the method's count for its grid",
                 ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs")),
        Internal(qwen, f"{prefix}ProcessingInfo", "subclassed with the KeptCountInfo mixin"),
        Internal(qwen, f"{prefix}ProcessingInfo.get_num_image_tokens", "overridden: the method's count",
                 ("*", "image_width", "image_height", "image_processor", "mm_kwargs")),
        Internal(qwen, f"{prefix}ProcessingInfo._get_vision_info", "an image's resized size",
                 keywords=("image_width", "image_height", "num_frames", "image_processor", "mm_kwargs", "modality")),
        Internal(qwen, f"{cls}.get_mrope_input_positions",
                 "overridden, called when a request arrives: every kept token's original position",
                 ("input_tokens", "mm_features")),
        Internal(qwen, f"{cls}.get_encoder_cudagraph_config", "overridden: images leave the encoder CUDA graphs", ()),
        Internal(qwen, f"{cls}.embed_multimodal", "DominantDrop encodes a new request's image"),
        Internal(qwen, f"{cls}.visual", "the tower", instance=True),
        Internal(M + pixels.split(":")[0], f"{pixels.split(':')[1]}.image_grid_thw", "each image's grid"),
        Internal(M + pixels.split(":")[0], f"{pixels.split(':')[1]}.pixel_values", "the patches (digested)"),
        Internal(qwen, f"{tower}.blocks", "the hooked blocks", instance=True),
        Internal(qwen, f"{tower}.merger", "pre-hook: the merger's input (feature kinds); called on merged rows "
                 "(patches, Dv)", instance=True),
        Internal(qwen, f"{tower}.spatial_merge_size", "patches per merged token", instance=True),
        Internal(qwen, f"{tower}.dtype", "the digest hashes the pixels as the tower reads them"),
        Internal(qwen, f"{tower}.device", "DominantDrop's early encode"),
        Internal(qwen, f"{block}.attn", "the hooked attention", instance=True),
        Internal(qwen, f"{block}.forward", "the block calls its attention with cu_seqlens by keyword (pre-hook)",
                 contains="cu_seqlens=cu_seqlens"),
    ]


def _qwen3_5(prefix: str) -> list[Internal]:
    """Qwen3.5 dense / MoE classes (`families/qwen_vl/vllm.py`): subclasses of vLLM's Qwen3-VL class, whose entry
    points, tower and processor (the Qwen3-VL entries) they inherit; only the model class and its info are theirs."""
    cls, q35 = f"{prefix}ForConditionalGeneration", M + "qwen3_5"
    return [
        *_model_class("qwen3_5", cls, "subclassed with the PreLLMQwen mixin (derives from Qwen3-VL's class)"),
        Internal(q35, f"{cls}.get_mrope_input_positions", "overridden: every kept token's original position",
                 ("input_tokens", "mm_features")),
        Internal(q35, f"{cls}.get_encoder_cudagraph_config", "overridden: images leave the encoder CUDA graphs", ()),
        Internal(q35, f"{cls}.embed_multimodal", "DominantDrop encodes a new request's image"),
        Internal(q35, f"{cls}.visual", "the tower (Qwen3-VL's Qwen3_VisionTransformer)", instance=True,
                 contains="Qwen3_VisionTransformer"),
        Internal(q35, f"{prefix}ProcessingInfo", "subclassed with the KeptCountInfo mixin (registered with "
                 "tokendrop's Qwen3-VL processor and vLLM's Qwen3VLDummyInputsBuilder, as vLLM registers it)"),
        Internal(q35, f"{prefix}ProcessingInfo.get_num_image_tokens", "overridden: the method's count",
                 ("*", "image_width", "image_height", "image_processor", "mm_kwargs")),
    ]


def _qwen_attention(module: str, attention: str) -> list[Internal]:
    qwen = M + module
    return [Internal(qwen, f"{attention}.apply_rotary_emb", "forward hook: rotated q and k stacked (2, N, H, hd)",
                     instance=True),
            Internal(qwen, f"{attention}.qkv", "forward hook: q, k, v fused as (3, H, hd) before the rotary "
                     "embedding (VisionZip's keys)", instance=True),
            Internal(qwen, f"{attention}.hidden_size_per_attention_head", "the softmax scale", instance=True),
            Internal(qwen, f"{attention}.forward", "pre-hook reads its cu_seqlens keyword", keywords=("cu_seqlens",))]


VLLM_INTERNALS: tuple[Internal, ...] = (
    # plugin entry point and registries (tokendrop/vllm/__init__.py, families/*/vllm.py)
    Internal("vllm", "ModelRegistry", "register(): tokendrop's architectures in every vLLM process"),
    Internal(M + "registry", "_ModelRegistry.register_model", "register(): name -> 'module:Class' (lazy)",
             keywords=("model_arch", "model_cls")),
    Internal("vllm.multimodal", "MULTIMODAL_REGISTRY", "tokendrop's processing info for its model classes"),
    Internal("vllm.multimodal.registry", "MultiModalRegistry.register_processor", "the same",
             keywords=("processor", "info", "dummy_inputs")),
    Internal("vllm.transformers_utils.config", "HFConfigParser.parse",
             "an hf_overrides callable is first called on a stand-in config whose model_type starts with dummy_ "
             "(Overrides passes it through)", contains='f"dummy_{model_type}"'),
    Internal("vllm.multimodal.processing", "BaseProcessingInfo.get_hf_config", "the processing side reads the method"),
    # LLaVA family (families/llava/vllm.py); tower scores (vllm/scores.py)
    *_llava("llava", "Llava", tiles=False),
    Internal(M + "llava", "LlavaDummyInputsBuilder", "registered with tokendrop's LLaVA(-NeXT) processing info"),
    Internal(M + "llava", "init_vision_tower_for_llava",
             "builds the tower only up to vision_feature_layer (checks.built_blocks)",
             contains="num_hidden_layers_override"),
    *_llava("llava_next", "LlavaNext", tiles=True),
    *_llava("llava_onevision", "LlavaOnevision", tiles=True),
    Internal(M + "llava_onevision", "LlavaOnevisionDummyInputsBuilder", "registered with tokendrop's processing info"),
    Internal(M + "llava_onevision", "LlavaOnevisionProcessingInfo.get_image_size_with_most_features",
             "overridden: the profiling image with the most kept tokens", ()),
    Internal("vllm.multimodal.parse", "ImageSize", "get_image_size_with_most_features returns one"),
    Internal("vllm.multimodal.parse", "ImageSize.width", "built by keyword"),
    Internal("vllm.multimodal.parse", "ImageSize.height", "built by keyword"),
    Internal("vllm.multimodal.parse", "ImageProcessorItems", "a request's images: len and get_image_size(i) (requests.py)"),
    Internal("vllm.multimodal.parse", "ImageEmbeddingItems", "precomputed image embeddings pass through unchanged"),
    Internal("vllm.multimodal.inputs", "MultiModalFieldConfig", "batched('image'): the per-image method field"),
    Internal("vllm", "LLM", "the offline engine gpu_check compares with the transformers path"),
    Internal("vllm", "SamplingParams", "greedy, one token, logprobs: gpu_check's first-token comparison"),
    Internal("vllm.model_executor.models.interns1", "InternS1ForConditionalGeneration", "vLLM's class for HF-format InternVL: subclassed (tower, pixel_shuffle, projector)"),
    Internal("vllm.model_executor.models.interns1", "InternS1MultiModalProcessor", "subclassed: image_tiles field, the method's placeholder count"),
    Internal("vllm.model_executor.models.interns1", "InternS1ProcessingInfo", "subclassed: get_num_image_tokens gives the method's count"),
    Internal("vllm.model_executor.models.interns1", "InternS1DummyInputsBuilder", "registered with tokendrop's InternVL processor"),
    Internal("vllm.model_executor.models.gemma4_mm", f"{GEMMA4}ForConditionalGeneration", "subclassed: _process_image_input, vision_tower.encoder.layers hooked"),
    Internal("vllm.model_executor.models.gemma4_mm", "Gemma4MultiModalProcessor", "subclassed: the method's placeholder count"),
    Internal("vllm.model_executor.models.gemma4_mm", "Gemma4ProcessingInfo", "subclassed: get_image_repl gives the method's count"),
    Internal("vllm.model_executor.models.gemma4_mm", "Gemma4DummyInputsBuilder", "registered with tokendrop's Gemma 4 processor"),
    Internal("vllm.multimodal.processing", "PromptUpdateDetails", "select_token_id: the image rows of a replacement"),
    Internal("vllm.multimodal.processing", "cached_encode", "tokenising the <img> / </img> markers as vLLM does"),
    *_tower("clip", "CLIP"),
    *_tower("siglip", "Siglip"),
    Internal("vllm.model_executor.layers.linear", "QKVParallelLinear", "qkv_proj: q, k, v concatenated in that order"),
    # Qwen-VL lineage (families/qwen_vl/vllm.py); tower scores (vllm/scores.py)
    *_qwen("qwen2_vl", "Qwen2VL", "Qwen2VisionTransformer", "Qwen2VisionBlock", "Qwen2VisionAttention",
           "qwen2_vl:Qwen2VLImagePixelInputs"),
    *_qwen("qwen2_5_vl", "Qwen2_5_VL", "Qwen2_5_VisionTransformer", "Qwen2_5_VisionBlock", "Qwen2_5_VisionAttention",
           "qwen2_5_vl:Qwen2_5_VLImagePixelInputs"),
    *_qwen("qwen3_vl", "Qwen3VL", "Qwen3_VisionTransformer", "Qwen3_VisionBlock", "Qwen2_5_VisionAttention",
           "qwen2_5_vl:Qwen2_5_VLImagePixelInputs"),
    *_qwen3_5("Qwen3_5"),
    *_qwen3_5("Qwen3_5Moe"),
    *_qwen_attention("qwen2_vl", "Qwen2VisionAttention"),
    *_qwen_attention("qwen2_5_vl", "Qwen2_5_VisionAttention"),
    Internal(M + "qwen2_5_vl", "Qwen2_5_VLImagePixelInputs.type", "image_embeds have no pixels to score"),
    Internal(M + "qwen2_5_vl", "Qwen2_5_VisionPatchMerger.ln_q", "pre-hook: the merger's input (its own hooks never "
             "run: support_torch_compile calls its forward)", instance=True),
    Internal(M + "qwen2_5_vl", "Qwen2_5_VisionPatchMerger.forward", "ln_q first, on the merger's input",
             contains="x = self.ln_q(x)"),
    Internal(M + "qwen2_5_vl", "Qwen2_5_VisionTransformer.prepare_encoder_metadata",
             "['reverse_indices']: the window order back to raster order", keywords=("grid_thw",),
             contains="reverse_indices"),
    Internal("vllm.multimodal.processing", "PromptReplacement", "_get_prompt_updates returns them (dataclass)"),
    Internal("vllm.multimodal.processing", "PromptReplacement.modality", "image replacements are swapped"),
    Internal("vllm.multimodal.processing", "PromptReplacement.target", "the image placeholder token"),
    Internal("vllm.multimodal.processing", "PromptReplacement.replacement", "replaced by dataclasses.replace"),
    Internal("vllm.multimodal.inputs", "MultiModalFieldElem.data", "out_mm_kwargs['image'][i]['image_grid_thw'].data"),
    Internal("vllm.multimodal.inputs", "MultiModalFeatureSpec.data", "the request's image (grid, pixels)"),
    Internal("vllm.multimodal.inputs", "MultiModalFeatureSpec.modality", "images are pruned, videos not"),
    Internal("vllm.multimodal.inputs", "MultiModalFeatureSpec.mm_position", "where each item's run is"),
    Internal("vllm.multimodal.inputs", "PlaceholderRange.offset", "the run's start"),
    Internal("vllm.multimodal.inputs", "PlaceholderRange.length", "the run's length"),
    Internal("vllm.multimodal.utils", "group_and_batch_mm_kwargs", "batches one request's image for an early encode",
             keywords=("device",)),
    Internal("vllm.v1.worker.encoder_cudagraph_defs", "EncoderCudaGraphConfig.modalities",
             "images removed (dataclasses.replace)"),
)


# ---- reading an entry -------------------------------------------------------------------------------
@dataclasses.dataclass
class Found:
    """What a release has under an entry's name: its parameters (None: not a function) and source."""

    params: tuple[str, ...] | None
    source: str


def check(entry: Internal, release) -> str | None:
    """None when `release` (ImportedVllm / SourceTree) has `entry` as tokendrop relies on it, else why not."""
    try:
        found = release.find(entry)
    except LookupError as err:
        return f"{entry.label}: {err}"
    if entry.params is not None or entry.keywords:
        if found.params is None:
            return f"{entry.label}: not a function any more"
        if entry.params is not None and found.params != entry.params:
            return f"{entry.label}: parameters {list(found.params)}, tokendrop overrides it with {list(entry.params)}"
        takes_any = any(p.startswith("**") for p in found.params)
        missing = [k for k in entry.keywords if k not in found.params and not takes_any]
        if missing:
            return f"{entry.label}: takes no {missing} (parameters {list(found.params)})"
    if entry.contains and entry.contains not in found.source:
        return f"{entry.label}: its source no longer contains {entry.contains!r} ({entry.relies_on})"
    return None


def check_all(release, entries=VLLM_INTERNALS) -> list[str]:
    """The problems of every entry in `release`, one line each ([]: every internal is as tokendrop reads it)."""
    return [problem for entry in entries if (problem := check(entry, release))]


def _parameters(args: ast.arguments, method: bool) -> tuple[str, ...]:
    """Parameter names of a def as `Internal.params` writes them ("*" before keyword-only ones)."""
    positional = [a.arg for a in [*args.posonlyargs, *args.args]]
    if method and positional and positional[0] in ("self", "cls"):
        positional = positional[1:]
    names = positional + ([f"*{args.vararg.arg}"] if args.vararg else ["*"] if args.kwonlyargs else [])
    names += [a.arg for a in args.kwonlyargs]
    return tuple(names + ([f"**{args.kwarg.arg}"] if args.kwarg else []))


def _signature_parameters(function) -> tuple[str, ...]:
    """The same for an imported function (its source's def: decorators may hide the signature)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return _parameters(node.args, method=True)


class SourceTree:
    """A vLLM release as source files (a folder holding the `vllm` package): read by parsing, not importing."""

    def __init__(self, root):
        self.root = Path(root)
        self._trees: dict[str, ast.Module] = {}
        self._texts: dict[str, str] = {}

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            base = self.root.joinpath(*module.split("."))
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if not path.exists():
                raise LookupError(f"no module {module}")
            self._texts[module] = path.read_text()
            self._trees[module] = ast.parse(self._texts[module], str(path))
        return self._trees[module]

    def top(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST]:
        """(module defining it, its node) for a module-level name, following imports and lazy re-exports."""
        if depth > 10:
            raise LookupError(f"{name} is re-exported in a loop")
        tree = self.tree(module)
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return module, node
        for node in ast.walk(tree):  # imports (also under `if TYPE_CHECKING` / try)
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self.top(self.absolute(module, node), alias.name, depth + 1)
        for node in ast.walk(tree):  # vllm/__init__.py's lazy table: {"Name": ".module:Name"}
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if (isinstance(key, ast.Constant) and key.value == name and isinstance(value, ast.Constant)
                            and isinstance(value.value, str) and ":" in value.value):
                        target, _, attr = value.value.partition(":")
                        return self.top(self.resolve_relative(module, target), attr, depth + 1)
        raise LookupError(f"{name} is not in {module}")

    def absolute(self, module: str, node: ast.ImportFrom) -> str:
        return self.resolve_relative(module, "." * node.level + (node.module or ""))

    def resolve_relative(self, module: str, target: str) -> str:
        level = len(target) - len(target.lstrip("."))
        if not level:
            return target
        package = module.split(".")
        is_package = (self.root.joinpath(*package) / "__init__.py").exists()
        base = package if is_package else package[:-1]
        base = base[: len(base) - (level - 1)]
        rest = target[level:]
        return ".".join(base + ([rest] if rest else []))

    def member(self, module: str, cls: ast.ClassDef, name: str, instance: bool, seen=()) -> tuple[str, ast.AST]:
        """(module defining it, its node): a class member (or `self.name = ...` in a method when
        `instance`), searched along the bases."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name and not instance:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and not instance:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return module, node
            if instance and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    targets = sub.targets if isinstance(sub, ast.Assign) else [getattr(sub, "target", None)]
                    if isinstance(sub, (ast.Assign, ast.AnnAssign)) and any(
                            isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                            and t.value.id == "self" for t in targets):
                        return module, sub
        for base in cls.bases:
            base = base.value if isinstance(base, ast.Subscript) else base  # Generic[...]
            if not isinstance(base, ast.Name) or (module, base.id) in seen:
                continue
            try:
                where, node = self.top(module, base.id)
            except LookupError:
                continue  # a base outside vLLM (nn.Module, Protocol, ...)
            if isinstance(node, ast.ClassDef):
                with_base = self.member_or_none(where, node, name, instance, (*seen, (module, base.id)))
                if with_base is not None:
                    return with_base
        raise LookupError(f"{cls.name} has no {'instance attribute ' if instance else ''}{name}")

    def member_or_none(self, module, cls, name, instance, seen):
        try:
            return self.member(module, cls, name, instance, seen)
        except LookupError:
            return None

    def find(self, entry: Internal) -> Found:
        top, *rest = entry.name.split(".")
        module, node = self.top(entry.module, top)
        if rest:
            if not isinstance(node, ast.ClassDef):
                raise LookupError(f"{top} is not a class")
            module, node = self.member(module, node, rest[0], entry.instance)
        params = _parameters(node.args, method=bool(rest)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        return Found(params, ast.get_source_segment(self._texts[module], node) or "")


class ImportedVllm:
    """The installed vLLM, imported: modules and names by import, instance attributes and sources
    through the defining files (`SourceTree` on the installed package)."""

    def __init__(self):
        import vllm

        self.tree = SourceTree(Path(vllm.__file__).parent.parent)

    def find(self, entry: Internal) -> Found:
        try:
            obj = importlib.import_module(entry.module)
        except ImportError as err:
            raise LookupError(f"cannot import {entry.module}: {err}") from None
        top, *rest = entry.name.split(".")
        for part in [top, *rest[:-1]] if entry.instance else [top, *rest]:
            if inspect.isclass(obj) and not hasattr(obj, part) and _annotated(obj, part):
                return Found(None, "")  # a field without a default (dataclass, TypedDict, TensorSchema)
            if not hasattr(obj, part):
                raise LookupError(f"{getattr(obj, '__name__', type(obj).__name__)} has no {part}")
            obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        if entry.instance:
            return self.tree.find(entry)  # set in a method: only the source says
        function = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
        if inspect.isfunction(function):
            source = textwrap.dedent(inspect.getsource(function))
            params = None if isinstance(obj, property) else _signature_parameters(function)
            return Found(params, source)
        try:
            source = inspect.getsource(obj) if inspect.isclass(obj) else ""
        except (OSError, TypeError):
            source = ""
        return Found(None, source)


def _annotated(cls: type, name: str) -> bool:
    return any(name in vars(base).get("__annotations__", {}) for base in cls.__mro__)


def main(argv: list[str]) -> int:
    """`python -m tokendrop.vllm.internals ROOT...`: each unpacked release's problems; exit 1 if any."""
    failed = 0
    for root in argv:
        problems = check_all(SourceTree(root))
        print(f"{root}: {len(VLLM_INTERNALS) - len(problems)}/{len(VLLM_INTERNALS)} internals as tokendrop reads them")
        for problem in problems:
            print(f"  {problem}")
        failed |= bool(problems)
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
