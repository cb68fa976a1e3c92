"""InternVL (tiles + thumbnail, pixel shuffle, `<img>...</img>`) on a tiny random model, against references
written here: hand-derived budget splits, the stock model's own features and attention, a plain decode loop."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from test_in_llm import STEPS, reference_forward, step_logits
from tokendrop import cost
from tokendrop.registry import family_for

pytest.importorskip("transformers.models.internvl")

# tiny_internvl: 56-px tiles of 4x4 patches -> 2x2 = N = 4 LLM tokens per tile, at most 6 tiles
SIZES = [(150, 300), (224, 224), (40, 50)]  # tiles 1x2 + thumbnail (P=3), 2x2 + thumbnail (P=5), one tile (P=1)
PROMPTS = ["<IMG_CONTEXT>\nwhat is it?", "<IMG_CONTEXT>\nhow many?", "<IMG_CONTEXT>\nQ: colour? A:"]


@pytest.fixture(scope="module")
def internvl():
    from tokendrop.families.internvl.tiny import tiny_internvl

    model, processor = tiny_internvl(text_layers=8)
    return model, processor


@pytest.fixture(scope="module")
def images():
    return [random_image(*size, seed=i) for i, size in enumerate(SIZES)]


def encode(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def test_tiles_and_stock_counts_follow_the_processor(internvl, images):
    model, processor = internvl
    geometry = family_for(model).processor_geometry(processor)  # the processor's tiling settings (max 6 tiles)
    tiles = [geometry.layout((im.height, im.width)).tiles for im in images]
    assert tiles == [(1, 2), (2, 2), (0, 0)]
    inputs = encode(processor, images, PROMPTS)
    assert inputs["pixel_values"].shape[0] == 3 + 5 + 1
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [3 * 4, 5 * 4, 1 * 4]


def test_budget_split_thumbnail_is_partition_zero_and_comes_last(internvl, images):
    model, processor = internvl
    # 224x224: P = 5 partitions of N = 4; budget 0.45 -> B = floor(0.45 * 20) = 9 -> floor(9 / 5) = 1 each,
    # remainder 4: one more to the thumbnail (partition 0), then to tiles 1, 2, 3 -> [2, 2, 2, 2, 1]
    for method in (td.RandomDrop(0.45), td.SpatialDrop(0.45)):
        with td.apply(model, processor, method) as handle:
            inputs = encode(processor, images[1:2], PROMPTS[1:2])
            with torch.no_grad():
                model(**inputs)
        ids = inputs["input_ids"][0]
        assert int((ids == model.config.image_token_id).sum()) == 9
        part = handle.selections[0][:, 0].tolist()
        assert part == [1, 1, 2, 2, 3, 3, 4, 0, 0], method  # stock order: tiles in raster order, the thumbnail last
        # <img> and </img> still frame the image's tokens
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        start = tokens.index("<img>")
        assert tokens[start + 1 : start + 10] == ["<IMG_CONTEXT>"] * 9 and tokens[start + 10] == "</img>"
    # 150x300: P = 3, budget 0.6 -> B = floor(7.2) = 7 -> 2 each, the remainder 1 to the thumbnail -> [3, 2, 2]
    with td.apply(model, processor, td.RandomDrop(0.6)) as handle:
        with torch.no_grad():
            model(**encode(processor, images[:1], PROMPTS[:1]))
    assert handle.selections[0][:, 0].tolist() == [1, 1, 2, 2, 0, 0, 0]
    # one tile, no thumbnail: P = 1, budget 0.5 -> floor(0.5 * 4) = 2 from partition 0
    with td.apply(model, processor, td.RandomDrop(0.5)) as handle:
        with torch.no_grad():
            model(**encode(processor, images[2:], PROMPTS[2:]))
    assert handle.selections[0][:, 0].tolist() == [0, 0]


def test_group_scores_sum_the_patches_the_pixel_shuffle_folds(internvl):
    from tokendrop.families.internvl.vision import group_scores

    model, _ = internvl
    g = 4
    patches = torch.arange(g * g, dtype=torch.float32)  # patch index as its score, raster order
    # by hand: token (0,0) folds patches 0,1,4,5; (0,1): 2,3,6,7; (1,0): 8,9,12,13; (1,1): 10,11,14,15
    assert group_scores(patches[None], 2)[0].tolist() == [10.0, 18.0, 42.0, 50.0]
    # and those are the patches the stock pixel shuffle puts in each token's channels
    shuffled = model.model.pixel_shuffle(patches.view(1, g, g, 1), scale_factor=0.5)  # (1, 2, 2, 4)
    assert shuffled.reshape(4, 4).sum(dim=1).tolist() == [10.0, 18.0, 42.0, 50.0]


def test_hired_cls_row_is_the_towers_own_attention(internvl, images):
    from tokendrop.families.internvl.vision import cls_row

    model, processor = internvl
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    pixels = encode(processor, images, PROMPTS)["pixel_values"]
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        for block in range(len(tower.encoder.layer)):
            expected = out.attentions[block][:, :, 0, 1:].sum(dim=1)  # (T, n-1): [CLS] query, heads summed
            got = cls_row(tower.encoder.layer[block], out.hidden_states[block])
            torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    assert "cls_token" in family_for(model).capabilities()  # so HiRED runs on InternVL


def test_dominant_keeps_each_partitions_top_tokens_thumbnail_scored_from_the_last_tile(internvl, images):
    """Scores from the tower's own eager attention, folded by the stock pixel shuffle: each partition keeps
    its top tokens, the thumbnail (partition 0) by the scores of each image's LAST tile."""
    from tokendrop.methods.layout import top_k_sorted

    model, processor = internvl
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with td.apply(model, processor, td.DominantDrop(0.5)) as handle, torch.no_grad():
        inputs = encode(processor, images, PROMPTS)
        model(**inputs)
    with torch.no_grad():
        attention = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]  # (T, H, n, n)
    received = attention.float().mean(dim=(1, 2))[:, 1:]  # (T, g*g): heads and queries averaged, [CLS] column dropped
    g = int(received.shape[1] ** 0.5)
    tokens = model.model.pixel_shuffle(received.view(-1, g, g, 1), scale_factor=0.5).sum(dim=-1).flatten(1)  # (T, N)
    start = 0
    for where, tiles in zip(handle.selections, [3, 5, 1]):
        for p in range(tiles):
            kept = where[where[:, 0] == p]
            stock_tile = start + (tiles - 1 if p == 0 else p - 1)
            flat = kept[:, 1] * 2 + kept[:, 2]
            assert torch.equal(flat, top_k_sorted(tokens[stock_tile], len(flat))), (tiles, p)
        start += tiles


