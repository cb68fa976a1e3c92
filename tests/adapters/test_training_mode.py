"""PyramidDrop in training: a stock forward with labels drops tokens, gathers labels, backpropagates."""

from __future__ import annotations

import pytest
import torch

import tokendrop as td
from sample_inputs import PROMPTS, SIZES, random_image

ANSWERS = [" red", " two squares", " yes"]


@pytest.fixture(scope="module")
def trainable():
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=8, kv_heads=2, seed=1)
    return model.train(), processor


def sample(processor, i):
    """input_ids, pixel values and labels of sample i: loss only on the answer and </s>."""
    image = random_image(*SIZES[i], seed=i)
    prompt = processor(images=[image], text=[PROMPTS[i]], return_tensors="pt")
    answer = processor.tokenizer(ANSWERS[i], add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = torch.cat([answer, torch.tensor([[processor.tokenizer.eos_token_id]])], dim=1)
    ids = torch.cat([prompt["input_ids"], answer], dim=1)
    labels = torch.cat([torch.full_like(prompt["input_ids"], -100), answer], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": prompt["pixel_values"], "image_sizes": prompt["image_sizes"]}


def right_padded(samples, pad_id):
    """Batch samples with right padding (training), pixel values padded to the most tiles."""
    length = max(s["input_ids"].shape[1] for s in samples)
    tiles = max(s["pixel_values"].shape[1] for s in samples)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=v)  # noqa: E731
    return {
        "input_ids": torch.cat([pad(s["input_ids"], pad_id) for s in samples]),
        "attention_mask": torch.cat([pad(s["attention_mask"], 0) for s in samples]),
        "labels": torch.cat([pad(s["labels"], -100) for s in samples]),
        "pixel_values": torch.cat([torch.nn.functional.pad(s["pixel_values"], (0, 0, 0, 0, 0, 0, 0, tiles - s["pixel_values"].shape[1]))
                                   for s in samples]),
        "image_sizes": torch.cat([s["image_sizes"] for s in samples]),
    }


def learning(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.any()}


def test_gradients_reach_every_trainable_parameter(trainable):
    # Every parameter that learns in the stock model learns with PyramidDrop (the stock model leaves
    # the vision blocks after the feature layer unused).
    model, processor = trainable
    model.zero_grad()
    model(**sample(processor, 0)).loss.backward()
    stock = learning(model)
    model.zero_grad()
    with td.apply(model, processor, td.PyramidDrop()) as handle:
        model(**sample(processor, 0)).loss.backward()
        assert handle.layer_tokens[0, -1] < handle.layer_tokens[0, 0], "tokens were dropped"
    assert len(stock) > 50 and learning(model) == stock
    model.zero_grad()


def test_keep_everything_gives_the_stock_loss(trainable):
    model, processor = trainable
    batch = right_padded([sample(processor, i) for i in range(3)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        stock = model(**batch).loss
        with td.apply(model, processor, td.PyramidDrop(ratio=1.0)):
            ours = model(**batch).loss
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_labels_stay_with_their_tokens(trainable):
    model, processor = trainable
    inputs = sample(processor, 1)
    image_id = model.config.image_token_id
    with torch.no_grad(), td.apply(model, processor, td.PyramidDrop(layers=(2,), ratio=0.25)) as handle:
        out = model(**inputs)
        kept = handle.kept_positions[0]  # input position of every output position
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    n_image = int((ids == image_id).sum())
    assert kept.numel() == ids.numel() - (n_image - int(n_image * 0.25))
    assert torch.equal(ids[kept][ids[kept] != image_id], ids[ids != image_id]), "every text token kept, in order"
    # the loss is the stock loss of the kept sequence: labels gathered at the kept positions
    expected = model.loss_function(logits=out.logits, labels=labels[kept][None], vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, expected)
    assert (labels[kept] != -100).sum() == (labels != -100).sum(), "no answer token lost"


def test_padded_batch_equals_samples_one_by_one(trainable):
    model, processor = trainable
    samples = [sample(processor, i) for i in range(3)]
    batch = right_padded(samples, processor.tokenizer.pad_token_id)
    with torch.no_grad(), td.apply(model, processor, td.PyramidDrop()):
        batch_loss = model(**batch).loss
        singles = [model(**s).loss for s in samples]
    counts = [int((s["labels"][0, 1:] != -100).sum()) for s in samples]  # shifted targets per sample
    expected = sum(l * n for l, n in zip(singles, counts)) / sum(counts)
    torch.testing.assert_close(batch_loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [td.PyramidDrop(), td.PyramidDrop(layers=(1, 3, 5), ratio=0.3, score_layer="last")],
                         ids=repr)
def test_an_answer_right_after_the_image_keeps_its_query(trainable, method):
    # Plain pretraining template: the caption starts right after the image, so the token before the
    # answer (the scoring query) is the last image token. Every stage keeps it and scores with it.
    model, processor = trainable
    image = random_image(*SIZES[0])
    prompt = processor(images=[image], text=["<image>"], return_tensors="pt")
    answer = processor.tokenizer(" a red circle", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], answer], dim=1)
    labels = torch.cat([torch.full_like(prompt["input_ids"], -100), answer], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "pixel_values": prompt["pixel_values"], "image_sizes": prompt["image_sizes"]}
    query = prompt["input_ids"].shape[1] - 1
    assert ids[0, query] == model.config.image_token_id
    with torch.no_grad(), td.apply(model, processor, method) as handle:
        loss = model(**inputs).loss
        assert query in handle.kept_positions[0].tolist()
        n_image = query + 1 - int((prompt["input_ids"] != model.config.image_token_id).sum())
        assert handle.layer_tokens[0].tolist() == method.layer_counts(n_image, 8)
    assert torch.isfinite(loss)
