"""What the Qwen-VL families share: a native-resolution grid, a 2x2 patch merger, M-RoPE positions.

An image of H x W pixels is resized (`smart_resize`) to multiples of patch * merge pixels and cut
into (H'/patch) x (W'/patch) patches; the merger turns every 2x2 group into one LLM token, so an
image gives one partition of (H'/28) x (W'/28) tokens (Qwen3-VL: 32 px), raster order, no [CLS],
no base image. The LLM places image tokens by 3-D rotary positions (t, h, w) from `get_rope_index`.

Pre-LLM methods patch four seams (instance attributes and a hook, undone by `remove()`):
  * `get_image_features`: the stock one (the tower, the merger, Qwen3-VL's DeepStack features),
    then the method's kept rows of every image (the same rows of every DeepStack level);
  * `get_rope_index`: each image's short run of placeholders is expanded to its full grid for the
    stock function, and the positions of the kept tokens are gathered back, so kept tokens keep
    their original (t, h, w) and the text after an image keeps its original positions;
  * `get_video_features`: refuses (as the other two seams do when a video reaches them);
  * a forward pre-hook on the inner model: `generate()` computes position ids before the encoder
    runs (the selection is not known yet), so at prefill the image rows are computed again from the
    selection the encoder just made (when `generate()` leaves the encoding to the forward, as for
    Qwen3.5 at transformers 5.19, the hook encodes first). Decoding continues at the original maximum + 1.
Videos are refused by pre-LLM methods (they drop image tokens only).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from tokendrop.families.base import Family, Shapes, resolve
from tokendrop.lazy import torch
from tokendrop.methods.base import FEATURE_KINDS, PreLLMMethod
from tokendrop.methods.layout import Layout


#: the Qwen-VL chat template, reduced to user turns with images and text (models built from an arch
#: config or a tiny config, whose tokenizers carry no template of their own)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """The config fields naming Qwen-VL's special tokens, as `tokenizer` numbers them."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


