"""The supported transformers range: keywords checked against the installed release, version gate, hidden states."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers

from tokendrop import compat
from tokendrop.engine.decoder import LLMDropper

RELEASE = compat._release(transformers.__version__)


def language_model_classes():
    """Every decoder class the in-LLM loop replaces, with the keywords its family's decoder hook takes:
    each registered family that runs in-LLM methods (from its tiny model), and the Llama-family
    decoders LLaVA checkpoints ship with."""
    from transformers import LlamaModel, MistralModel, Qwen2Model

    from tokendrop.families.base import resolve
    from tokendrop.registry import families, family_for

    classes = {LlamaModel: (), MistralModel: (), Qwen2Model: ()}
    for family in families():
        if "in_llm" in family.family_capabilities():
            try:
                adapter = family_for(resolve(family.tiny)()[0])
            except ImportError:  # a family this transformers cannot build (Gemma 4 below 5.21 without torchvision)
                continue
            classes[type(adapter.language_model)] = resolve(family.decoder).keywords
    return list(classes.items())


@pytest.mark.parametrize("cls, keywords", language_model_classes(), ids=lambda c: getattr(c, "__name__", ""))
def test_replacement_forward_accepts_every_keyword_of_the_stock_forward(cls, keywords):
    stock = inspect.signature(cls.forward).parameters
    ours = {*inspect.signature(LLMDropper.forward).parameters, *keywords}  # the hook takes its own keywords
    named = [n for n, p in stock.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert set(named) <= ours, f"{cls.__name__}.forward takes {set(named) - ours} that LLMDropper.forward does not"
    compat.check_signature(cls.forward, LLMDropper.forward, known=keywords)


@pytest.mark.parametrize("cls", [cls for cls, _ in language_model_classes()], ids=lambda c: c.__name__)
def test_cache_keyword_is_the_installed_releases(cls):
    import sys

    expected = "cache" if RELEASE >= (5, 24) else "past_key_values"  # renamed in 5.24
    layer_class = next(obj for name, obj in vars(sys.modules[cls.__module__]).items()
                       if name.endswith("DecoderLayer") and isinstance(obj, type))
    assert compat.cache_keyword(layer_class.forward) == expected
    assert compat.cache_keyword(cls.forward) == expected
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    assert compat.cache_keyword(create_causal_mask) == expected
    assert compat.cache_keyword(create_sliding_window_causal_mask) == expected


def test_a_new_stock_keyword_fails_apply_with_a_clear_message():
    def forward(self, input_ids=None, cache=None, brand_new_option=None, **kwargs):
        pass

    with pytest.raises(TypeError, match=r"takes \['brand_new_option'\].*not supported \(tested: 5.19.0"):
        compat.check_signature(forward, LLMDropper.forward)


def test_cache_argument_takes_either_name_not_both():
    assert compat.cache_argument(cache="c") == "c"
    assert compat.cache_argument(past_key_values="p") == "p"
    with pytest.raises(ValueError, match="not both"):
        compat.cache_argument("c", "p")


def test_model_output_and_output_cache_round_trip():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation path taken
        out = compat.model_output(BaseModelOutputWithPast, "the cache", last_hidden_state=torch.zeros(1))
        assert compat.output_cache(out) == "the cache"


@pytest.mark.parametrize("version, outcome", [
    ("4.57.1", ImportError), ("5.18.0", "warn"), ("5.19.0", None), ("5.22.2", None), ("5.24.1", None),
    ("5.25.0", None), ("5.25.3", None), ("5.26.0", "warn"), ("6.0.0.dev0", "warn"),
])
def test_version_gate(version, outcome):
    if outcome is ImportError:
        with pytest.raises(ImportError, match=r"tested: 5.19.0 to 5.25.x.*found transformers 4.57.1"):
            compat.check_version(version)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.check_version(version)
    untested = [w for w in caught if issubclass(w.category, compat.UntestedTransformersWarning)]
    assert len(untested) == (1 if outcome == "warn" else 0)
    if untested:
        assert version in str(untested[0].message) and "5.19.0 to 5.25.x" in str(untested[0].message)


def test_the_declared_requirement_is_compats_range():
    """The range `pip install` allows (the package metadata, from pyproject.toml) is the one compat tests."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    declared = next(Requirement(r) for r in requires("tokendrop") if Requirement(r).name == "transformers")
    assert declared.specifier == Requirement(compat.REQUIREMENT).specifier
    floor, cap = f"{compat.FLOOR[0]}.{compat.FLOOR[1]}.0", f"{compat.CAP[0]}.{compat.CAP[1]}.0"
    assert floor in declared.specifier and cap not in declared.specifier
    assert f"{compat.CAP[0]}.{compat.CAP[1] - 1}.9" in declared.specifier


def test_installed_release_is_in_the_tested_range():
    assert compat.FLOOR <= RELEASE < compat.CAP, f"CI runs a release outside the declared range: {transformers.__version__}"


def test_recorded_hidden_states_equal_output_hidden_states():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=2)
    torch.manual_seed(0)
    tower = CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 56, 56)
    hooks = lambda: [len(b._forward_pre_hooks) + len(b._forward_hooks) for b in tower.encoder.layers]  # noqa: E731
    with torch.no_grad():
        full = tower(pixels, output_hidden_states=True).hidden_states  # depth + 1 states
        before = hooks()  # transformers' own output-capturing hooks stay
        with compat.record_hidden_states(tower.encoder.layers, [0, 2, 3]) as recorded:
            tower(pixels)
    assert sorted(recorded) == [0, 2, 3]
    for i in (0, 2, 3):
        torch.testing.assert_close(recorded[i], full[i], atol=0, rtol=0)
    assert hooks() == before, "every hook tokendrop added is removed"
    with pytest.raises(ValueError, match=r"hidden-state index must be in \[0, 3\], got 4"):
        with compat.record_hidden_states(tower.encoder.layers, [4]):
            pass


@pytest.mark.parametrize("shared", [0, 1, 2, 4])
def test_gemma4_kv_sharing_modes_are_what_the_installed_attention_decides(shared):
    """Both handlers (the config field, and the rule 5.19 applies in the attention's __init__) give what
    the installed release's layers do: the field when the config has it, the rule on a config without it."""
    from types import SimpleNamespace

    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention

    kinds = ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention",
             "full_attention"]
    config = Gemma4TextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=8,
                              layer_types=kinds, num_kv_shared_layers=shared, hidden_size_per_layer_input=0)
    attention = [Gemma4TextAttention(config, i) for i in range(6)]
    expected = ["reuse" if a.is_kv_shared_layer else "store" if a.store_full_length_kv else "" for a in attention]
    assert compat.kv_sharing_modes(config) == expected
    no_field = SimpleNamespace(layer_types=kinds, num_kv_shared_layers=shared)  # a config as 5.19 has it
    assert compat.kv_sharing_modes(no_field) == expected
