"""Gemma 4: token counts from the aspect ratio, pre-LLM dropping against the stock model, what it refuses.

The pre-LLM reference is the STOCK model fed the same kept feature rows through `mm_encoder_outputs`
into the prompt the patched processor writes (its K placeholders: Gemma 4's positions are 1-D, the
prompt is just shorter, as on LLaVA). DominantDrop's choice is checked against the stock encoder's
own attention weights (eager attention, the full maps: fine for a test), summed over the patches
the pooler averages into each token.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.loading import format_prompt
from tokendrop.registry import family_for

try:  # below 5.21, transformers' Gemma 4 processor imports torchvision
    from tokendrop.families.gemma4.gemma4 import processor_class

    processor_class()
except ImportError as err:
    pytest.skip(f"gemma4: {err}", allow_module_level=True)

from tokendrop.families.gemma4.control import control_setting, control_tokens, fewer_tokens  # noqa: E402
from tokendrop.families.gemma4.scoring import pooled_scores  # noqa: E402
from tokendrop.families.gemma4.tiny import tiny_gemma4  # noqa: E402

#: wide, square, very wide, very tall, tall, tiny: the processor's resize rounds each differently
SIZES = [(150, 300), (224, 224), (40, 600), (600, 40), (1000, 333), (31, 47)]
STEPS = 3


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma4()


def encode(processor, images, questions=None):
    """One prompt per image (nested: Gemma 4's processor reads a flat list as one prompt's images);
    None in `images` is a text-only prompt."""
    questions = questions or ["what is it?"] * len(images)
    texts = [format_prompt(processor, q, images=int(im is not None)) for q, im in zip(questions, images)]
    nested = [[im] if im is not None else [] for im in images]
    return processor(images=nested if any(nested) else None, text=texts, return_tensors="pt", padding=True)


def layout_of(model, processor, image):
    return family_for(model).processor_geometry(processor).layout((image.height, image.width))


def image_count(inputs, model, row=0):
    return int((inputs["input_ids"][row] == model.config.image_token_id).sum())


# ---- counts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_stock_count_follows_the_aspect_ratio_as_the_processor_writes_it(gemma, size):
    model, processor = gemma
    image = random_image(*size)
    inputs = encode(processor, [image])
    assert image_count(inputs, model) == family_for(model).stock_tokens(size, processor)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_patched_processor_writes_the_methods_count_inside_the_image_markers(gemma, size):
    model, processor = gemma
    image = random_image(*size)
    stock = family_for(model).stock_tokens(size, processor)
    with td.apply(model, processor, td.RandomDrop(0.5)) as handle:
        ids = encode(processor, [image])["input_ids"][0]
    assert image_count({"input_ids": ids[None]}, model) == handle.num_tokens(size) == stock // 2  # floor(0.5 * N)
    boi, eoi = (ids == model.config.boi_token_id).nonzero(), (ids == model.config.eoi_token_id).nonzero()
    assert len(boi) == len(eoi) == 1
    run = ids[int(boi) + 1:int(eoi)]
    assert bool((run == model.config.image_token_id).all())  # <|image> placeholders <image|>, nothing else


# ---- pre-LLM logits ------------------------------------------------------------------------------------
def stock_rows(model, inputs):
    """Per image, the stock model's (N, D) image features."""
    base = model.model
    with torch.no_grad():
        out = type(base).get_image_features(base, inputs["pixel_values"], inputs["image_position_ids"], return_dict=True)
    return list(out.pooler_output)


