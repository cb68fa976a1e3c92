"""Per-patch scores from vLLM's own CLIP tower: read from the fused `qkv_proj` of the scored layers.

vLLM's CLIP attention returns no weights (and one row is all HiRED needs), so a forward hook keeps
the output of `layers[b].self_attn.qkv_proj` while the tower runs its normal forward, and the rows
are recomputed from those queries and keys exactly as `tokendrop.scoring` does from transformers'
`q_proj` / `k_proj`: the same tower pass, never a second one, never an N x N map for all heads.

T tiles (every partition of every image), L = N + 1 tokens ([CLS] first; L = N in a SigLIP tower),
H heads, hd head width.
"""

from __future__ import annotations

import contextlib

import torch

from tokendrop.scoring import received_attention


@contextlib.contextmanager
def recording(attach):
    """Yield the dict that forward hooks fill while the tower runs: `attach(kept)` registers them and returns
    their handles, which are removed on the way out (also on an error)."""
    kept = {}
    handles = attach(kept)
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def main_output(output):
    """A module's main output: vLLM's linears return (out, bias), SigLIP's layers (states, None)."""
    return output[0] if isinstance(output, tuple) else output


def record_linear_outputs(linears: dict):
    """Keep the output of each fused linear in `linears` ({block: module}) while the tower runs."""
    def attach(kept):
        def keep(block):
            return lambda module, args, output: kept.update({block: main_output(output)})

        return [linear.register_forward_hook(keep(block)) for block, linear in linears.items()]

    return recording(attach)


def record_qkv(layers, blocks):
    """Keep the fused qkv output (T, L, 3 * H * hd) of every encoder block in `blocks` while the tower runs."""
    return record_linear_outputs({block: layers[block].self_attn.qkv_proj for block in sorted(set(blocks))})


def split_heads(qkv: torch.Tensor, attention) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (T, L, H, hd) of a fused qkv output; `attention` is vLLM's `CLIPAttention`."""
    heads, head_dim = attention.num_heads_per_partition, attention.head_dim
    q, k, _ = qkv.chunk(3, dim=-1)
    T, L, _ = q.shape
    return q.reshape(T, L, heads, head_dim), k.reshape(T, L, heads, head_dim)


def cls_scores(qkv: torch.Tensor, attention, first: int = 1) -> torch.Tensor:
    """(T, N) fp32: the [CLS] query's softmax row over all keys, summed over heads, [CLS] column dropped
    (`first` is 1 for every tower that has a [CLS]: the capability check refuses the others)."""
    q, k = split_heads(qkv, attention)
    return cls_row(q, k, attention.scale, first)


def cls_row(q: torch.Tensor, k: torch.Tensor, scale: float, first: int = 1) -> torch.Tensor:
    """`cls_scores` from queries and keys (T, L, H, hd) (a tower whose q and k are separate: InternViT)."""
    q0 = q[:, :1].transpose(1, 2).float()  # (T, H, 1, hd)
    logits = (q0 @ k.transpose(1, 2).float().transpose(-1, -2)).squeeze(2) * scale  # (T, H, L)
    return logits.softmax(dim=-1)[:, :, first:].sum(dim=1)


def received_scores(qkv: torch.Tensor, attention, first: int = 1) -> torch.Tensor:
    """(T, N) fp32: the attention each patch receives from its tile's queries, averaged (DominantDrop);
    `first` is the first patch column (1 after a [CLS], 0 for SigLIP, which has none)."""
    q, k = split_heads(qkv, attention)
    return received_row(q, k, attention.scale, first)


def received_row(q: torch.Tensor, k: torch.Tensor, scale: float, first: int = 1) -> torch.Tensor:
    """`received_scores` from queries and keys (T, L, H, hd)."""
    T, L, H, hd = q.shape
    segments = [(t * L, (t + 1) * L) for t in range(T)]
    received = received_attention(q.reshape(T * L, H, hd), k.reshape(T * L, H, hd), scale, segments)
    return received.view(T, L)[:, first:]


def key_means(qkv: torch.Tensor, attention, first: int = 1) -> torch.Tensor:
    """(T, N, hd) fp32: the block's keys (bias included) averaged over heads, [CLS] row dropped: VisionZip's
    metric, as `tokendrop.families.llava.vision.head_mean_keys` computes it from transformers' `k_proj`."""
    _, k = split_heads(qkv, attention)
    return k.float().mean(dim=2)[:, first:]


#: score kind (`tokendrop.methods.base.Score.kind`) -> how it is computed here from the fused qkv output (the
#: other feature kinds: `feature_inputs`)
SCORERS = {"cls": cls_scores, "received": received_scores, "keys": key_means}
#: the same from separate queries and keys
QK_SCORERS = {"cls": cls_row, "received": received_row}


def feature_inputs(blocks: dict, features: torch.Tensor, projector) -> dict[str, torch.Tensor]:
    """The feature kinds among `blocks` (name -> (kind, block)) from the tower's output, as the transformers
    path gives them: "features" (T, N, Dv) fp32, "projected" (T, N, D) fp32 (vLLM's projector on every tile)."""
    inputs = {}
    for name, (kind, _) in blocks.items():
        if kind == "features":
            inputs[name] = features.float()
        elif kind == "projected":
            with torch.no_grad():
                inputs[name] = projector(features).float()
    return inputs


