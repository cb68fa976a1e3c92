"""CDPruner: a 4-token DPP by hand; the kept tokens of tiny LLaVA-1.5 / LLaVA-NeXT against the official
algorithm (`encode_images` of Theia-4869/CDPruner, written out below) on the stock model's own features and
a tiny random CLIP; the instruction captured per sample; the clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.families.base import resolve
from tokendrop.methods import Layout, budget_tokens
from tokendrop.methods.cdpruner import greedy_map
from tokendrop.methods.fastervlm import even_counts
from tokendrop.registry import build_methods, families, family_for
from tokendrop.tiny import tiny_clip

PROMPTS = ["USER: <image>\nWhat is the red thing on the left? ASSISTANT:", "<image>\nQ: how many? A:"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def cdpruner(budget, clip, **options):
    return td.CDPruner(budget, clip=clip[0], clip_tokenizer=clip[1], **options)


# ---- the DPP by hand ----------------------------------------------------------------------------------
def four_tokens():
    """a and b the same direction, c and d orthogonal to it and to each other: S = [[1,1,0,0],[1,1,0,0],[0,0,1,0],[0,0,0,1]]."""
    return torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])


def test_four_token_worked_example():
    # relevance r = (1, 1, 0.5, 0.8): kernel L = r_i S_ij r_j, gains d^2 = diag L = (1, 1, 0.25, 0.64)
    #   pick 1: a (a and b tie at 1: the lower index); its row e = L_a / 1 = (1, 1, 0, 0); gains - e^2 = (., 0, .25, .64)
    #   pick 2: d (0.64): b lost all its gain to its twin a, d is more relevant than c; e = (0, 0, 0, .8)
    #   pick 3: c (0.25); pick 4: b (no gain left: taken without an update)
    unit = four_tokens() / four_tokens().norm(dim=1, keepdim=True)
    r = torch.tensor([1.0, 1.0, 0.5, 0.8])
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    assert greedy_map(kernel, 4).tolist() == [0, 3, 2, 1]
    assert greedy_map(kernel, 2).tolist() == [0, 3]  # relevance alone would keep a and b
    # through select: raw relevance (0.5, 0.5, 0, 0.3) min-max normalises to (1, 1, 0, 0.6) (+2e-6)
    layout = Layout(grid=1, grid_cols=4)
    scores = {"projected": four_tokens()[None], "relevance": torch.tensor([[0.5, 0.5, 0.0, 0.3]])}
    method = td.CDPruner(0.5, clip=kernel_free_clip(), clip_tokenizer=str)
    assert [k.tolist() for k in method.select(layout, scores)] == [[0, 3]]  # floor(0.5 * 4) = 2
    assert [k.tolist() for k in dataclasses.replace(method, budget=0.75).select(layout, scores)] == [[0, 2, 3]]


def kernel_free_clip():
    """Something shaped like a CLIPModel (select never reads it)."""
    return torch.nn.ModuleDict({"vision_model": torch.nn.Identity(), "visual_projection": torch.nn.Identity(),
                                "text_model": torch.nn.Identity(), "text_projection": torch.nn.Identity()})


def test_a_spent_kernel_keeps_picking_without_nan():
    same = torch.ones(5, 5)  # rank 1: after the first pick no gain is left
    picks = greedy_map(same, 5)
    assert picks.tolist() == [0, 1, 2, 3, 4]
    layout = Layout(grid=1, grid_cols=5)
    scores = {"projected": torch.ones(1, 5, 3), "relevance": torch.full((1, 5), 0.3)}  # constant relevance too
    assert td.CDPruner(0.6, clip=kernel_free_clip(), clip_tokenizer=str).select(layout, scores)[0].tolist() == [0, 1, 2]


# ---- the official algorithm ---------------------------------------------------------------------------
def official_encode(projected, image_embeds, text_embeds, visual_token_num):
    """`LlavaMetaForCausalLM.encode_images` after the towers, as the official writes it: B partitions of N
    tokens; relevance normalised over the whole batch; (B, T) kept indices, sorted."""
    B, N, _ = projected.shape
    image_normalized = (projected / projected.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return torch.sort(select_idx.t()).values


def official_text_embeds(clip, text):
    """`CLIPVisionTower.forward`'s text side: the prompt cut into segments of the text tower's length, zero padded."""
    model, tokenizer = clip
    length = model.config.text_config.max_position_embeddings
    inputs = tokenizer(text=[text], return_tensors="pt")
    segments = (inputs.input_ids.shape[1] - 1) // length + 1
    padding = length * segments - inputs.input_ids.shape[1]
    inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, length)
              for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model.get_text_features(**inputs).pooler_output


def stock_inputs(model, clip, pixels):
    """(projected (P, N, D), CLIP image embeds (P, N, C)) of one image's tiles, from the stock tower."""
    base = model.model
    with torch.no_grad():
        hidden = base.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        vision = clip[0].vision_model
        return base.multi_modal_projector(hidden), clip[0].visual_projection(vision.post_layernorm(hidden))


