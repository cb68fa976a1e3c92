"""tokendrop as an lmms-eval model: a stock Hugging Face VLM with any tokendrop method, batched.

    lmms-eval --model tokendrop --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hired,budget=0.2 \\
        --tasks textvqa_val --batch_size 8

lmms-eval finds the model through its entry-point group `lmms_eval.models` (tokendrop's pyproject.toml
declares `tokendrop = "tokendrop.integrations.lmms_eval:manifest"`): installing tokendrop next to
lmms-eval is all it takes. Only lmms-eval imports this module; tokendrop never does.

model_args (lmms-eval's key=value,... string):
    pretrained      HF id or folder (default: the bundled model)
    method          a `tokendrop methods` name or a+b composition (default: none, the stock model)
    budget          the pre-LLM budget in (0, 1]
    max_new_tokens  when the task does not set it (default 128)
    anything else   the methods' own options, as `--method-args` takes them: alpha=0.5, pdrop.ratio=0.4,
                    layers=[8,16,24]

lmms-eval's --batch_size N: requests with the same generation settings are answered N at a time. It must
be a positive integer; `auto` is refused (see `check_batch_size`). --max_batch_size (auto's cap) is ignored.
"""

from __future__ import annotations

import json
from collections import defaultdict

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_ID = "tokendrop"
DEFAULT_MAX_NEW_TOKENS = 128


def manifest():
    """The entry point lmms-eval loads: where the `tokendrop` model class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokenDrop")


class TokenDrop(lmms):
    """lmms-eval's `lmms` over `tokendrop.apply`: `generate_until` in batches with left padding, `loglikelihood`."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str = "none", budget: float | None = None,
                 batch_size: int | str = 1, device: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_batch_size: int | None = None, **options):
        super().__init__()
        self.batch_size = check_batch_size(batch_size)  # before anything loads
        from tokendrop.api import check
        from tokendrop.evaluation.distributed import from_env
        from tokendrop.loading import load_default
        from tokendrop.registry import build_methods

        self.methods = build_methods(method, budget=budget, strict=True, **options)  # a bad option fails before loading
        ranks = from_env()  # lmms-eval's launchers (accelerate, torchrun) set these
        self._rank, self._world_size = ranks.rank, ranks.world
        self.model, self.processor, _ = load_default(pretrained, device=_device(device, ranks))
        check(self.model, self.processor, *self.methods)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        self.max_new_tokens = int(max_new_tokens)
        self.visual_tokens: list[int] = []  # image tokens that reached the LLM, per answered request

    @property
    def device(self):
        return self.model.device

    # ---- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in order; requests with the same generation settings share batches."""
        import tokendrop as td

        answers: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)  # generation settings -> request indices
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        with td.apply(self.model, self.processor, *self.methods):
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    for i, answer in zip(batch, self._generate([requests[i].args for i in batch])):
                        answers[i] = answer
        return answers

    def _generate(self, batch: list[tuple]) -> list[str]:
        """Answers for requests (context, generation kwargs, doc_to_visual, doc_id, task, split) of one batch."""
        import torch

        from tokendrop.loading import format_prompt

        visuals = [self._visuals(args) for args in batch]
        prompts = [format_prompt(self.processor, args[0], len(images)) for args, images in zip(batch, visuals)]
        inputs = self._inputs(prompts, visuals)
        settings, until = generation_settings(batch[0][1], self.max_new_tokens)
        with torch.no_grad():
            out = self.model.generate(**inputs, **settings, pad_token_id=self.processor.tokenizer.pad_token_id)
        self.visual_tokens += (inputs["input_ids"] == self.model.config.image_token_id).sum(dim=1).tolist()
        texts = self.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [cut_at(text, until).strip() for text in texts]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the tokendrop model answers single-round tasks (generate_until, loglikelihood)")

    # ---- scoring --------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation after the context, whether greedy decoding gives it), one request at a time."""
        import tokendrop as td

        with td.apply(self.model, self.processor, *self.methods):
            return [self._loglikelihood(request.args) for request in requests]

    def _loglikelihood(self, args: tuple) -> tuple[float, bool]:
        import torch

        from tokendrop.loading import format_prompt

        context, target, _, doc_id, task, split = args
        continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
        images = self._visuals(args)
        prompt = format_prompt(self.processor, context, len(images))
        inputs = self._inputs([prompt + continuation], [images])
        c = inputs["input_ids"].shape[1] - self._inputs([prompt], [images])["input_ids"].shape[1]  # continuation tokens
        if c <= 0:
            return 0.0, True
        with torch.no_grad():
            logits = self.model(**inputs).logits[0].float()  # (L', V): L' < L under in-LLM methods
        # In-LLM methods drop image tokens only, so the last c + 1 positions are the text's, as in the input.
        logprobs = torch.log_softmax(logits[-c - 1 : -1], dim=-1)  # (c, V): position t predicts token t + 1
        tokens = inputs["input_ids"][0, -c:].to(logprobs.device)  # (c,)
        score = logprobs.gather(-1, tokens[:, None]).sum().item()
        return score, bool((logprobs.argmax(-1) == tokens).all())

    # ---- inputs ---------------------------------------------------------------------------------------
    def _visuals(self, args: tuple) -> list:
        """The request's images (RGB); lmms-eval's doc_to_visual reads them from the task's document."""
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        images = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [image.convert("RGB") for image in images]

    def _inputs(self, prompts: list[str], visuals: list[list]):
        images = [image for request in visuals for image in request]
        return self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True).to(self.device)


def check_batch_size(value) -> int:
    """lmms-eval's --batch_size (the command line's text, e.g. "8") as a positive int; ValueError otherwise.

    `auto` / `auto:N` ask the model to find the largest batch that fits in memory by trial. The tokendrop
    model refuses them rather than guess: a batch's memory depends on its images' sizes (tiles, Qwen's
    native resolution) and on how many tokens the method keeps, so no size found by trial holds for every batch.
    """
    text = str(value).strip()
    if text.lower().startswith("auto"):
        raise ValueError(f"batch_size must be a positive integer, got {value!r}: 'auto' (search for the largest batch "
                         "that fits) is not supported: the memory a batch takes depends on its images' sizes and on the "
                         "tokens the method keeps, so a size found on one batch does not hold for the next; pass a "
                         "number, e.g. --batch_size 8")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size must be a positive integer (e.g. --batch_size 8), got {value!r}")
    return int(text)


def generation_settings(gen_kwargs: dict, max_new_tokens: int) -> tuple[dict, list[str]]:
    """(generate() keyword arguments, stop strings) from an lmms-eval task's generation_kwargs.

    lmms-eval's convention: temperature 0 (the default) is greedy; `until` holds stop strings. Keys
    meant for other model backends (e.g. image_aspect_ratio) are not generate() arguments and are left out.
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    settings = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or max_new_tokens),
                "num_beams": int(gen_kwargs.get("num_beams") or 1), "do_sample": temperature > 0}
    if temperature > 0:
        settings["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings, until


def cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first of the stop strings."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _device(device: str | None, ranks):
    """Several processes on CUDA: each on its own GPU; else the device asked for (None: CUDA if there is one)."""
    from tokendrop.evaluation.distributed import device as rank_device

    return rank_device(ranks) or device
