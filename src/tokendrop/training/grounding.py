"""Where does a trained model's answer look? Attention of the answer-predicting token on the patches
of the objects the question is about, per LM layer and question type.

    python -m tokendrop.training.grounding --model DIR --data /work/data/val --n 200

For every question (the first turn, as at evaluation) and every layer, the attention mass (mean over
heads, and the grounded head of training) that the token before the answer puts on the image tokens
of the question's objects (``targets.focus_mask``), next to the share of image tokens those objects
cover (what attention spread evenly over the image would give).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tokendrop.data.dataset import load_dataset
from tokendrop.scoring import query_attention_rows
from tokendrop.training.batches import collate, encode_example
from tokendrop.training.loop import batch_token_patches, grounding_targets


@torch.no_grad()
def grounding_report(model, processor, samples, batch: int = 20, head: int = 0) -> dict:
    """Per question type: ``share`` (objects' share of image tokens), ``head_mean`` (B, layers) mass
    averaged over heads, ``head`` the same for head ``head``. Returns {type: {...}} of floats/lists."""
    layers = model.model.language_model.layers
    captured: dict = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: captured.__setitem__(i, (a[0] if a else k["hidden_states"], k["position_embeddings"])),
        with_kwargs=True) for i, layer in enumerate(layers)]
    tile = model.config.vision_config.image_size
    sums: dict = defaultdict(lambda: {"n": 0, "share": 0.0, "head_mean": np.zeros(len(layers)), "head": np.zeros(len(layers))})
    rng = np.random.default_rng(0)
    model.eval()
    try:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            examples = [encode_example(processor, s, rng, 0, tile) for s in chunk]
            b = collate(examples, processor.tokenizer.pad_token_id)
            model(**b["inputs"])
            query, target, valid = grounding_targets(b, batch_token_patches(model, b))  # (B, Q), (B, Q, L), (B, Q)
            image = b["inputs"]["input_ids"] == model.config.image_token_id  # (B, L)
            mask = b["inputs"]["attention_mask"].bool()
            per_layer = []
            for i, layer in enumerate(layers):
                hidden, rope = captured[i]
                rows = query_attention_rows(layer, hidden, rope, query[:, :1], key_mask=mask)[:, :, 0]  # (B, H, L)
                per_layer.append((rows * target[:, None, 0]).sum(-1))  # (B, H)
            mass = torch.stack(per_layer, dim=1)  # (B, layers, H)
            for k, s in enumerate(chunk):
                if not valid[k, 0]:
                    continue
                entry = sums[s.type]
                entry["n"] += 1
                entry["share"] += float(target[k, 0].sum() / image[k].sum())
                entry["head_mean"] += mass[k].mean(dim=-1).numpy()
                entry["head"] += mass[k, :, head].numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return {t: {"n": e["n"], "share": e["share"] / e["n"], "head_mean": (e["head_mean"] / e["n"]).round(3).tolist(),
                "head": (e["head"] / e["n"]).round(3).tolist()} for t, e in sorted(sums.items())}


def main(argv=None) -> None:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model folder trained by tokendrop train")
    p.add_argument("--data", required=True, help="a synthetic dataset folder (tokendrop data)")
    p.add_argument("--n", type=int, default=200, help="questions (default 200)")
    p.add_argument("--head", type=int, default=0, help="the grounded head of training (default 0)")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    report = grounding_report(model, processor, load_dataset(args.data, limit=args.n), head=args.head)
    print(f"attention mass on the question's objects, per LM layer (mean over heads | head {args.head})")
    for qtype, r in report.items():
        print(f"{qtype:7s} n={r['n']:3d} share of image tokens {r['share']:.3f}")
        print("   mean over heads " + " ".join(f"{v:5.3f}" for v in r["head_mean"]))
        print(f"   head {args.head}          " + " ".join(f"{v:5.3f}" for v in r["head"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