def reference_picks(model, clip, pixels, layout, budget, instruction):
    """(P lists of kept indices): the official algorithm on every partition's tokens that survive unpadding,
    B = floor(budget * P * N) split evenly (the documented LLaVA-NeXT rule), relevance normalised over the image."""
    projected, embeds = stock_inputs(model, clip, pixels)
    text = official_text_embeds(clip, instruction)
    valid = layout.valid()
    if bool(valid.all()) and len(set(even_counts(budget, layout))) == 1:  # the official exactly: one batch of tiles
        return official_encode(projected, embeds, text, even_counts(budget, layout)[0]).tolist()
    # padded tiles: the same routine on each tile's valid tokens, the relevance range of the whole image
    unit_embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    raw = (-(unit_embeds @ (text / text.norm(dim=-1, keepdim=True)).T)).mean(dim=-1)
    low, high = raw[valid].min(), raw[valid].max()
    keep = []
    for p, count in enumerate(even_counts(budget, layout)):
        idx = valid[p].nonzero().squeeze(1)
        picked = official_with_range(projected[p, idx], embeds[p, idx], text, count, low, high)
        keep.append(idx[picked].sort().values.tolist())
    return keep


def official_with_range(projected, embeds, text, count, low, high):
    """The official kernel and greedy loop for one tile whose relevance is normalised by (low, high)."""
    unit = (projected / projected.norm(dim=-1, keepdim=True)).float()
    e = embeds / embeds.norm(dim=-1, keepdim=True)
    r = (-(e @ (text / text.norm(dim=-1, keepdim=True)).T)).mean(dim=-1)
    r = (r - low + 1e-6) / (high - low)
    kernel = (r[:, None] * (unit @ unit.T) * r[None, :])[None]
    di2s, cis, picks = kernel[0].diagonal().clone()[None], torch.zeros(count, 1, r.numel()), []
    for i in range(count):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[0, j] - cis[:i, 0, j] @ cis[:i, 0]) / torch.sqrt(di2s[0, j])
        cis[i, 0] = eis
        di2s = di2s - eis.square()
        di2s[0, j] = -float("inf")
    return torch.tensor(picks, dtype=torch.long)


def tiles_of(pixel_values, i, layout):
    return pixel_values[i][: layout.num_partitions] if pixel_values.dim() == 5 else pixel_values[i : i + 1]


def as_indices(selection, layout):
    """(K, 3) (partition, row, col) -> P sorted index lists."""
    part, row, col = selection.unbind(1)
    flat = row * layout.grid + col
    return [flat[part == p].sort().values.tolist() for p in range(layout.num_partitions)]