def reference_logits(model, stock_features, inputs, selections, partitions):
    """Logits of the STOCK model fed the stock features' rows named by `selections`, at the image tokens."""
    rows, start = [], 0
    for where, tiles in zip(selections, partitions):
        stock_tile = torch.where(where[:, 0] == 0, tiles - 1, where[:, 0] - 1)  # thumbnail: the image's last tile
        grid = int(stock_features.shape[1] ** 0.5)
        rows.append(stock_features[start + stock_tile, where[:, 1] * grid + where[:, 2]])
        start += tiles
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, torch.cat(rows))
    return model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("method", [td.HiRED(0.5), td.DominantDrop(0.4), td.RandomDrop(0.3), td.BaseOnly()], ids=repr)
def test_pre_llm_logits_equal_stock_rows_at_their_places(internvl, images, method):
    model, processor = internvl
    stock = encode(processor, images, PROMPTS)
    with torch.no_grad():
        features = model.model.get_image_features(stock["pixel_values"]).pooler_output  # (T, N, D)
        with td.apply(model, processor, method) as handle:
            inputs = encode(processor, images, PROMPTS)
            ours = model(**inputs).logits
            selections = handle.selections
        expected = reference_logits(model, features, inputs, selections, partitions=[3, 5, 1])  # SIZES' tiles
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert "image_sizes" not in encode(processor, images[:1], PROMPTS[:1])  # the stock processor again


def test_replacement_get_image_features_keeps_the_stock_signature(internvl):
    model, processor = internvl
    stock = inspect.signature(type(model.model).get_image_features).parameters
    with td.apply(model, processor, td.HiRED(0.5)):
        ours = inspect.signature(model.model.get_image_features).parameters
        assert [name for name in ours if name in stock] == [name for name in stock if name != "self"]  # in order
        assert set(ours) - set(stock) == {"image_sizes"}  # the one addition, which generate() passes along
        assert all(ours[name].kind == stock[name].kind for name in ours if name in stock)


