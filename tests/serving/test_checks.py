"""What `tokendrop.vllm` refuses before vLLM starts, with the parameter and the reason in the message.

These need no vLLM (the checks read HF configs only), so they run in the main suite too.
"""

from __future__ import annotations

import pytest

import tokendrop as td
import tokendrop.vllm
from tokendrop.cli import main


@pytest.fixture(scope="module")
def next_config():
    from tokendrop.tiny import tiny_llava_next

    return tiny_llava_next(text_layers=1)[0].config


def test_in_llm_methods_are_refused_with_the_reason():
    for method in (td.PyramidDrop(), td.FastV()):
        with pytest.raises(ValueError, match="paged KV cache"):
            tokendrop.vllm.overrides(method)


def test_one_method_instance():
    with pytest.raises(TypeError, match="method instances"):
        tokendrop.vllm.overrides(td.HiRED)
    with pytest.raises(ValueError, match="exactly one pre-LLM method"):
        tokendrop.vllm.overrides(td.HiRED(0.2), td.SpatialDrop(0.2))


def test_unsupported_family_is_named():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="tokendrop.vllm serves .*the model is 'llama'"):
        tokendrop.vllm.overrides(td.SpatialDrop(0.2)).for_config(LlamaConfig())


def test_hired_needs_a_cls_token(next_config):
    config = next_config.__class__.from_dict({**next_config.to_dict(), "vision_feature_select_strategy": "full"})
    with pytest.raises(ValueError, match="capability 'cls_token'"):
        tokendrop.vllm.overrides(td.HiRED(0.2)).for_config(config)
    tokendrop.vllm.overrides(td.SpatialDrop(0.2)).for_config(config)  # score-free methods need no [CLS]


def test_scored_layers_must_be_built_by_vllm(next_config):
    # the tiny tower has 3 blocks and vision_feature_layer -2: vLLM builds blocks 0 and 1 only
    with pytest.raises(ValueError, match="vLLM builds the tower only up to vision_feature_layer=-2"):
        tokendrop.vllm.overrides(td.HiRED(0.2, final_layer=2)).for_config(next_config)
    with pytest.raises(ValueError, match="init_layer must be in"):
        tokendrop.vllm.overrides(td.HiRED(0.2, init_layer=7)).for_config(next_config)


def test_settings_round_trip_through_the_config(next_config):
    method = td.HiRED(0.3, variant="official", alpha=0.25, keep_newlines=True)
    served = tokendrop.vllm.overrides(method)(next_config.__class__.from_dict(next_config.to_dict()))
    assert served.architectures == ["TokendropLlavaNextForConditionalGeneration"]
    assert tokendrop.vllm.method_of(served) == method


def test_serve_errors_are_one_line_usage_errors(capsys, tmp_path):
    assert main(["serve", "--method", "pdrop", "--print-command"]) == 2
    assert "--method: PyramidDrop drops tokens inside the LLM" in capsys.readouterr().err
    assert main(["serve", "--method", "hired", "--budget", "0", "--print-command"]) == 2
    assert "--budget must be in (0, 1]" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--method", "hired", "--print-command"]) == 2
    assert "tokendrop serve: error: --model" in capsys.readouterr().err


def test_serve_passes_vllm_options_through(capsys):
    assert main(["serve", "--method", "spatial", "--budget", "0.4", "--port", "8123", "--print-command"]) == 0
    command = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server" in command and command.rstrip().endswith("--port 8123")
    assert '\\"name\\": \\"spatial\\", \\"budget\\": 0.4' in command


@pytest.fixture(scope="module")
def qwen_config():
    from tokendrop.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(text_layers=1)[0].config


def test_qwen2_5_vl_serves_pre_llm_methods(qwen_config):
    for method in (td.RandomDrop(0.3, seed=1), td.SpatialDrop(0.4), td.DominantDrop(0.3), td.DominantDrop(0.3, layer=1)):
        served = tokendrop.vllm.overrides(method)(qwen_config.__class__.from_dict(qwen_config.to_dict()))
        assert served.architectures == ["TokendropQwen2_5_VLForConditionalGeneration"]
        assert tokendrop.vllm.method_of(served) == method


