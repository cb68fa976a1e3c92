"""Attention rows from projections equal the rows of eager attention maps."""

from __future__ import annotations

import torch

from tokendrop.scoring import cls_attention_row, query_attention_row, query_attention_rows


def test_cls_row_equals_eager_output_attentions():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, attn_implementation="eager")
    torch.manual_seed(0)
    tower = CLIPVisionModel(config).eval()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
        for i, layer in enumerate(tower.encoder.layers):
            row = cls_attention_row(layer, out.hidden_states[i])  # (B, H, N)
            torch.testing.assert_close(row, out.attentions[i][:, :, 0].float(), atol=1e-6, rtol=1e-5)


def test_last_token_row_equals_eager_attention_with_gqa_and_padding():
    from transformers import LlamaConfig, LlamaModel

    from tokendrop.engine.decoders import causal_mask

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    lm = LlamaModel(config).eval()
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    hidden = torch.randn(2, 10, 64)
    layer = lm.layers[1]
    captured = {}
    layer.self_attn.register_forward_hook(lambda m, a, out: captured.update(weights=out[1]))
    with torch.no_grad():
        rope = lm.rotary_emb(hidden, positions)
        causal = causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=positions)
        layer(hidden, attention_mask=causal, position_embeddings=rope, position_ids=positions)
        last = torch.zeros(2, 10, dtype=torch.bool)
        last[:, -1] = True
        row = query_attention_row(layer, hidden, rope, last, key_mask=mask)
        # several queries (training: the token before each answer span): rows averaged
        several = torch.zeros(2, 10, dtype=torch.bool)
        several[0, [4, 9]] = True
        several[1, [6, 7, 9]] = True
        rows = query_attention_row(layer, hidden, rope, several, key_mask=mask)
        per_head = query_attention_rows(layer, hidden, rope, torch.tensor([[4, 9], [6, 9]]), key_mask=mask)
    torch.testing.assert_close(per_head[0], captured["weights"][0][:, [4, 9]], atol=1e-6, rtol=1e-5)  # (H, Q, L)
    torch.testing.assert_close(per_head[1], captured["weights"][1][:, [6, 9]], atol=1e-6, rtol=1e-5)
    weights = captured["weights"].mean(dim=1)  # (B, L, L) mean over heads
    torch.testing.assert_close(row, weights[:, -1], atol=1e-6, rtol=1e-5)
    assert row[1, :3].abs().max() == 0  # padding gets nothing
    torch.testing.assert_close(rows[0], weights[0, [4, 9]].mean(dim=0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows[1], weights[1, [6, 7, 9]].mean(dim=0), atol=1e-6, rtol=1e-5)