def test_generate_equals_forward_under_a_pre_llm_method(internvl, images):
    """generate() pre-encodes the images through the replacement (image_sizes as an argument); a forward
    gets them as a keyword (taken out by the pre-hook): the first step's logits agree."""
    model, processor = internvl
    with td.apply(model, processor, td.DominantDrop(0.5)), torch.no_grad():
        inputs = encode(processor, images, PROMPTS)
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(out.logits[0], model(**inputs).logits[:, -1], atol=1e-5, rtol=1e-5)


def reference_generate(model, lm, inputs, method, steps=STEPS):
    """test_in_llm's plain loop (no cache, the whole sequence at every step) from InternVL's stock features."""
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (T, N, D)
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        image = inputs["input_ids"] == model.config.image_token_id
        embeds = embeds.masked_scatter(image[..., None], features.reshape(-1, features.shape[-1]))
        image, chosen, tokens, logits = image[0], {}, [], []
        for _ in range(steps):
            logits.append(model.lm_head(reference_forward(lm, embeds, image, method, chosen))[0])
            tokens.append(int(logits[-1].argmax()))
            embeds = torch.cat([embeds, model.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            image = torch.cat([image, torch.tensor([False])])
    return torch.tensor(tokens), torch.stack(logits)


@pytest.fixture(scope="module")
def eager_lm(internvl):
    lm = copy.deepcopy(internvl[0].model.language_model)
    lm.set_attn_implementation("eager")
    return lm


IN_LLM = [td.PyramidDrop(), td.FastV(k=2, drop=0.5)]


@pytest.mark.parametrize("method", IN_LLM, ids=repr)
def test_in_llm_decode_equals_the_no_cache_reference_batch_1(internvl, images, eager_lm, method):
    model, processor = internvl
    inputs = processor(images=images[1:2], text=PROMPTS[1:2], return_tensors="pt")
    tokens, logits = reference_generate(model, eager_lm, inputs, method)
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", IN_LLM, ids=repr)
def test_in_llm_decode_equals_the_reference_padded_batch(internvl, images, eager_lm, method):
    model, processor = internvl
    batch = encode(processor, images, PROMPTS)
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    for i in range(len(images)):
        single = processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt")
        tokens, logits = reference_generate(model, eager_lm, single, method)
        assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], tokens)
        torch.testing.assert_close(step_logits(out, i), logits, atol=1e-4, rtol=1e-4)


def test_internvl_3_5_8b_costs_by_hand():
    spec = cost.load_arch("internvl3.5-8b")
    model = cost.meta_model(cost.arch_config(spec))
    images = cost.arch_geometry_processor(spec)
    record = cost.method_cost(model, (), (448, 896), text_tokens=64, processor=images)
    # 448x896 -> 1x2 tiles of 448 px + the thumbnail = 3 tiles; 32x32 patches of 14 px -> 16x16 = 256 tokens each
    assert record["partitions"] == 3 and record["visual_tokens"] == 3 * 256 == 768
    # KV: 36 layers x keys and values x 8 kv heads x 128 x (64 + 768) tokens x 2 bytes
    assert record["kv_cache_bytes"] == 36 * 2 * 8 * 128 * (64 + 768) * 2
    # vision: per tile 1024 patches + [CLS] through 24 layers of width 1024, MLP 4096; the patch conv;
    # then the projector (4*1024 -> 4096 -> 4096) over 768 tokens; 2 FLOPs per multiply-add
    t, vd, vm = 1025, 1024, 4096
    layer = 4 * t * vd * vd + 2 * t * t * vd + 2 * t * vd * vm
    tower = 3 * (1024 * 3 * 14 * 14 * vd + 24 * layer)
    assert record["vision_flops"] == 2.0 * (tower + 768 * (4096 * 4096 + 4096 * 4096))
    kept = cost.method_cost(model, td.registry.build_methods("random", budget=0.25), (448, 896), processor=images)
    assert kept["visual_tokens"] == 192  # floor(0.25 * 3 * 256)
    shapes = family_for(model).shapes()
    assert (shapes.d, shapes.m, shapes.depth, shapes.kv_width, shapes.vocab) == (4096, 12288, 36, 1024, 151936)


def test_internvl_arch_processor_writes_the_counted_tokens():
    from tokendrop.families.internvl.tiny import tiny_internvl_tokenizer

    spec = cost.load_arch("internvl3.5-8b")
    tokenizer = tiny_internvl_tokenizer()
    model, processor = cost.meta_model(cost.arch_config(spec)), cost.arch_processor(spec, tokenizer)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    for i, size in enumerate([(448, 448), (448, 896), (1000, 300), (700, 1200)]):
        ids = processor(images=random_image(*size, seed=i), text="<IMG_CONTEXT>\nhi", return_tensors="pt")["input_ids"]
        assert cost.method_cost(model, (), size, processor=processor)["visual_tokens"] == int((ids == context).sum()), size