@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_keeps_the_official_picks_and_feeds_their_rows(fixture, request, clip):
    model, processor = request.getfixturevalue(fixture)
    adapter = family_for(model)
    images = [random_image(150, 300, seed=1), random_image(224, 224, seed=2)]
    stock = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    budget = 0.25
    with td.apply(model, processor, cdpruner(budget, clip)) as handle, torch.no_grad():
        short = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
        logits = model(**short).logits[:, -1]
        selections = handle.selections
    image_id = model.config.image_token_id
    embeds = model.get_input_embeddings()(short["input_ids"])
    for i, image in enumerate(images):
        layout = adapter.layout((image.height, image.width))
        k = budget_tokens(budget, layout)
        assert selections[i].shape[0] == k == int((short["input_ids"][i] == image_id).sum())  # exact counts
        instruction = PROMPTS[i].replace("<image>", "").strip()
        pixels = tiles_of(stock["pixel_values"], i, layout)
        expected = reference_picks(model, clip, pixels, layout, budget, instruction)
        assert as_indices(selections[i], layout) == expected
        projected, _ = stock_inputs(model, clip, pixels)
        rows = torch.cat([projected[p, idx] for p, idx in enumerate(expected)])  # base, then tiles
        if layout.num_tiles:  # the stock packing: the canvas row by row
            rows = torch.cat([projected[0, expected[0]], canvas_rows(projected, expected, layout)])
        embeds[i, short["input_ids"][i] == image_id] = rows
    with torch.no_grad():  # the stock model fed the reference rows
        reference = model(inputs_embeds=embeds, attention_mask=short["attention_mask"]).logits[:, -1]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def canvas_rows(projected, keep, layout):
    """The kept tile rows in the order LLaVA-NeXT packs the canvas: canvas row by canvas row."""
    g, (rows, cols) = layout.grid, layout.tiles
    out = []
    for r in range(layout.crop[0], layout.crop[1]):
        for c in range(layout.crop[2], layout.crop[3]):
            tile, n = 1 + (r // g) * cols + c // g, (r % g) * g + c % g
            if n in keep[tile]:
                out.append(projected[tile, n])
    return torch.stack(out)


# ---- the instruction, per sample ----------------------------------------------------------------------
def test_the_instruction_is_each_samples_prompt_in_a_padded_batch(next_model, clip):
    model, processor = next_model
    image = random_image(150, 300, seed=3)
    prompts = ["<image>\nQ: what is it? A:", "USER: <image>\nWhat colour is the large shape in the top left corner "
               "of this picture, and how many small ones are there? ASSISTANT:"]  # padded; 2 text segments
    with td.apply(model, processor, cdpruner(0.2, clip)) as handle, torch.no_grad():
        batch = processor(images=[image, image], text=prompts, return_tensors="pt", padding=True)
        assert bool((batch["attention_mask"] == 0).any())
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        generated = handle.selections
        together, chosen = model(**batch).logits[:, -1], handle.selections
        assert all(torch.equal(a, b) for a, b in zip(generated, chosen)), "generate() reads the same instructions"
        assert not torch.equal(chosen[0], chosen[1]), "the same image under two prompts keeps different tokens"
        for i, prompt in enumerate(prompts):
            single = processor(images=[image], text=[prompt], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[0, -1], together[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], chosen[i]), "batch == one by one"


def test_the_captured_text_is_the_prompt_without_placeholders(llava_model):
    from tokendrop.instructions import PromptCapture

    model, processor = llava_model
    batch = processor(images=[random_image(60, 60)] * 2, text=PROMPTS, return_tensors="pt", padding=True)
    capture = PromptCapture(processor.tokenizer, model.config.image_token_id)
    capture.calls.append((batch["input_ids"], batch["attention_mask"]))
    n = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    assert capture.per_image([n, n]) == [p.replace("<image>", "").strip() for p in PROMPTS]
    capture.calls[-1] = (None, None)
    with pytest.raises(ValueError, match="not inputs_embeds"):
        capture.per_image([n])


def test_keep_all_is_the_stock_model(next_model, clip):
    model, processor = next_model
    images = [random_image(150, 300, seed=1), random_image(330, 100, seed=2)]
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with td.apply(model, processor, cdpruner(1.0, clip, keep_newlines=True)):
            again = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
            ours = model.generate(**again, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- options and refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("options, error, message", [
    ({"clip": ""}, ValueError, "clip must be a CLIP checkpoint (a folder or hub id) or a transformers CLIPModel, got ''"),
    ({"clip": 3}, TypeError, "clip must be a CLIP checkpoint (a folder or hub id) or a transformers CLIPModel, got int"),
    ({"clip": torch.nn.Linear(2, 2)}, TypeError, "clip must be a CLIP checkpoint (a folder or hub id) or a transformers "
                                                 "CLIPModel, got Linear"),
    ({"clip": "model", "clip_tokenizer": 5}, TypeError, "clip_tokenizer must be a tokenizer, a folder or hub id, or None; got int"),
])
def test_bad_clip_values_are_one_clear_line(options, error, message):
    with pytest.raises(error) as err:
        td.CDPruner(0.2, **options)
    assert str(err.value) == message


def test_a_clip_model_needs_its_tokenizer(clip):
    with pytest.raises(TypeError, match="^clip_tokenizer is required when clip is a model"):
        td.CDPruner(0.2, clip=clip[0])


def test_a_clip_of_another_width_is_refused_before_any_work(llava_model):
    model, processor = llava_model
    with pytest.raises(ValueError, match=r"^clip: the CLIP's vision width is 32, the model's vision tower's is 64"):
        td.apply(model, processor, cdpruner(0.2, tiny_clip(vision_width=32)))
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)


def test_qwen_vl_and_vllm_refuse_it_by_name(clip):
    qwen = next(f for f in families() if f.name == "qwen2.5-vl")
    model, processor = resolve(qwen.tiny)()
    with pytest.raises(ValueError, match="CDPruner needs the sample's prompt text .* \\(capability 'instruction'\\)"):
        td.apply(model, processor, cdpruner(0.2, clip))
    import tokendrop.vllm

    with pytest.raises(ValueError, match="^CDPruner reads the sample's prompt when its image is encoded, which vLLM"):
        tokendrop.vllm.overrides(cdpruner(0.2, clip))


def test_a_checkpoint_path_from_the_command_line_and_lmms_eval(clip, tmp_path, llava_model):
    clip[0].save_pretrained(tmp_path)
    clip[1].save_pretrained(tmp_path)
    (method,) = build_methods("cdpruner", budget=0.2, strict=True, clip=str(tmp_path))  # --method-args clip=PATH
    assert method.clip == str(tmp_path) and repr(method) == (f"CDPruner(budget=0.2, keep_newlines=False, "
                                                             f"clip={str(tmp_path)!r}, clip_tokenizer=None)")
    assert method == td.CDPruner(0.2, clip=str(tmp_path)) and hash(method) == hash(td.CDPruner(0.2, clip=str(tmp_path)))
    model, processor = llava_model
    image = random_image(100, 100)
    with td.apply(model, processor, method) as handle, torch.no_grad():  # loads the folder on first use
        model.generate(**processor(images=[image], text=[PROMPTS[0]], return_tensors="pt"), max_new_tokens=1)
        from_path = handle.selections[0]
    with td.apply(model, processor, cdpruner(0.2, clip)) as handle, torch.no_grad():
        model.generate(**processor(images=[image], text=[PROMPTS[0]], return_tensors="pt"), max_new_tokens=1)
        assert torch.equal(handle.selections[0], from_path)
    import pickle

    assert pickle.loads(pickle.dumps(method)) == method and "_loaded" not in vars(pickle.loads(pickle.dumps(method)))


def test_labels_name_a_model_option_by_its_class(clip):
    from tokendrop.viz import method_label

    label = method_label(cdpruner(0.2, clip))
    assert label.startswith("CDPruner(budget=0.2, clip=<CLIPModel>, clip_tokenizer=<") and "\n" not in label
    assert method_label(td.CDPruner(0.2, clip="/a/clip")) == "CDPruner(budget=0.2, clip='/a/clip')"


def test_a_missing_checkpoint_is_one_line_before_any_work(llava_model, tmp_path):
    model, processor = llava_model
    with pytest.raises(ValueError, match=r"^clip: cannot read a CLIP checkpoint at '.*nowhere': [^\n]*$"):
        td.apply(model, processor, td.CDPruner(0.2, clip=str(tmp_path / "nowhere")))
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)