@dataclass(frozen=True)
class QwenGeometry:
    """Image size -> `Layout` (one partition of merged tokens) as the Qwen-VL image processor resizes it."""

    patch: int  # pixels per patch side (14; Qwen3-VL 16)
    merge: int  # patches per merged token side (2)
    min_pixels: int
    max_pixels: int

    def layout(self, image_size) -> Layout:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch * self.merge
        height, width = smart_resize(int(image_size[0]), int(image_size[1]), factor=factor,
                                     min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return Layout(grid=height // factor, grid_cols=width // factor)

    def input_layout(self, image_inputs: dict, image_idx: int):
        """(Layout, resized (height, width)) of image `image_idx` from its `image_grid_thw`."""
        t, h, w = (int(x) for x in image_inputs["image_grid_thw"][image_idx])
        return self.grid_layout(t, h, w), (h * self.patch, w * self.patch)

    def grid_layout(self, t: int, h: int, w: int) -> Layout:
        """The layout of an image's (t, h, w) patch grid: one partition of (h / merge) x (w / merge) tokens."""
        if t != 1:
            raise ValueError(f"an image has one temporal patch, got a grid of {t} (videos are not dropped before the LLM)")
        return Layout(grid=h // self.merge, grid_cols=w // self.merge)


class QwenVLStyle(Family):
    """Base of the Qwen-VL family adapters."""

    pre_llm = projects_all = features = True
    positions = "mrope"
    decoder = "tokendrop.engine.decoders:LlamaDecoder"  # Qwen2 / Qwen3 text models, M-RoPE positions
    tokenizer = "tokendrop.families.qwen_vl.tiny:tiny_qwen_tokenizer"
    default_pixels = (56 * 56, 28 * 28 * 1280)  # the processors' defaults (min, max)

    def __init__(self, model):
        super().__init__(model)
        self.merge = self.config.vision_config.spatial_merge_size
        self.geometry = self.config_geometry(self.config)

    @classmethod
    def config_geometry(cls, config) -> QwenGeometry:
        """The merged-token grid at the processors' default pixel limits (a processor's own limits:
        `processor_geometry`)."""
        vision = config.vision_config
        return QwenGeometry(vision.patch_size, vision.spatial_merge_size, *cls.default_pixels)

    @classmethod
    def config_score_blocks(cls, config, method: PreLLMMethod) -> dict[str, tuple[str, int]]:
        """name -> (score kind, 0-based vision block) of every score `method` reads: 'received' (no [CLS]),
        and the feature kinds, the merger's input ('features') and output ('projected') after the last block."""
        blocks = {}
        for name, score in method.scores().items():
            kind = score.resolve(cls_token=False)
            if kind in FEATURE_KINDS:
                blocks[name] = (kind, config.vision_config.depth - 1)
                continue
            if kind != "received":
                raise ValueError(f"{type(method).__name__} reads a {score.kind!r} score; the {cls.name} tower has no "
                                 "[CLS] token and gives 'received' attention scores (and the feature kinds) only")
            layer = score.layer
            if score.clamp and layer is not None:
                layer = min(layer, config.vision_config.depth - 1)
            blocks[name] = (kind, cls.config_score_block(config, layer))
        return blocks

    @classmethod
    def config_score_block(cls, config, layer: int | None) -> int:
        """The vision block (0-based) that scores; None: the last one."""
        depth = config.vision_config.depth
        block = depth - 1 if layer is None else layer
        if not -depth <= block < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth}) for a {depth}-block vision tower, got {block}")
        return block % depth

    @property
    def tower(self):
        return self.base.visual

    def processor_geometry(self, processor):
        images = processor.image_processor
        size = getattr(images, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda key, default=None: getattr(size, key, default)
        return QwenGeometry(images.patch_size, images.merge_size, get("shortest_edge") or self.default_pixels[0],
                            get("longest_edge") or self.default_pixels[1])

    def processor_expects(self) -> dict:
        vision = self.config.vision_config
        return {"image_processor.patch_size": vision.patch_size, "image_processor.merge_size": vision.spatial_merge_size}

    def hint(self, missing: list[str]) -> str:
        if "renumber" in missing:
            return ": M-RoPE gives every image token a 3-D position, which renumbering would destroy"
        return ""

    # ---- pre-LLM -------------------------------------------------------------------------------------
    def pre_llm_patches(self, method: PreLLMMethod, record, geometry: QwenGeometry):
        """The three seams of the module docstring: (attribute patches on the inner model, pre-hooks)."""
        state = {"kept": None, "grids": None}  # of the last encoder call: kept indices per image, image_grid_thw
        features = self.encoder_patch(method, record, geometry, state)
        rope_index = self.rope_index_patch(state)

        def refresh_positions(module, args, kwargs):
            ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
            refuse_videos(kwargs.get("pixel_values_videos"), kwargs.get("video_grid_thw"))
            if ids is None or positions is None or positions.ndim != 3:
                return None
            if not bool((ids == self.image_token_id).any()) or ids.shape[1] != positions.shape[-1]:
                return None
            if kwargs.get("mm_encoder_outputs") is None:
                if kwargs.get("pixel_values") is None:
                    return None
                # a generate() that does not encode before the prefill (Qwen3.5 at transformers 5.19: its
                # model declares no image modality there): encode here, as later versions do, so that the
                # positions can follow the selection
                encoded = module.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"), return_dict=True)
                kwargs = {**kwargs, "pixel_values": None, "mm_encoder_outputs": {"image": encoded}}
            # the encoder's own grids, to which its kept indices are aligned (generate() may pass expanded
            # copies, or none, to the prefill)
            rope, _ = rope_index(ids, mm_token_type_ids=kwargs.get("mm_token_type_ids"), image_grid_thw=state["grids"],
                                 attention_mask=kwargs.get("attention_mask"))
            positions = positions.clone()
            positions[-3:] = rope.to(positions.device)  # the t/h/w rows (a 4-row tensor keeps its text row)
            return args, {**kwargs, "position_ids": positions}

        def get_video_features(*args, **kwargs):  # generate() and forward() encode videos here, whatever else they pass
            refuse_videos(True, None)

        return ({"get_image_features": features, "get_rope_index": rope_index, "get_video_features": get_video_features},
                [refresh_positions])

    def encoder_patch(self, method: PreLLMMethod, record, geometry: QwenGeometry, state: dict):
        """A `get_image_features`: the stock one, then each image's kept rows (and DeepStack rows)."""
        base, stock = self.base, type(self.base).get_image_features
        scorer = self.scorer(method)

        def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
            with scorer(image_grid_thw) as scores:
                outputs = stock(base, pixel_values, image_grid_thw, **kwargs)
                scores.update(scorer.projected(outputs.pooler_output))
            kept, packed, selections = [], [], []
            for i, (rows, grid) in enumerate(zip(outputs.pooler_output, image_grid_thw.tolist())):
                layout = geometry.grid_layout(*grid)
                inputs = {name: s[i][None] for name, s in scores.items()}
                if method.merges:  # kept rows, then the merged rows through the stock merger, at their anchors' positions
                    merged = method.merge(layout, inputs, cls=False)[0]
                    keep = torch.cat([merged.keep, merged.anchors]).to(rows.device)
                    contextual = self.project_merged(merged.rows, rows.dtype)
                    packed.append(torch.cat([rows[merged.keep.to(rows.device)], contextual]))
                else:
                    keep = method.select(layout, inputs)[0].to(rows.device)  # (K,)
                    packed.append(rows[keep])
                kept.append(keep)
                selections.append(torch.stack([torch.zeros_like(keep), keep // layout.cols, keep % layout.cols], dim=1))
            if getattr(outputs, "deepstack_features", None) is not None:  # Qwen3-VL: the same rows at every level
                outputs.deepstack_features = [tuple(f[k] for f, k in zip(level, kept)) for level in outputs.deepstack_features]
            outputs.pooler_output = tuple(packed)
            state["kept"], state["grids"] = kept, image_grid_thw
            record(selections)
            return outputs

        return get_image_features

    def project_merged(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        """(M, D): merged rows of the merger's input, (M, merge**2 * Dv) as "features" gives them, through
        the stock merger (its per-patch norm, then its MLP on each group)."""
        return self.tower.merger(rows.to(dtype).reshape(-1, rows.shape[-1] // self.merge**2))

    def scorer(self, method: PreLLMMethod):
        """A context manager factory: given image_grid_thw, yields a dict name -> per-image (N_i,)
        scores (or (N_i, width) features) in raster order of the merged grid, filled while the tower
        runs; its `projected(pooler_output)` gives the "projected" inputs from the merger's output."""
        blocks = self.config_score_blocks(self.config, method)
        scorer = lambda image_grid_thw: ReceivedScores(self, blocks, image_grid_thw)  # noqa: E731
        scorer.projected = lambda rows: {name: [r.detach().float() for r in rows]
                                         for name, (kind, _) in blocks.items() if kind == "projected"}
        return scorer

    def block_order(self, image_grid_thw):
        """The merge groups' order inside the blocks (None: raster order, the processor's)."""
        return None

    def rope_index_patch(self, state: dict):
        """A `get_rope_index` that takes runs of kept placeholders (see the module docstring)."""
        base, stock = self.base, type(self.base).get_rope_index
        merge = self.merge

        def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                           attention_mask=None, **kwargs):
            refuse_videos(kwargs.get("pixel_values_videos"), video_grid_thw)  # generate() asks here first
            B, L = input_ids.shape
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == self.image_token_id).long()
            grids = image_grid_thw.tolist() if image_grid_thw is not None else []
            kept = state["kept"] if state["kept"] is not None and len(state["kept"]) == len(grids) else None
            valid_rows = [attention_mask[b].bool() if attention_mask is not None else torch.ones(L, dtype=torch.bool)
                          for b in range(B)]
            runs = [[(key, len(list(group))) for key, group in itertools.groupby(mm_token_type_ids[b][valid].tolist())]
                    for b, valid in enumerate(valid_rows)]
            images = images_per_row([sum(key == 1 for key, _ in row) for row in runs], len(grids))
            positions = torch.zeros(3, B, L, dtype=input_ids.dtype, device=input_ids.device)
            deltas = []
            for b, valid in enumerate(valid_rows):
                ids, types = input_ids[b][valid], mm_token_type_ids[b][valid]
                row_images = iter(images[b])
                long_ids, long_types, picks, grid_rows, start = [], [], [], [], 0
                for key, length in runs[b]:
                    if key == 1:  # an image: expand its placeholders to the full merged grid
                        image = next(row_images)
                        grid = grids[image]
                        full = grid[0] * grid[1] * grid[2] // merge**2
                        chosen = kept[image] if kept is not None else None
                        if chosen is None or chosen.numel() != length:
                            chosen = torch.arange(length)  # provisional: refreshed once the encoder has chosen
                        picks.append(len(long_ids) + chosen.cpu())
                        long_ids += [self.image_token_id] * full
                        long_types += [1] * full
                        grid_rows.append(grid)
                    else:
                        picks.append(torch.arange(len(long_ids), len(long_ids) + length))
                        long_ids += ids[start:start + length].tolist()
                        long_types += types[start:start + length].tolist()
                    start += length
                as_tensor = lambda x: torch.tensor([x], dtype=input_ids.dtype, device=input_ids.device)  # noqa: E731
                grid_tensor = torch.tensor(grid_rows, device=input_ids.device) if grid_rows else None
                full_positions, _ = stock(base, as_tensor(long_ids), mm_token_type_ids=as_tensor(long_types),
                                          image_grid_thw=grid_tensor)
                short = full_positions[:, 0, torch.cat(picks).to(input_ids.device)]  # (3, valid length)
                positions[:, b, valid] = short
                deltas.append(int(short.max()) + 1 - short.shape[1])
            return positions, torch.tensor(deltas, device=input_ids.device)[:, None]

        return get_rope_index

    # ---- costs ---------------------------------------------------------------------------------------
    def vision_work(self, layout) -> tuple[int, int]:
        """One 'tile' of 4 patches per LLM token (window attention counted as full: an upper bound)."""
        return 1, layout.patches * self.merge**2

    def token_pixels(self) -> int:
        return self.config.vision_config.patch_size * self.merge

    @classmethod
    def build_processor(cls, image_processor, tokenizer, chat_template=None, **settings):
        from tokendrop.processors import image_only

        processor_class = image_only(resolve(cls.processor_class))  # no video processor: no torchvision needed
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                               chat_template=chat_template or QWEN_CHAT_TEMPLATE, **settings)

    @classmethod
    def bind_tokenizer(cls, config, tokenizer) -> None:
        for name, value in qwen_token_ids(tokenizer).items():
            setattr(config, name, value)

    def mlp_width(self, mlp) -> int:
        """The SwiGLU width m a token runs through in a decoder layer's MLP (cost: 3 d x m matrices)."""
        return mlp.gate_proj.weight.shape[0]

    def shapes(self) -> Shapes:
        import torch as torch_

        lm, tower = self.language_model, self.tower
        layer = next(layer for layer in lm.layers if hasattr(layer, "self_attn"))  # Qwen3.5: layer 0 is linear attention
        attn, lm_mlp = layer.self_attn, layer.mlp
        block = tower.blocks[0]
        linears = lambda module: [m.weight.shape for m in module.modules() if isinstance(m, torch_.nn.Linear)]  # noqa: E731
        mlp = linears(block.mlp)
        mlp_out = mlp[0][0]
        conv = tower.patch_embed.proj.weight  # (vd, 3, t, p, p)
        merger = [x for shape in linears(tower.merger) for x in (shape[1], shape[0])]
        return Shapes(d=attn.q_proj.weight.shape[1], m=self.mlp_width(lm_mlp), depth=len(lm.layers),
                      q_width=attn.q_proj.weight.shape[0], kv_width=attn.k_proj.weight.shape[0],
                      vocab=self.model.lm_head.weight.shape[0], vd=block.attn.qkv.weight.shape[1], vm=mlp_out,
                      vision_depth=len(tower.blocks), patch_inputs=conv[0].numel(), projector=tuple(merger),
                      vision_tokens_extra=0, vision_mlp_matrices=len(mlp))


def refuse_videos(pixel_values_videos, video_grid_thw) -> None:
    """Pre-LLM methods drop image tokens only: a video in the inputs is refused, from `forward` and
    from `generate()` alike."""
    if pixel_values_videos is not None or video_grid_thw is not None:
        raise ValueError("pre-LLM methods drop image tokens; video inputs are not supported while one is "
                         "applied (remove the handle, or use an in-LLM method)")


def images_per_row(counts: list[int], images: int) -> list[list[int]]:
    """Which encoded images each row's image runs are, in order.

    `counts[b]` is the number of images in row b of `input_ids`; the encoder saw `images` images, each
    prompt's in order. Rows hold them one after another, or, after `generate()` expanded every prompt
    into r consecutive rows (`num_beams`, `num_return_sequences`: `repeat_interleave`), each block of
    r rows holds the same prompt's images.
    """
    total = sum(counts)
    if total == images:
        ends = list(itertools.accumulate(counts))
        return [list(range(end - n, end)) for n, end in zip(counts, ends)]
    r = total // images if images else 0
    blocks = [counts[b:b + r] for b in range(0, len(counts), r)] if r > 1 and len(counts) % r == 0 else []
    if r * images != total or not blocks or any(len(set(block)) != 1 for block in blocks):
        raise RuntimeError(f"{total} image placeholder runs in input_ids over {len(counts)} rows do not match the "
                           f"{images} images the encoder saw, nor an expansion of them by generate()")
    once = images_per_row([block[0] for block in blocks], images)
    return [once[b // r] for b in range(len(counts))]


class ReceivedScores:
    """Forward pre-hooks on the scoring blocks: per image, the attention each LLM token's 2x2 patch
    group receives (summed over the group), in raster order of the merged grid; and on the merger,
    for "features": each group's four patch states concatenated, (N_i, 4 * Dv); for "keys", each
    group's four patch keys (mean over heads) concatenated, (N_i, 4 * hd)."""

    def __init__(self, family: QwenVLStyle, blocks: dict[str, tuple[str, int]], image_grid_thw):
        self.family, self.blocks, self.grids = family, blocks, image_grid_thw
        self.scores, self.hooks = {}, []

    def __enter__(self) -> dict:
        from tokendrop.scoring import received_attention_qwen

        for name, (kind, index) in self.blocks.items():
            if kind == "features":
                self.hooks.append(self.family.tower.merger.register_forward_pre_hook(
                    lambda module, args, name=name: self.scores.update({name: self.merger_input(args[0])})))
            if kind == "keys":
                self.hooks.append(self.family.tower.blocks[index].register_forward_pre_hook(
                    lambda module, args, kwargs, name=name: self.scores.update(
                        {name: self.block_keys(module, args[0] if args else kwargs["hidden_states"])}), with_kwargs=True))
            if kind != "received":
                continue
            block = self.family.tower.blocks[index]

            def hook(module, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                with torch.no_grad():
                    patches = received_attention_qwen(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])
                self.scores[name] = self.per_image(patches)

            self.hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        return self.scores

    def block_keys(self, block, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Per image (N_i, merge**2 * hd) fp32: the block's keys (before the rotary embedding) averaged over
        heads, each merge group's patches concatenated (VisionZip's metric)."""
        attn, merge = block.attn, self.family.merge
        with torch.no_grad():
            N = hidden.shape[0]
            _, k, _ = attn.qkv(block.norm1(hidden)).reshape(N, 3, attn.num_heads, -1).unbind(1)  # (N, H, hd)
            keys = k.float().mean(dim=1)  # (N, hd)
        return self.per_image(keys.reshape(-1, merge * merge * keys.shape[-1]), grouped=True)

    def merger_input(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Per image (N_i, merge**2 * Dv) fp32: the merger's input (patches, Dv), one row per merge group."""
        merge = self.family.merge
        return self.per_image(hidden.detach().float().reshape(-1, merge * merge * hidden.shape[-1]), grouped=True)

    def per_image(self, patches: torch.Tensor, grouped: bool = False) -> list[torch.Tensor]:
        merge = self.family.merge
        tokens = patches if grouped else patches.view(-1, merge * merge).sum(dim=1)  # (tokens, ...) in the blocks' order
        order = self.family.block_order(self.grids)
        if order is not None:
            tokens = tokens[torch.argsort(order.to(tokens.device))]  # back to raster order
        sizes = (self.grids.prod(-1) // merge**2).tolist()
        return list(torch.split(tokens, sizes))

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return False