def greedy(model, inputs, n=3, **settings):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **settings)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.logits[0]


@pytest.mark.parametrize("method", [td.HiRED(0.4), td.DominantDrop(0.3), td.SpatialDrop(0.5), td.BaseOnly()], ids=repr)
def test_padded_batch_with_a_text_only_row_equals_one_by_one(internvl, images, method):
    model, processor = internvl
    prompts = [PROMPTS[0], "Q: no image here, what colour? A:", PROMPTS[1], PROMPTS[2]]
    with td.apply(model, processor, method) as handle:
        batch = encode(processor, [images[0], images[1], images[2]], prompts)
        tokens, logits = greedy(model, batch)
        batch_selections = handle.selections
        for i, prompt in enumerate(prompts):
            image = {0: images[0], 2: images[1], 3: images[2]}.get(i)
            single = encode(processor, [image], [prompt]) if image is not None else processor.tokenizer([prompt], return_tensors="pt")
            alone, alone_logits = greedy(model, single)
            assert torch.equal(alone[0], tokens[i]), i
            torch.testing.assert_close(alone_logits[0], logits[i], atol=1e-4, rtol=1e-4)
            if image is not None:
                assert torch.equal(handle.selections[0], batch_selections[[0, None, 1, 2][i]])


def test_beams_expand_each_prompts_kept_tokens(internvl, images):
    """generate(num_beams=2) copies each prompt's kept image features to its beams (the (K, 1, D) rows are
    split by the placeholder counts of each prompt): the batch equals each prompt alone."""
    model, processor = internvl
    run = dict(max_new_tokens=3, do_sample=False, num_beams=2, output_scores=True, return_dict_in_generate=True)
    with td.apply(model, processor, td.RandomDrop(0.5)), torch.no_grad():
        batch = model.generate(**encode(processor, images, PROMPTS), **run)
        for i in range(len(images)):
            alone = model.generate(**encode(processor, [images[i]], [PROMPTS[i]]), **run)
            # the first step's scores of both beams of prompt i (rows 2i, 2i+1 of the expanded batch)
            torch.testing.assert_close(alone.scores[0], batch.scores[0][2 * i : 2 * i + 2], atol=1e-4, rtol=1e-4)


def test_remove_restores_model_and_processor_bit_for_bit(internvl, images):
    model, processor = internvl
    before = {name: set(vars(obj)) for name, obj in
              (("model", model.model), ("processor", processor), ("images", processor.image_processor))}
    stock_inputs = encode(processor, images, PROMPTS)
    stock_tokens, stock_logits = greedy(model, stock_inputs)
    handle = td.apply(model, processor, td.HiRED(0.3), td.PyramidDrop())
    patched = encode(processor, images, PROMPTS)
    assert patched["input_ids"].shape[1] < stock_inputs["input_ids"].shape[1]
    handle.remove()
    after = {name: set(vars(obj)) for name, obj in
             (("model", model.model), ("processor", processor), ("images", processor.image_processor))}
    assert after == before
    again = encode(processor, images, PROMPTS)
    assert set(again) == set(stock_inputs) and all(torch.equal(again[k], stock_inputs[k]) for k in again)
    tokens, logits = greedy(model, again)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)


def test_copies_of_the_patched_processor(internvl, images):
    """A deep copy is the stock processor at once (its two patches of `replace_image_token` undone last
    first); a pickled one (a DataLoader worker) writes the method's count and the image sizes."""
    import pickle

    model, processor = internvl
    stock = encode(processor, images[:1], PROMPTS[:1])
    with td.apply(model, processor, td.HiRED(0.5)):
        patched = encode(processor, images[:1], PROMPTS[:1])
        twin, worker = copy.deepcopy(processor), pickle.loads(pickle.dumps(processor))
        from_twin, from_worker = encode(twin, images[:1], PROMPTS[:1]), encode(worker, images[:1], PROMPTS[:1])
    assert set(from_twin) == set(stock) and torch.equal(from_twin["input_ids"], stock["input_ids"])
    assert torch.equal(from_worker["input_ids"], patched["input_ids"]) and "image_sizes" in from_worker
