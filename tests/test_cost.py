"""Analytic costs: the papers' FLOPs tables from the shipped configs, token counts vs the real processor."""

from __future__ import annotations

import json

import pytest

import tokendrop as td
from tokendrop import cost
from tokendrop.families.base import AttentionShapes
from tokendrop.cli import main
from tokendrop.registry import build_methods, family_for
from tokendrop.tiny import tiny_tokenizer

from sample_inputs import random_image

NEXT_ARCHS = ["llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-13b", "llava-v1.6-mistral-7b"]


@pytest.fixture(scope="module")
def shapes():
    """Shapes of every shipped arch, read from models built on the meta device."""
    return {name: cost.family_for(cost.meta_model(cost.arch_config(cost.load_arch(name)))).shapes() for name in cost.arch_names()}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_shipped_archs_have_the_public_shapes(shapes):
    assert {"llava-1.5-7b", "llava-1.5-13b", *NEXT_ARCHS} <= set(shapes)
    seven, thirteen, mistral = shapes["llava-v1.6-vicuna-7b"], shapes["llava-1.5-13b"], shapes["llava-v1.6-mistral-7b"]
    assert (seven.d, seven.m, seven.depth, seven.kv_width) == (4096, 11008, 32, 4096)
    assert (thirteen.d, thirteen.m, thirteen.depth) == (5120, 13824, 40)
    assert (mistral.m, mistral.kv_width) == (14336, 1024)  # 8 of 32 heads hold keys / values (GQA)
    assert (seven.vd, seven.vm, seven.vision_depth, seven.patch_inputs) == (1024, 4096, 24, 3 * 14 * 14)
    assert 6.7e9 < seven.lm_params() < 6.8e9  # vicuna-7b: 6.74B


# (model arch, n image tokens, method) -> PyramidDrop-convention TFLOPs; cost_model.md's computed values.
PDROP_TABLE = [
    ("llava-1.5-7b", 576, None, 3.817), ("llava-1.5-7b", 576, td.PyramidDrop(ratio=0.5), 1.777),
    ("llava-1.5-7b", 576, td.PyramidDrop(ratio=0.4), 1.540), ("llava-1.5-7b", 576, td.PyramidDrop(ratio=0.6), 2.063),
    ("llava-1.5-7b", 576, td.FastV(k=2, drop=0.5), 2.007),
    ("llava-v1.6-vicuna-7b", 2880, None, 20.83), ("llava-v1.6-vicuna-7b", 2880, td.PyramidDrop(ratio=0.5), 9.465),
    ("llava-v1.6-vicuna-7b", 2880, td.PyramidDrop(ratio=0.4), 8.219), ("llava-v1.6-vicuna-7b", 2880, td.PyramidDrop(ratio=0.6), 10.98),
    ("llava-v1.6-vicuna-7b", 2880, td.FastV(k=2, drop=0.5), 10.55),
    ("llava-v1.6-vicuna-7b", 5184, None, 40.62), ("llava-v1.6-vicuna-7b", 5184, td.PyramidDrop(ratio=0.5), 18.08),
    ("llava-1.5-7b", 2048, None, 14.36), ("llava-1.5-7b", 2048, td.PyramidDrop(ratio=0.5), 6.58),
    ("llava-1.5-7b", 2048, td.FastV(k=2, drop=0.5), 7.37),
    ("llava-1.5-7b", 576, td.PyramidDrop(layers=(10, 20)), 2.134), ("llava-1.5-7b", 576, td.PyramidDrop(layers=(6, 12, 18, 24)), 1.391),
]


@pytest.mark.parametrize("arch, n, inner, expected", PDROP_TABLE)
def test_pyramiddrop_convention_reproduces_the_table(shapes, arch, n, inner, expected):
    got = cost.pdrop_convention_macs(shapes[arch], n, inner) / 1e12
    assert got == pytest.approx(expected, abs=0.6e-3 * expected + 5e-4)


