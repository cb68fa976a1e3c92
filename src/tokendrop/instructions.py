"""The sample's instruction when its image is encoded: what instruction-conditioned methods read (CDPruner).

In transformers 5.x `generate()` encodes the images (`get_image_features`) before any forward sees
`input_ids`, and a forward encodes them inside the inner model's forward. `PromptCapture` holds the
token ids of the call under way: `generate` (patched on the instance) and the inner model's forward
(a pre-hook) put them there, and the encoder reads every image's instruction from them:

    instruction = decode(the sample's ids without padding and image placeholders, special tokens skipped).strip()

Why the ids and not the text given to the processor: the ids are what the model is called with, so
they belong to this call whatever was processed before (several processor calls, collators, lmms-eval
batches), and each row is its sample. The decoded text is the prompt as the tokenizer round-trips it
(the chat template's words included). Images go to samples in order: sample b holds the images whose
placeholder counts add up to its number of placeholders.
"""

from __future__ import annotations

import torch


class PromptCapture:
    """The `input_ids` / `attention_mask` of the model call under way, for the encoder to read."""

    def __init__(self, tokenizer, image_token_id: int):
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        self.calls: list[tuple] = []  # (input_ids, attention_mask) of the calls under way, innermost last

    def generate(self, stock):
        """A `generate` that records its prompt ids for the encoder while it runs."""

        def generate(inputs=None, *args, **kwargs):
            ids = kwargs.get("input_ids", inputs)
            self.calls.append((ids, kwargs.get("attention_mask")))
            try:
                return stock(inputs, *args, **kwargs)
            finally:
                self.calls.pop()

        return generate

    def enter_forward(self, module, args, kwargs):
        """Forward pre-hook of the inner model: its `input_ids` (None with inputs_embeds)."""
        self.calls.append((kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")))

    def leave_forward(self, module, args, kwargs, output):
        self.calls.pop()

    def per_image(self, counts: list[int]) -> list[str]:
        """The instruction of every image of the call, images in order with `counts` placeholders each."""
        ids, mask = self.calls[-1] if self.calls else (None, None)
        if ids is None:
            raise ValueError("this method reads the prompt when the image is encoded: call the model or generate() "
                             "with input_ids (from the processor), not inputs_embeds")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        placeholders = ((ids == self.image_token_id) & mask).sum(dim=1).tolist()
        texts, sample, used = [], 0, 0
        for count in counts:
            while sample < len(placeholders) and used + count > placeholders[sample]:
                sample, used = sample + 1, 0
            if sample == len(placeholders):
                raise RuntimeError(f"images of {counts} placeholders do not fit the prompts' {placeholders}")
            texts.append(self.text(ids[sample], mask[sample]))
            used += count
        return texts

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        """One sample's prompt: its ids without padding and placeholders, decoded without special tokens, stripped."""
        kept = ids[mask & (ids != self.image_token_id)]
        return self.tokenizer.decode(kept.tolist(), skip_special_tokens=True).strip()
