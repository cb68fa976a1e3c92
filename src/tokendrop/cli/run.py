"""`tokendrop run`: answer one question about one image, stock or with token dropping.

With no arguments: the bundled model answers the bundled sample question, stock and HiRED side by
side. Prints the answer, visual tokens before and after, time to first token and total time (each
configuration warmed up first, then timed).
"""

from __future__ import annotations

import json
import time

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_json, add_method_options, check_on_config, check_on_model, flag, label, load_model_flag, method_configs,
                                   one_int, output_path, write_output)

DEMO_METHODS = "none,hired"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="answer a question about an image, stock and with token dropping "
                                          "(the demo when run without arguments)")
    p.add_argument("--model", help="HF id or folder, or 'tiny' (default: the bundled model)")
    p.add_argument("--image", help="image file (default: the bundled sample)")
    p.add_argument("--prompt", help="question (default: the bundled sample question)")
    add_method_options(p, default=DEMO_METHODS)
    p.add_argument("--max-new-tokens", default="16", help="tokens to generate (default: %(default)s)")
    p.add_argument("--warmup", default="1", help="untimed runs of each configuration before the timed one (default: %(default)s)")
    add_json(p, "one record per configuration")


def run(args) -> int:
    from tokendrop.demo import load_demo_image
    from tokendrop.registry import configurations

    names, budgets, options = method_configs(args)
    configs = configurations(names, budgets)
    new_tokens, warmup = one_int(args.max_new_tokens, "--max-new-tokens", 1), one_int(args.warmup, "--warmup", 0)
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt must not be empty (leave it out for the sample question)")
    out = output_path(args.json, "--json")
    with flag("--image"):
        image, question, image_note = load_demo_image(args.image, args.prompt)
    check_on_config(args.model, names, budgets, options)  # before minutes of loading weights
    model, processor, model_note = load_model_flag(args.model)
    check_on_model(model, processor, names, budgets, options, image_sizes=[(image.height, image.width)])
    records = [answer(model, processor, image, question, name, budget, options, new_tokens, warmup)
               for name, budget in configs]
    if args.json == "-":
        print(json.dumps(records, indent=2))
        return 0
    for note in (model_note and f"model: {model_note}", image_note):
        if note:
            print(note)
    print(f"question: {question}")
    for r in records:
        print(f"\n[{r['label']}] {r['answer']!r}")
        tokens = f"visual tokens {r['visual_tokens_stock']} -> {r['visual_tokens']}"
        if r.get("equivalent_tokens") is not None:
            tokens += f" (average over LLM layers {r['equivalent_tokens']:.1f})"
        print(f"  {tokens}; time to first token {r['prefill_s']:.3f} s; total {r['total_s']:.3f} s")
    if out is not None:  # after the answers are shown: a failed write loses nothing
        write_output(out, json.dumps(records, indent=2) + "\n", "--json")
        print(f"\nwrote {len(records)} records to {out}")
    return 0


def answer(model, processor, image, question, name, budget, options, new_tokens, warmup) -> dict:
    """Run one configuration on one image (after `warmup` untimed runs); the record `run` prints."""
    import tokendrop as td
    from tokendrop.loading import format_prompt
    from tokendrop.registry import build_methods

    methods = build_methods(name, budget=budget, **options)
    prompt = format_prompt(processor, question)
    stock_inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    stock_tokens = int((stock_inputs["input_ids"] == model.config.image_token_id).sum())
    with td.apply(model, processor, *methods) as handle:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
        for _ in range(warmup):
            timed_generate(model, processor, inputs, new_tokens)
        text, prefill_s, total_s = timed_generate(model, processor, inputs, new_tokens)
        equivalent = handle.equivalent_tokens
    return {
        "method": name, "budget": budget, "label": label(name, budget), "methods": [repr(m) for m in methods],
        "answer": text, "visual_tokens_stock": stock_tokens,
        "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "equivalent_tokens": None if equivalent is None else float(equivalent[0]),
        "prefill_s": prefill_s, "total_s": total_s, "warmup": warmup,
    }


def timed_generate(model, processor, inputs, max_new_tokens):
    """Greedy answer, time to first token (vision + prefill) and total time, in seconds."""
    import torch
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
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