def test_pyramiddrop_paper_headline_numbers(shapes):
    # Rounded as the papers print them: 3.82 / 1.78 / 2.01 and 20.8 / 9.46 / 10.6.
    one, nxt = shapes["llava-1.5-7b"], shapes["llava-v1.6-vicuna-7b"]
    assert [round(cost.pdrop_convention_macs(one, 576, m) / 1e12, 2) for m in (None, td.PyramidDrop(), td.FastV())] == [3.82, 1.78, 2.01]
    assert round(cost.pdrop_convention_macs(nxt, 2880) / 1e12, 1) == 20.8
    assert round(cost.pdrop_convention_macs(nxt, 2880, td.PyramidDrop()) / 1e12, 2) == 9.46
    assert round(cost.pdrop_convention_macs(nxt, 2880, td.FastV()) / 1e12, 1) == 10.6


def test_fastv_convention_per_layer_average(shapes):
    thirteen, seven = shapes["llava-1.5-13b"], shapes["llava-1.5-7b"]
    assert round(cost.fastv_convention_macs(thirteen, 576) / 1e9, 1) == 154.6
    assert round(cost.fastv_convention_macs(thirteen, 576, td.FastV(k=2, drop=0.5)) / 1e9, 1) == 84.6
    assert round(cost.fastv_convention_macs(seven, 576) / 1e9, 1) == 99.3
    assert round(cost.fastv_convention_macs(seven, 576, td.FastV(k=2, drop=0.5)) / 1e9, 1) == 54.8  # paper prints 54.6


def test_kv_cache_matches_dart_reference(shapes):
    # DART, LLaVA-NeXT-7B fp16: 1512 MB at 2880 tokens, 168 MB at 320 (2 * 32 layers * 4096 * tokens * 2 bytes).
    seven = shapes["llava-v1.6-vicuna-7b"]
    for tokens, megabytes in ((2880, 1512), (320, 168)):
        total = sum(cost.kv_bytes_per_layer(seven, [tokens] * seven.depth, 2)) / 1e6
        assert total == pytest.approx(megabytes, rel=0.005)


def test_prefill_flops_by_hand_for_one_layer():
    shapes = cost.Shapes(d=8, m=16, depth=1, q_width=8, kv_width=4, vocab=10, vd=4, vm=8, vision_depth=1,
                         patch_inputs=3, projector=(4, 8))
    L = 5  # projections 5*(2*64 + 2*32) + causal attention 15 pairs * 2 * 8 + MLP 3*5*8*16 + head 80, doubled
    assert cost.prefill_flops(shapes, [L]) == 2 * (5 * 192 + 15 * 16 + 1920 + 80)
    assert cost.decode_flops(shapes, [L]) == 2 * (192 + 2 * 6 * 8 + 3 * 8 * 16 + 80)