@pytest.mark.parametrize("method", [td.DominantDrop(0.3), td.SpatialDrop(0.4), td.RandomDrop(0.25)], ids=repr)
def test_pre_llm_logits_equal_the_stock_model_fed_the_kept_rows(gemma, method):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = gemma
    images = [random_image(150, 300, seed=1), random_image(200, 140, seed=2)]
    with td.apply(model, processor, method) as handle, torch.no_grad():
        short = encode(processor, images, ["what is it?", "and this one, what colour?"])
        ours = model(**short).logits
        kept = [(where[:, 1] * cols + where[:, 2]) for where, cols in zip(
            handle.selections, [layout_of(model, processor, im).cols for im in images])]
    rows = stock_rows(model, short)  # the same pixels: the stock features of every token
    features = BaseModelOutputWithPooling(pooler_output=tuple(r[k] for r, k in zip(rows, kept)))
    text = {k: v for k, v in short.items() if k not in ("pixel_values", "image_position_ids")}
    with torch.no_grad():
        reference = model(**text, mm_encoder_outputs={"image": features}).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_dominant_drop_keeps_the_tokens_whose_pooled_patches_receive_most_attention(gemma):
    model, processor = gemma
    images = [random_image(150, 300, seed=3), random_image(224, 224, seed=4)]
    method = td.DominantDrop(0.3, layer=1)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        inputs = encode(processor, images)
        model(**inputs)
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        maps = tower(inputs["pixel_values"], pixel_position_ids=inputs["image_position_ids"], output_attentions=True,
                     return_dict=True).attentions[1]  # (B, H, M, M) layer 1
    for b, image in enumerate(images):
        positions = inputs["image_position_ids"][b]
        valid = (positions >= 0).all(dim=-1)
        received = maps[b][:, valid][:, :, valid].float().mean(dim=(0, 1))  # (n,) over heads and queries
        scores = pooled_scores(received, positions[valid], pool=2)
        layout = layout_of(model, processor, image)
        top = torch.argsort(-scores, stable=True)[:method.num_tokens(layout)].sort().values
        where = handle.selections[b]
        assert torch.equal(where[:, 1] * layout.cols + where[:, 2], top)


def test_pooled_scores_add_up_the_patches_of_each_token():
    # a 4 x 6 patch grid pooled 2 x 2: 2 x 3 tokens; patch (x, y) goes to token (y // 2) * 3 + x // 2
    y, x = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    positions = torch.stack([x.flatten(), y.flatten()], dim=1)
    patch = torch.arange(24, dtype=torch.float32)
    expected = torch.tensor([[patch.view(4, 6)[2 * r:2 * r + 2, 2 * c:2 * c + 2].sum() for c in range(3)] for r in range(2)])
    assert torch.equal(pooled_scores(patch, positions, pool=2), expected.flatten())


# ---- batches, remove() -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [td.DominantDrop(0.3), td.SpatialDrop(0.5)], ids=repr)
def test_padded_batch_with_mixed_sizes_and_a_text_only_row_equals_one_by_one(gemma, method):
    model, processor = gemma
    images = [random_image(150, 300, seed=5), random_image(224, 224, seed=6), None]
    questions = ["what is it?", "what colour is the big one, and why?", "say hello"]
    run = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with td.apply(model, processor, method), torch.no_grad():
        batch = encode(processor, images, questions)
        out = model.generate(**batch, **run)
        assert int((batch["attention_mask"] == 0).sum()) > 0  # left padding present
        for i, (image, question) in enumerate(zip(images, questions)):
            alone = encode(processor, [image], [question])
            one = model.generate(**alone, **run)
            L = alone["input_ids"].shape[1]
            assert torch.equal(out.sequences[i, -STEPS:], one.sequences[0, L:])
            for a, b in zip(out.logits, one.logits):
                torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4)


def test_generate_without_cache_equals_the_cached_run(gemma):
    """Without a cache every step runs the whole prompt again: the encoder's choice is the same one."""
    model, processor = gemma
    images = [random_image(150, 300, seed=10), random_image(224, 224, seed=11)]
    run = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with td.apply(model, processor, td.DominantDrop(0.3)), torch.no_grad():
        batch = encode(processor, images)
        cached, uncached = model.generate(**batch, **run), model.generate(**batch, use_cache=False, **run)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

def test_remove_restores_model_and_processor_bit_for_bit(gemma):
    model, processor = gemma
    images = [random_image(150, 300, seed=7)]
    with torch.no_grad():
        before_inputs = encode(processor, images)
        before = model(**before_inputs).logits
    model_attrs, processor_attrs = dict(vars(model.model)), dict(vars(processor))
    images_attrs = dict(vars(processor.image_processor))
    handle = td.apply(model, processor, td.DominantDrop(0.2))
    with torch.no_grad():
        model(**encode(processor, images))
    handle.remove()
    assert dict(vars(model.model)) == model_attrs and dict(vars(processor)) == processor_attrs
    assert dict(vars(processor.image_processor)) == images_attrs
    with torch.no_grad():
        after_inputs = encode(processor, images)
        after = model(**after_inputs).logits
    assert all(torch.equal(torch.as_tensor(before_inputs[k]), torch.as_tensor(after_inputs[k])) for k in before_inputs)
    assert torch.equal(before, after)