def record_output(layer, wanted: bool):
    """Keep the output of `layer` ((T, L, Dv): the feature block's states, [CLS] first) when `wanted`:
    a merging method feeds the [CLS] state, which vLLM's feature selection drops."""
    def attach(kept):
        if not wanted:
            return []
        return [layer.register_forward_hook(lambda module, args, output: kept.update(states=main_output(output)))]

    return recording(attach)


def record_attention_qk(layers, blocks):
    """InternViT (vLLM's `InternS1VisionLayer`): keep the queries and keys (T, L, H * hd), after the qk norms,
    that each block in `blocks` hands its inner attention (`attention.attn(q, k, v)`) while the tower runs."""
    def attach(kept):
        return [layers[block].attention.attn.register_forward_pre_hook(
                    lambda module, args, block=block: kept.update({block: args[:2]}))
                for block in sorted(set(blocks))]

    return recording(attach)


def record_merger_input(entry, wanted: bool):
    """Qwen-VL: keep the input of `entry`, the module that first sees vLLM's patch merger input ((patches, 1, Dv),
    the blocks' order), when `wanted`."""
    def attach(kept):
        return [entry.register_forward_pre_hook(lambda module, args: kept.update(input=args[0]))] if wanted else []

    return recording(attach)


def record_rotated_qk(blocks, indices):
    """Qwen2.5-VL: the rotated queries and keys of every vision block in `indices`, and its `cu_seqlens`.

    vLLM's `Qwen2_5_VisionAttention` runs the fused `qkv` projection and then `apply_rotary_emb` on q and
    k stacked; a forward hook on the latter keeps (2, N, H, hd) (q, then k, the tower's one sequence of
    N patches in window order), a forward pre-hook on the attention its segments.
    """
    def attach(kept):
        handles = []
        for block in sorted(set(indices)):
            attention = blocks[block].attn

            def segments(module, args, kwargs, block=block):
                kept.setdefault(block, {})["cu_seqlens"] = kwargs["cu_seqlens"]

            def rotated(module, args, output, block=block):
                kept.setdefault(block, {})["qk"] = output

            handles.append(attention.register_forward_pre_hook(segments, with_kwargs=True))
            handles.append(attention.apply_rotary_emb.register_forward_hook(rotated))
        return handles

    return recording(attach)


def record_qwen_keys(blocks, indices):
    """Qwen2-VL / Qwen2.5-VL: the output of the fused `qkv` linear ((N, 1, 3 * H * hd), the tower's one
    sequence in the blocks' order, before the rotary embedding) of every vision block in `indices`."""
    return record_linear_outputs({block: blocks[block].attn.qkv for block in sorted(set(indices))})


def qwen_key_means(qkv: torch.Tensor, attention, merge_unit: int, reverse_indices: torch.Tensor,
                   sizes: list[int]) -> list[torch.Tensor]:
    """Per image (N_i, merge_unit * hd) fp32, raster order: each merge group's patch keys averaged over heads
    and concatenated, as the transformers path gives "keys" (q, k, v laid out (3, H, hd) in the fused output)."""
    hd = attention.hidden_size_per_attention_head
    keys = qkv.reshape(qkv.shape[0], 3, -1, hd)[:, 1].float().mean(dim=1)  # (N, hd) blocks' order
    groups = keys.reshape(-1, merge_unit * hd)[reverse_indices.to(keys.device)]
    return list(torch.split(groups, sizes))


def qwen_received_scores(recorded: dict, attention, merge_unit: int, reverse_indices: torch.Tensor,
                         sizes: list[int]) -> list[torch.Tensor]:
    """Per image, (N_i,) fp32: the attention each merged token's patch group receives (summed over the
    group, averaged over heads and its image's queries), in raster order, as the transformers path."""
    q, k = recorded["qk"].flatten(0, 1).unflatten(0, (2, -1)).unbind(0)  # each (N, H, hd)
    bounds = recorded["cu_seqlens"].tolist()
    scale = attention.hidden_size_per_attention_head**-0.5
    patches = received_attention(q, k, scale, list(zip(bounds[:-1], bounds[1:])))  # (N,) window order
    tokens = patches.view(-1, merge_unit).sum(dim=1)[reverse_indices.to(patches.device)]  # raster order
    return list(torch.split(tokens, sizes))


def qwen_feature_inputs(blocks: dict, recorded: dict, embeddings, merge_unit: int, reverse_indices: torch.Tensor,
                        sizes: list[int]) -> dict[str, list[torch.Tensor]]:
    """The feature kinds among `blocks`, per image in raster order, as the transformers path gives them:
    "features" (N_i, merge_unit * Dv) fp32, the merger's input grouped; "projected" (N_i, D) fp32, its output."""
    inputs = {}
    for name, (kind, _) in blocks.items():
        if kind == "features":
            hidden = recorded["input"].detach().float()
            groups = hidden.reshape(-1, merge_unit * hidden.shape[-1])[reverse_indices.to(hidden.device)]
            inputs[name] = list(torch.split(groups, sizes))
        elif kind == "projected":
            inputs[name] = [rows.detach().float() for rows in embeddings]
    return inputs