@pytest.mark.parametrize("arch", NEXT_ARCHS)
def test_stock_token_counts_match_the_real_processor(arch, tokenizer):
    spec = cost.load_arch(arch)
    model = cost.meta_model(cost.arch_config(spec))
    processor = cost.arch_processor(spec, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for i, (h, w) in enumerate([(672, 672), (700, 1000), (336, 1008), (480, 640), (1000, 300), (200, 500)]):
        ids = processor(images=random_image(h, w, seed=i), text="<image>\nhi", return_tensors="pt")["input_ids"][0]
        record = cost.method_cost(model, (), (h, w))
        assert record["visual_tokens"] == int((ids == image_id).sum()), (arch, h, w)
    assert cost.method_cost(model, (), (672, 672))["visual_tokens"] == 2928  # 576 + 2304 + 48 newlines


def test_method_counts_match_the_patched_processor(tokenizer):
    spec = cost.load_arch("llava-v1.6-vicuna-7b")
    config = cost.arch_config(spec)
    config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model, processor = cost.meta_model(config), cost.arch_processor(spec, tokenizer)
    for name, budget in (("hired", 0.2), ("spatial", 0.1), ("hired+pdrop", 0.4)):
        methods = build_methods(name, budget=budget)
        with td.apply(model, processor, *methods):
            ids = processor(images=random_image(500, 900), text="<image>\nhi", return_tensors="pt")["input_ids"][0]
        record = cost.method_cost(model, methods, (500, 900))
        assert record["visual_tokens"] == int((ids == config.image_token_id).sum())


def test_llava_one_point_five_counts_576(tokenizer):
    spec = cost.load_arch("llava-1.5-7b")
    model, processor = cost.meta_model(cost.arch_config(spec)), cost.arch_processor(spec, tokenizer)
    ids = processor(images=random_image(400, 700), text="<image>\nhi", return_tensors="pt")["input_ids"][0]
    assert int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576
    assert cost.method_cost(model, (), (400, 700))["visual_tokens"] == 576
    assert cost.method_cost(model, build_methods("hired", budget=0.25), (400, 700))["visual_tokens"] == 144


def test_cost_record_is_consistent():
    model = cost.meta_model(cost.arch_config(cost.load_arch("llava-v1.6-vicuna-7b")))
    van = cost.method_cost(model, (), (672, 672), text_tokens=40)
    hired = cost.method_cost(model, build_methods("hired", budget=0.2), (672, 672), text_tokens=40)
    both = cost.method_cost(model, build_methods("hired+pdrop", budget=0.2), (672, 672), text_tokens=40, batch=2)
    assert hired["visual_tokens"] == 576 and van["visual_tokens"] == 2928
    assert hired["prefill_flops"] == pytest.approx(hired["vision_flops"] + hired["scoring_flops"] + hired["llm_prefill_flops"])
    assert 0 < hired["scoring_flops"] < 0.01 * hired["vision_flops"]  # [CLS] rows are cheap
    assert hired["vision_flops"] < van["vision_flops"]  # the projector only sees kept tokens
    assert hired["kv_cache_bytes"] / van["kv_cache_bytes"] == pytest.approx((40 + 576) / (40 + 2928))
    assert both["layer_image_tokens"][:8] == [576] * 8 and both["layer_image_tokens"][-1] == 72
    assert both["kv_cache_bytes"] == sum(both["kv_cache_bytes_per_layer"]) == 2 * sum(cost.kv_bytes_per_layer(cost.family_for(model).shapes(), [40 + n for n in both["layer_image_tokens"]], 2))


def test_methods_that_read_projected_features_pay_the_projector_over_every_token():
    # DivPrune (and CDPruner) pick among the projector's outputs for every token: the projector runs on all
    # 2928, as in the stock model; a method that drops before the projector pays for the kept 576 only.
    model = cost.meta_model(cost.arch_config(cost.load_arch("llava-v1.6-vicuna-7b")))
    van, divprune, spatial = (cost.method_cost(model, build_methods(name, budget=0.2), (672, 672), text_tokens=40)
                              for name in ("none", "divprune", "spatial"))
    assert divprune["visual_tokens"] == spatial["visual_tokens"] == 576
    assert divprune["vision_flops"] == van["vision_flops"] > spatial["vision_flops"]


def test_cost_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "cost.json"
    code = main(["cost", "--arch", "llava-v1.6-vicuna-7b", "--tokens", "2880", "--method", "none,pdrop,fastv,hired",
                 "--budget", "0.2,0.4", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "20.825" in out and "9.465" in out and "hired@0.4" in out
    records = json.loads(path.read_text())
    assert [r["method"] for r in records] == ["none", "pdrop", "fastv", "hired", "hired"]
    assert round(records[0]["pdrop_tflops"], 1) == 20.8 and round(records[2]["pdrop_tflops"], 1) == 10.6
    for key in ("vision_flops", "llm_prefill_flops", "decode_flops_per_token", "kv_cache_bytes_per_layer", "fastv_gflops_per_layer"):
        assert all(key in r for r in records)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "llava-v1.6-vicuna-7", "--method", "none"], "Did you mean 'llava-v1.6-vicuna-7b'"),
    (["--image-size", "672by672"], "--image-size"),
    (["--image-size", "0x672"], "--image-size"),
    (["--method", " , "], "--method"),
    (["--method", "hird"], "Did you mean 'hired'"),
    (["--budget", "0"], "--budget must be in (0, 1]"),
    (["--budget", "1.5"], "--budget must be in (0, 1]"),
    (["--budget", "abc"], "--budget"),
    (["--dtype", "int3"], "--dtype"),
])
def test_cost_cli_bad_arguments_exit_2(capsys, argv, message):
    assert main(["cost", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("arch", ["qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen3.5-9b"])
def test_qwen_archs_count_what_their_image_processor_writes(arch):
    from sample_inputs import random_image

    spec = cost.load_arch(arch)
    model = cost.meta_model(cost.arch_config(spec))
    images = cost.arch_geometry_processor(spec)
    for size in [(672, 672), (480, 1024), (1400, 900)]:
        grid = images.image_processor(images=[random_image(*size)], return_tensors="pt")["image_grid_thw"]
        expected = int(grid.prod()) // 4  # one LLM token per 2x2 merged patches
        stock = cost.method_cost(model, (), size, processor=images)
        assert stock["visual_tokens"] == stock["stock_visual_tokens"] == expected, size
        kept = cost.method_cost(model, build_methods("dominant", budget=0.2), size, processor=images)
        assert kept["visual_tokens"] == int(0.2 * expected)  # floor of the exact product
        assert kept["vision_flops"] == stock["vision_flops"] and kept["scoring_flops"] > 0  # the merger runs on all
        assert kept["kv_cache_bytes"] < stock["kv_cache_bytes"] / 2  # 20% of the image tokens, plus the text
    shapes = family_for(model).shapes()
    assert shapes.vision_tokens_extra == 0 and shapes.depth == spec["model"]["text_config"]["num_hidden_layers"]


# ---- hybrid decoders: Gated-DeltaNet linear-attention layers beside full-attention layers ----------------
def hybrid_shapes():
    """One linear-attention layer, then one gated full-attention layer (hand-sized widths)."""
    linear = cost.LinearAttentionShapes(key_heads=1, key_dim=2, value_heads=2, value_dim=3, conv_kernel=4)
    return cost.Shapes(d=8, m=16, depth=2, q_width=8, kv_width=4, vocab=10, vd=4, vm=8, vision_depth=1, patch_inputs=3,
                       projector=(4, 8), gated_attention=True, layer_types=("linear_attention", "full_attention"),
                       linear=linear)


def test_hybrid_prefill_decode_and_kv_by_hand():
    shapes = hybrid_shapes()
    # linear layer per token: q/k/v 8 * (2*1*2 + 2*3) = 80, gate z 8*6 = 48, a and b 2*8*2 = 32, out 6*8 = 48,
    # convolution 10 channels * 4 taps = 40, state read / write / query 3 * 2 heads * 2*3 = 36 -> 284
    # full layer per token: q with its gate 2*8*8 = 128, k and v 2*8*4 = 64, o 8*8 = 64 -> 256
    L = 5  # causal attention 15 pairs * 2 * 8 = 240; MLP 3*5*8*16 = 1920 per layer; head 8*10 = 80
    assert cost.prefill_flops(shapes, [L, L]) == 2 * (5 * 284 + 1920 + 5 * 256 + 240 + 1920 + 80)
    # decode: MLPs 2 * 3*8*16, head 80, one recurrence step 284, the full layer 256 + (5 + 1) * 2 * 8
    assert cost.decode_flops(shapes, [L, L]) == 2 * (2 * 384 + 80 + 284 + 256 + 96)
    assert cost.kv_bytes_per_layer(shapes, [L, L], 2) == [0, 2 * 4 * 5 * 2]  # no per-token KV in the linear layer
    assert cost.recurrent_state_bytes(shapes, 2) == (2 * 2 * 3 + 10 * 4) * 2  # state matrices + convolution window
    # LLM parameters: linear 248 weights (all but the state products), full 256, MLPs 2 * 384, embeddings and head 160
    assert shapes.lm_params() == 248 + 256 + 2 * 384 + 160


def test_a_decoder_without_linear_layers_is_counted_as_before():
    plain = cost.Shapes(d=8, m=16, depth=2, q_width=8, kv_width=4, vocab=10, vd=4, vm=8, vision_depth=1, patch_inputs=3,
                        projector=(4, 8))
    assert cost.prefill_flops(plain, [5, 5]) == 2 * (2 * (5 * 192 + 240 + 1920) + 80)
    assert cost.kv_bytes_per_layer(plain, [5, 5], 2) == [80, 80] and cost.recurrent_state_bytes(plain, 2) == 0


def test_hybrid_shapes_count_the_tiny_models_weights():
    # LLM parameters from the shapes == the tiny Qwen3.5's own weights (norms, A_log and dt_bias aside)
    from tokendrop.families.qwen_vl.tiny import tiny_qwen3_5

    model, _ = tiny_qwen3_5()
    shapes = family_for(model).shapes()
    assert shapes.layer_types == tuple(model.config.text_config.layer_types) and shapes.gated_attention
    counted = [model.model.language_model, model.lm_head]
    weights = sum(p.numel() for module in counted for name, p in module.named_parameters()
                  if "norm" not in name and name.rpartition(".")[2] not in ("A_log", "dt_bias"))
    assert shapes.lm_params() == weights


def test_a_mixture_of_experts_counts_the_mlp_width_a_token_runs():
    from tokendrop.families.qwen_vl.tiny import tiny_qwen3_5_moe

    model, _ = tiny_qwen3_5_moe()
    assert family_for(model).shapes().m == 2 * 32 + 48  # 2 routed experts of width 32 per token + the shared one (48)


def test_qwen3_5_9b_kv_bytes_count_its_full_attention_layers_only(shapes):
    nine = shapes["qwen3.5-9b"]
    full = [i for i, kind in enumerate(nine.layer_types) if kind == "full_attention"]
    assert full == [3, 7, 11, 15, 19, 23, 27, 31] and (nine.kv_width, nine.q_width) == (4 * 256, 16 * 256)
    assert 8.9e9 < nine.lm_params() < 9.0e9  # Qwen3.5-9B: ~8.95B in the LLM (the rest: vision tower, MTP head)
    model = cost.meta_model(cost.arch_config(cost.load_arch("qwen3.5-9b")))
    record = cost.method_cost(model, build_methods("dominant", budget=0.5), (640, 640), text_tokens=40)
    tokens = 40 + record["visual_tokens"]
    assert record["visual_tokens"] == 200  # (640 / 32)^2 = 400 merged tokens, half kept
    assert record["kv_cache_bytes_per_layer"] == [2 * 1024 * tokens * 2 if i in full else 0 for i in range(32)]
    assert record["kv_cache_bytes"] == 8 * 2 * 1024 * tokens * 2
    assert record["recurrent_state_bytes"] == 24 * (32 * 128 * 128 + (2 * 16 * 128 + 32 * 128) * 4) * 2


def test_gemma_4_31b_counts_each_layer_with_its_own_widths_and_window(shapes):
    if "gemma-4-31b" not in shapes:
        pytest.skip("Gemma 4 needs transformers >= 5.21 or torchvision (its processor imports torchvision)")
    gemma = shapes["gemma-4-31b"]
    # the public config: 60 layers, every 6th full attention; sliding layers 16 KV heads x 256 with a
    # 1024-token window, full layers 4 KV heads x 512 whose keys are also the values (no v_proj)
    full = [i for i in range(60) if gemma.attn(i).window is None]
    assert full == list(range(5, 60, 6))
    assert gemma.attn(0) == AttentionShapes(32 * 256, 16 * 256, values=True, window=1024)
    assert gemma.attn(5) == AttentionShapes(32 * 512, 4 * 512, values=False, window=None)
    d = 5376
    assert gemma.attention_params(0) == 2 * d * 32 * 256 + 2 * d * 16 * 256
    assert gemma.attention_params(5) == 2 * d * 32 * 512 + d * 4 * 512
    assert gemma.tied_embeddings  # the head is the embedding matrix: counted once
    for L in (300, 2000):  # under and over the window
        kv = cost.kv_bytes_per_layer(gemma, [L] * 60, 2)
        assert kv[0] == 2 * 16 * 256 * min(L, 1024) * 2 and kv[5] == 2 * 4 * 512 * L * 2
    # prefill attention: a sliding layer attends to at most 1024 keys per query
    assert AttentionShapes(8, 8, window=4).attended_pairs(6) == 1 + 2 + 3 + 4 + 4 + 4
    assert AttentionShapes(8, 8).attended_pairs(6) == 21