def test_replacement_get_image_features_keeps_the_stock_signature(gemma):
    model, processor = gemma
    stock = inspect.signature(model.model.get_image_features)
    with td.apply(model, processor, td.DominantDrop(0.3)):
        assert "get_image_features" in vars(model.model)
        assert inspect.signature(model.model.get_image_features) == stock


# ---- what it refuses -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, capability, says", [
    (td.HiRED(0.3), "cls_token", "DominantDrop"), (td.BaseOnly(), "base_image", "whole image")], ids=repr)
def test_methods_that_need_what_gemma4_lacks_are_refused_naming_the_capability(gemma, method, capability, says):
    model, processor = gemma
    with pytest.raises(ValueError, match=f"capability '{capability}'") as err:
        td.apply(model, processor, method)
    assert says in str(err.value) and "get_image_features" not in vars(model.model)


def test_the_decoder_takes_what_the_gemma4_hook_supplies(gemma):
    """What `Gemma4Decoder` is written for holds for this transformers: the decoder is handed ready-built
    masks (the hook rebuilds them from the outer call's), per-layer inputs, and layers that store keys in
    `shared_kv_states` (when a release changes these, the hook must follow)."""
    model, processor = gemma
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**encode(processor, [random_image(64, 96)]))
    finally:
        hook.remove()
    assert isinstance(seen["attention_mask"], dict) and set(seen["attention_mask"]) == {"full_attention", "sliding_attention"}
    assert seen["per_layer_inputs"] is not None
    assert any(layer.self_attn.store_full_length_kv for layer in lm.layers)  # even with num_kv_shared_layers=0


def test_a_score_layer_beyond_the_encoder_is_refused_before_encoding(gemma):
    model, processor = gemma
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 3\) for a 3-layer vision encoder, got 3"):
        td.apply(model, processor, td.DominantDrop(0.3, layer=3))


# ---- the control: Gemma 4's own budget ------------------------------------------------------------------------
def test_fewer_tokens_asks_the_processor_for_a_smaller_budget_and_restores_it():
    model, processor = tiny_gemma4(soft_tokens=140)
    image = random_image(150, 300, seed=8)
    assert control_setting(0.5, processor) == 70 and control_setting(1.0, processor) == 140
    stock = image_count(encode(processor, [image]), model)
    with fewer_tokens(processor, 70):
        inputs = encode(processor, [image])
        with torch.no_grad():
            model(**inputs)
    small = tiny_gemma4(soft_tokens=70)[1]  # a processor built for 70 tokens
    assert image_count(inputs, model) == control_tokens(processor, (150, 300), 70) == image_count(encode(small, [image]), model)
    assert image_count(inputs, model) < stock
    assert processor.image_processor.max_soft_tokens == 140 and image_count(encode(processor, [image]), model) == stock


@pytest.mark.parametrize("budget", [0.3, 2.0])
def test_a_budget_without_a_control_is_refused_naming_the_ones_that_have_one(gemma, budget):
    _, processor = gemma
    with pytest.raises(ValueError, match=r"budget .* has no Gemma 4 control at max_soft_tokens=70: the budgets that have one are 1 \(70\)"):
        control_setting(budget, processor)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of 70, 140, 280, 560, 1120, got 100"):
        fewer_tokens(processor, 100).__enter__()


@pytest.fixture(scope="module")
def gemma_280(tmp_path_factory):
    """A tiny Gemma 4 whose processor asks for 280 tokens (budgets 0.25 / 0.5 / 1 have a control), saved."""
    model, processor = tiny_gemma4(soft_tokens=280)
    folder = tmp_path_factory.mktemp("gemma4-280")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def test_bench_runs_the_control_beside_the_methods_at_its_own_count(gemma_280, tmp_path, capsys):
    from tokendrop.cli import main

    _, processor, folder = gemma_280
    size = (150, 300)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(folder), "--method", "none,random,gemma4-budget", "--budget", "0.25",
                 "--image-size", "150x300", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2",
                 "--json", str(out), "--no-progress"]) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())}
    stock = records["none"]["visual_tokens"]
    control = control_tokens(processor, size, 70)  # the pooled grid of the 70-token resize, known before encoding
    assert records["gemma4-budget"]["visual_tokens"] == records["gemma4-budget"]["analytic_visual_tokens"] == control
    assert records["random"]["visual_tokens"] == stock // 4 != control  # floor(0.25 * N): close, not the same
    assert records["gemma4-budget"]["control"] == "max_soft_tokens=70"
    assert records["none"]["control"] is None and records["random"]["control"] is None
    shown = capsys.readouterr().out
    assert "gemma4-budget@0.25 (control)" in shown and "the stock model with max_soft_tokens=70" in shown


