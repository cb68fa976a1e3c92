"""Where does a trained model's answer look? Attention of the answer-predicting token on the patches
of the objects the question is about, per LM layer and question type.

    python -m recipes.default_model.grounding --model DIR --data /work/data/val --n 200

(from the repository root, where ``recipes`` imports as a package)

For every question (the first turn, as at evaluation) and every layer, the attention mass (mean over
heads, and the grounded head of training) that the token before the answer puts on the image tokens
of the question's objects (``targets.focus_mask``), next to the share of image tokens those objects
cover (what attention spread evenly over the image would give). Then the tally head
(``losses.tally_loss``): its attention on itself against the 1 / (n + 1) it was trained to put there,
by the number n of objects that match the question.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from tokendrop.data import load_dataset
from tokendrop.scoring import query_attention_rows

from recipes.default_model.batches import collate, encode_example
from recipes.default_model.token_patches import batch_token_patches, grounding_targets, tally_counts
from recipes.default_model.targets import TALLY_MARKS


@contextmanager
def _layer_inputs(layers):
    """Capture each layer's input and RoPE tables on every forward: yields {layer index: (hidden, rope)}."""
    captured: dict = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: captured.__setitem__(i, (a[0] if a else k["hidden_states"], k["position_embeddings"])),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def _batches(model, processor, samples, batch: int, tally: bool = False, mark: str = "objects"):
    """Right-padded batches of the samples' first turn (as at evaluation), run through ``model``."""
    tile = model.config.vision_config.image_size
    rng = np.random.default_rng(0)
    model.eval()
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        examples = [encode_example(processor, s, rng, 0, tile, lead=tally, tally=tally, tally_mark=mark) for s in chunk]
        for e in examples:
            e["tally"] = e["tally"][:1]  # the answer-predicting position (lead positions follow it)
        b = collate(examples, processor.tokenizer.pad_token_id)
        model(**b["inputs"])
        yield chunk, b


@torch.no_grad()
def grounding_report(model, processor, samples, batch: int = 20, head: int = 0) -> dict:
    """Per question type: ``share`` (objects' share of image tokens), ``head_mean`` (B, layers) mass
    averaged over heads, ``head`` the same for head ``head``. Returns {type: {...}} of floats/lists."""
    layers = model.model.language_model.layers
    sums: dict = defaultdict(lambda: {"n": 0, "share": 0.0, "head_mean": np.zeros(len(layers)), "head": np.zeros(len(layers))})
    with _layer_inputs(layers) as captured:
        for chunk, b in _batches(model, processor, samples, batch):
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
    return {t: {"n": e["n"], "share": e["share"] / e["n"], "head_mean": (e["head_mean"] / e["n"]).round(3).tolist(),
                "head": (e["head"] / e["n"]).round(3).tolist()} for t, e in sorted(sums.items())}


@torch.no_grad()
def tally_report(model, processor, samples, layer: int = 3, head: int = 1, batch: int = 20, mark: str = "objects") -> dict:
    """What the tally head (``losses.tally_loss``) does at each answer-predicting token, by the number n
    of objects matching the question: {n: {"questions", "own" (mean attention on itself), "target"
    (1 / (n + 1)), "own_std", "objects" (mean mass on the matching objects' tokens: all of them, or
    their centre patches with ``mark="centres"``)}}."""
    found: dict = defaultdict(list)
    with _layer_inputs(model.model.language_model.layers) as captured:
        for _, b in _batches(model, processor, samples, batch, tally=True, mark=mark):
            query, target, _ = grounding_targets(b, batch_token_patches(model, b), key="tally")
            counts, valid = tally_counts(b["tally"], query.shape[1])
            hidden, rope = captured[layer]
            rows = query_attention_rows(model.model.language_model.layers[layer], hidden, rope, query,
                                        key_mask=b["inputs"]["attention_mask"].bool())[:, head]  # (B, Q, L)
            own = rows.gather(-1, query[..., None])[..., 0]  # (B, Q)
            mass = (rows * target).sum(-1)
            for k in valid[:, 0].nonzero().squeeze(1).tolist():
                found[int(counts[k, 0])].append((own[k, 0].item(), mass[k, 0].item()))
    return {n: {"questions": len(v), "own": round(float(np.mean([o for o, _ in v])), 3), "target": round(1 / (n + 1), 3),
                "own_std": round(float(np.std([o for o, _ in v])), 3), "objects": round(float(np.mean([m for _, m in v])), 3)}
            for n, v in sorted(found.items())}


def main(argv=None) -> None:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model folder trained by python -m recipes.default_model train")
    p.add_argument("--data", required=True, help="a synthetic dataset folder (tokendrop data)")
    p.add_argument("--n", type=int, default=200, help="questions (default 200)")
    p.add_argument("--head", type=int, default=0, help="the grounded head of training (default 0)")
    p.add_argument("--tally-layer", type=int, default=3, help="layer of the tally head (default 3)")
    p.add_argument("--tally-head", type=int, default=1, help="the tally head of training (default 1)")
    p.add_argument("--tally-mark", choices=TALLY_MARKS, default="objects",
                   help="the matching objects' tokens in the report: centre patches or all (default %(default)s)")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    samples = load_dataset(args.data, limit=args.n)
    report = grounding_report(model, processor, samples, head=args.head)
    print(f"attention mass on the question's objects, per LM layer (mean over heads | head {args.head})")
    for qtype, r in report.items():
        print(f"{qtype:7s} n={r['n']:3d} share of image tokens {r['share']:.3f}")
        print("   mean over heads " + " ".join(f"{v:5.3f}" for v in r["head_mean"]))
        print(f"   head {args.head}          " + " ".join(f"{v:5.3f}" for v in r["head"]))
    tally = tally_report(model, processor, samples, args.tally_layer, args.tally_head, mark=args.tally_mark)
    print(f"tally head (layer {args.tally_layer}, head {args.tally_head}): attention on itself by matching objects n")
    for n, r in tally.items():
        print(f"   n={n} questions {r['questions']:3d} own {r['own']:.3f} +- {r['own_std']:.3f} (target {r['target']:.3f}), "
              f"on the objects {r['objects']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"grounding": report, "tally": tally}, indent=1) + "\n")


if __name__ == "__main__":
    main()