def test_qwen2_5_vl_refuses_what_it_cannot_serve(qwen_config):
    # the tiny tower: window attention in blocks 0 and 2, full attention in 1 and 3
    with pytest.raises(ValueError, match=r"layer 2 of Qwen2.5-VL's vision tower uses window attention.*\[1, 3\]"):
        tokendrop.vllm.overrides(td.DominantDrop(0.3, layer=2)).for_config(qwen_config)
    with pytest.raises(ValueError, match=r"layer must be in \[-4, 4\)"):
        tokendrop.vllm.overrides(td.DominantDrop(0.3, layer=9)).for_config(qwen_config)
    with pytest.raises(ValueError, match="BaseOnly needs .*capability 'base_image'"):
        tokendrop.vllm.overrides(td.BaseOnly()).for_config(qwen_config)
    with pytest.raises(ValueError, match="HiRED needs .*capability 'cls_token'"):
        tokendrop.vllm.overrides(td.HiRED(0.2)).for_config(qwen_config)


@pytest.mark.parametrize("builder, architecture", [("tiny_qwen2_vl", "TokendropQwen2VLForConditionalGeneration"),
                                                   ("tiny_qwen3_vl", "TokendropQwen3VLForConditionalGeneration")])
def test_qwen2_and_qwen3_vl_serve_the_methods_that_need_no_cls(builder, architecture):
    import tokendrop.tiny

    config = getattr(tokendrop.tiny, builder)(text_layers=1)[0].config
    for method in (td.RandomDrop(0.3), td.SpatialDrop(0.4), td.DominantDrop(0.3, layer=1), td.HiPrune(0.3)):
        served = tokendrop.vllm.overrides(method)(config.__class__.from_dict(config.to_dict()))
        assert served.architectures == [architecture]
        assert tokendrop.vllm.method_of(served) == method
    for method in (td.HiRED(0.2), td.FasterVLM(0.2)):
        with pytest.raises(ValueError, match=f"{type(method).__name__} needs .*capability 'cls_token'"):
            tokendrop.vllm.overrides(method).for_config(config)


def test_serve_lets_clients_send_the_method_options(capsys):
    assert main(["serve", "--method", "hired", "--budget", "0.2", "--print-command"]) == 0
    assert "--trust-request-mm-kwargs" in capsys.readouterr().out.split()
    assert main(["serve", "--method", "none", "--print-command"]) == 0  # stock: nothing to ask per request
    assert "--trust-request-mm-kwargs" not in capsys.readouterr().out.split()


def test_a_request_takes_the_served_method_options_by_name(next_config):
    from tokendrop.vllm.requests import request_method

    served = td.HiRED(0.2)
    assert request_method(served, {}, next_config) is served
    assert request_method(served, {"budget": 0.4, "alpha": 0.2}, next_config) == td.HiRED(0.4, alpha=0.2)
    assert request_method(served, {"budget": 1}, next_config) == td.HiRED(1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, r"mm_processor_kwargs: budget must be in \(0, 1\], got 0.0"),
    ({"budget": 2}, r"mm_processor_kwargs: budget must be in \(0, 1\], got 2.0"),
    ({"budget": "abc"}, r"mm_processor_kwargs: budget must be a number, got str"),
    ({"alpha": 1.5}, r"mm_processor_kwargs: alpha must be in \[0, 1\]"),
    ({"do_resize": False}, r"'do_resize' is not an option of the served method HiRED; allowed per request: budget, "),
    ({"init_layer": 1}, r"init_layer cannot change per request: .*\(init_layer=0\)"),
])
def test_a_bad_request_option_is_named_with_what_is_allowed(next_config, kwargs, message):
    from tokendrop.vllm.requests import request_method

    with pytest.raises(ValueError, match=message):
        request_method(td.HiRED(0.2), kwargs, next_config)


def test_the_per_image_field_round_trips():
    from tokendrop.vllm.requests import decode, encode, largest

    method = td.HiRED(0.3, variant="official", alpha=0.25)
    assert decode(encode(method, 2)) == [method, method]
    assert largest(td.SpatialDrop(0.1)) == td.SpatialDrop(1.0, keep_newlines=True)
