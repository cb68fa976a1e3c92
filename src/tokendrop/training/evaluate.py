"""Development accuracy check of a trained model: greedy generation, batched, left padding.

Two modes:
    "vanilla"    the stock model on the full anyres input (base image + tiles).
    "base_only"  only the base image's tokens reach the language model: the base view goes
                 through the vision tower and projector, the tiles are never encoded, and the
                 prompt holds one ``<image>`` placeholder per base feature (passed through the
                 official ``mm_encoder_outputs`` seam of ``generate``). This measures how much
                 the data needs the high-resolution tiles.

The full ``tokendrop eval`` command is built on top of ``tokendrop.evaluation``; this module is
the small loop used while training the default model.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tokendrop.data.dataset import Sample
from tokendrop.evaluation.metrics import exact_match
from tokendrop.training import format_prompt

MODES = ("vanilla", "base_only")


def _decode(processor, generated: torch.Tensor, prompt_len: int) -> list[str]:
    new = generated[:, prompt_len:]  # (B, new tokens)
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def _generate_vanilla(model, processor, samples: list[Sample], max_new_tokens: int) -> list[str]:
    images = [s.load_image() for s in samples]
    prompts = [format_prompt(s.question) for s in samples]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return _decode(processor, out, inputs["input_ids"].shape[1])


@torch.no_grad()
def base_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected features of the base views only. pixel_values (B, V, 3, t, t) -> (B, N, D)."""
    cfg = model.config
    tower_out = model.model.vision_tower(pixel_values[:, 0], output_hidden_states=True)
    hidden = tower_out.hidden_states[cfg.vision_feature_layer]  # (B, 1 + N, Dv)
    if cfg.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]  # drop CLS
    return model.model.multi_modal_projector(hidden)  # (B, N, D)


@torch.no_grad()
def _generate_base_only(model, processor, samples: list[Sample], max_new_tokens: int) -> list[str]:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    images = [s.load_image() for s in samples]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    feats = base_features(model, pixel_values)  # (B, N, D)
    image_token = processor.tokenizer.image_token
    prompts = [format_prompt(s.question).replace(image_token, image_token * feats.shape[1]) for s in samples]
    inputs = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    encoded = BaseModelOutputWithPooling(pooler_output=list(feats))
    out = model.generate(
        **inputs, mm_encoder_outputs={"image": encoded}, max_new_tokens=max_new_tokens, do_sample=False
    )
    return _decode(processor, out, inputs["input_ids"].shape[1])


def predict(model, processor, samples: list[Sample], mode: str = "vanilla", batch_size: int = 16,
            max_new_tokens: int = 4, progress=None) -> list[str]:
    """Greedy answers for ``samples`` (left padding), ``batch_size`` at a time."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generate = _generate_vanilla if mode == "vanilla" else _generate_base_only
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            answers += generate(model, processor, samples[start : start + batch_size], max_new_tokens)
            if progress is not None:
                progress(min(batch_size, len(samples) - start))
    finally:
        processor.tokenizer.padding_side = side
    return answers


def accuracy(samples: list[Sample], predictions: list[str]) -> dict:
    """Exact-match accuracy overall and per question type: {"overall": x, "by_type": {...}, "n": n}."""
    if len(samples) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(samples)} samples")
    by_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for sample, pred in zip(samples, predictions):
        score = exact_match(pred, sample.answers)
        scores.append(score)
        by_type[sample.type or "all"].append(score)
    return {
        "overall": sum(scores) / len(scores),
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "n": len(scores),
    }


def evaluate(model, processor, samples: list[Sample], mode: str = "vanilla", batch_size: int = 16) -> dict:
    """``accuracy`` of ``predict``; also returns the predictions."""
    predictions = predict(model, processor, samples, mode=mode, batch_size=batch_size)
    result = accuracy(samples, predictions)
    result["mode"] = mode
    result["predictions"] = predictions
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m tokendrop.training.evaluate MODEL_DIR DATA_DIR [--n N] [--modes vanilla base_only]``."""
    import argparse
    import json
    import time

    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from tokendrop.data.dataset import load_dataset

    parser = argparse.ArgumentParser(prog="python -m tokendrop.training.evaluate", description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--n", type=int, default=None, help="first N questions only")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the report (with predictions) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    samples = load_dataset(args.data, limit=args.n)
    report = {}
    for mode in args.modes:
        start = time.perf_counter()
        result = evaluate(model, processor, samples, mode=mode, batch_size=args.batch_size)
        result["seconds"] = round(time.perf_counter() - start, 1)
        report[mode] = result
        by_type = " ".join(f"{t} {v:.3f}" for t, v in result["by_type"].items())
        print(f"{mode:9s} overall {result['overall']:.3f} ({by_type}) n={result['n']} [{result['seconds']} s]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