def test_eval_runs_the_control_beside_the_methods_at_its_own_count(gemma_280, dataset, tmp_path, capsys):
    from tokendrop.cli import main
    from tokendrop.data import load_dataset

    _, processor, folder = gemma_280
    out = tmp_path / "eval.jsonl"
    assert main(["eval", "--data", str(dataset), "--model", str(folder), "--method", "none,gemma4-budget",
                 "--budget", "0.25,0.5", "--max-new-tokens", "2", "--json", str(out), "--no-progress"]) == 0
    records = {r["label"]: r for r in map(json.loads, out.read_text().splitlines())}
    sizes = [s.load_image().size[::-1] for s in load_dataset(dataset)]  # (height, width)
    for label, setting in (("gemma4-budget@0.25", 70), ("gemma4-budget@0.5", 140)):
        expected = sum(control_tokens(processor, size, setting) for size in sizes) / len(sizes)
        assert records[label]["visual_tokens"] == expected and records[label]["control"] == f"max_soft_tokens={setting}"
    assert records["none"]["control"] is None
    assert records["gemma4-budget@0.25"]["visual_tokens"] < records["gemma4-budget@0.5"]["visual_tokens"] < records["none"]["visual_tokens"]
    assert "| gemma4-budget (control: max_soft_tokens=70) | 0.25 |" in capsys.readouterr().out
    assert processor.image_processor.max_soft_tokens == 280


def test_a_budget_the_control_has_no_setting_for_is_refused_before_any_configuration_runs(gemma_280, dataset, capsys):
    from tokendrop.cli import main

    _, _, folder = gemma_280
    assert main(["eval", "--data", str(dataset), "--model", str(folder), "--method", "gemma4-budget",
                 "--budget", "0.25,0.3", "--no-progress"]) == 2
    err = capsys.readouterr().err  # after the weights load (the processor holds the setting), before any run
    assert err.strip().splitlines()[-1] == ("tokendrop eval: error: --method gemma4-budget: budget 0.3 has no Gemma 4 control at max_soft_tokens=280: "
                           "the budgets that have one are 0.25 (70), 0.5 (140), 1 (280)")


# ---- loading a checkpoint folder ------------------------------------------------------------------------------
def test_a_saved_folder_loads_back_to_the_same_inputs_logits_and_chat_template(gemma, tmp_path):
    import pickle

    from tokendrop.loading import load_model

    model, processor = gemma
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_model, loaded = load_model(str(tmp_path), device="cpu")  # the image-only processor without torchvision
    assert loaded.chat_template == processor.chat_template and loaded.video_processor is None
    image = random_image(150, 300, seed=9)
    ours, theirs = encode(loaded, [image]), encode(processor, [image])
    assert all(torch.equal(torch.as_tensor(ours[k]), torch.as_tensor(theirs[k])) for k in theirs)
    with torch.no_grad():
        assert torch.equal(loaded_model(**ours).logits, model(**theirs).logits)
    assert type(pickle.loads(pickle.dumps(loaded))) is type(loaded)


def test_eval_and_bench_batches_give_each_prompt_its_image(gemma, dataset):
    # Gemma 4's processor reads a flat list of images as ONE prompt's: eval and bench pass one list per prompt
    from tokendrop import bench
    from tokendrop.data import load_dataset
    from tokendrop.evaluation.harness import Config, evaluate

    model, processor = gemma
    samples = load_dataset(dataset)[:2]
    records = evaluate(model, processor, samples, [Config("none"), Config("dominant", 0.5)], batch_size=2,
                       max_new_tokens=2, progress=False)
    assert [r["method"] for r in records] == ["none", "dominant"]
    images = [random_image(150, 200, seed=0), random_image(200, 120, seed=1)]
    prompts = [format_prompt(processor, "what is it?")] * 2
    result = bench.measure(model, processor, (td.DominantDrop(0.5),), images, prompts, 2)
    assert result["new_tokens"] == 2
