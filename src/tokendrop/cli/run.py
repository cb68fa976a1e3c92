"""`tokendrop run`: answer one question about one image, stock or with token dropping.

With no arguments: the bundled model answers the bundled sample question, stock and HiRED side by
side. Prints the answer, visual tokens before and after, time to first token and total time.
"""

from __future__ import annotations

import json
import time

import torch

from tokendrop.cli import UsageError

DEMO_METHODS = ("none", "hired")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="answer a question about an image (the demo when run without arguments)")
    p.add_argument("--model", help="HF id or folder (default: the bundled model)")
    p.add_argument("--image", help="image file (default: the bundled sample)")
    p.add_argument("--prompt", help="question (default: the bundled sample question)")
    p.add_argument("--method", help="none, hired, hired-official, random, spatial, pdrop, fastv, or a+b "
                                    "(default: none and hired side by side)")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of visual tokens kept by pre-LLM methods")
    p.add_argument("--alpha", type=float, default=0.5, help="HiRED: the base image's share of the budget")
    p.add_argument("--layers", help="PyramidDrop stage boundaries, e.g. 8,16,24 (default: depth/4, /2, 3/4)")
    p.add_argument("--ratio", type=float, default=0.5, help="PyramidDrop: keep ratio per stage")
    p.add_argument("--k", type=int, default=2, help="FastV: drop after layer k")
    p.add_argument("--drop", type=float, default=0.5, help="FastV: fraction of image tokens dropped")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON record per method")


def run(args) -> int:
    from tokendrop.demo import load_demo_image, load_default_model

    model, processor, model_note = load_default_model(args.model)
    image, question, image_note = load_demo_image(args.image, args.prompt)
    names = [args.method] if args.method else list(DEMO_METHODS)
    records = [answer(model, processor, image, question, name, args) for name in names]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for note in (model_note, image_note):
        if note:
            print(note)
    print(f"question: {question}")
    for r in records:
        print(f"\n[{r['method']}] {r['answer']!r}")
        tokens = f"visual tokens {r['visual_tokens_stock']} -> {r['visual_tokens']}"
        if r.get("equivalent_tokens") is not None:
            tokens += f" (average over LLM layers {r['equivalent_tokens']:.1f})"
        print(f"  {tokens}; time to first token {r['prefill_s']:.3f} s; total {r['total_s']:.3f} s")
    return 0


def parse_layers(text):
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers such as 8,16,24, got {text!r}") from None


def answer(model, processor, image, question, name, args) -> dict:
    """Run one method on one image; returns the record printed by `run`."""
    import tokendrop as td
    from tokendrop.loading import format_prompt
    from tokendrop.registry import build_methods, needs_budget

    methods = build_methods(name, budget=args.budget if needs_budget(name) else None, alpha=args.alpha,
                            layers=parse_layers(args.layers), ratio=args.ratio, k=args.k, drop=args.drop)
    stock_inputs = processor(images=[image], text=[format_prompt(processor, question)], return_tensors="pt")
    stock_tokens = int((stock_inputs["input_ids"] == model.config.image_token_id).sum())
    handle = td.apply(model, processor, *methods) if methods else None
    try:
        inputs = processor(images=[image], text=[format_prompt(processor, question)], return_tensors="pt").to(model.device)
        text, prefill_s, total_s = timed_generate(model, processor, inputs, args.max_new_tokens)
        equivalent = handle.equivalent_tokens if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    return {
        "method": name, "methods": [repr(m) for m in methods], "answer": text,
        "visual_tokens_stock": stock_tokens,
        "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "equivalent_tokens": None if equivalent is None else float(equivalent[0]),
        "prefill_s": prefill_s, "total_s": total_s,
    }


def timed_generate(model, processor, inputs, max_new_tokens):
    """Greedy answer, time to first token (vision + prefill) and total time, in seconds."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):  # first call: the prompt; second: the first new token
            self.calls += 1
            if self.calls == 2:
                sync(model.device)
                self.at = time.perf_counter()

        def end(self):
            pass

    timer = FirstToken()
    sync(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=timer)
    sync(model.device)
    total = time.perf_counter() - start
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text, (timer.at or time.perf_counter()) - start, total


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
