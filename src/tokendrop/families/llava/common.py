"""What the LLaVA families share: a vision tower, a projector and a Llama-style language model.

LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision keep their parts at `model.model.vision_tower`,
`.multi_modal_projector` and `.language_model`, and their processors count placeholders from
`patch_size` and `vision_feature_select_strategy`.
"""

from __future__ import annotations

from tokendrop.families.base import Family, Shapes
from tokendrop.methods.base import PreLLMMethod


class LlavaStyle(Family):
    """Base of the LLaVA family adapters."""

    decoder = "tokendrop.engine.decoders:LlamaDecoder"  # Llama / Mistral / Qwen2 language models
    features = True
    # transformers 5 writes the CLIP / SigLIP tower without its `vision_model.` level; the hub's checkpoints have it
    hub_layout = ((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)

    @property
    def tower(self):
        return self.base.vision_tower

    @classmethod
    def config_capabilities(cls, config) -> set[str]:
        caps = super().config_capabilities(config)
        if config.vision_feature_select_strategy != "default" or config.vision_config.model_type != "clip_vision_model":
            caps.discard("cls_token")  # no [CLS] in front of the patches
        if config.vision_config.model_type != "clip_vision_model":
            caps.discard("instruction")  # a CLIP head (post_layernorm, visual_projection) needs a CLIP tower
        return caps

    @classmethod
    def config_score_blocks(cls, config, method: PreLLMMethod) -> dict[str, tuple[str, int]]:
        """name -> (score kind, 0-based encoder block) of every score `method` reads."""
        from tokendrop.families.llava.vision import config_score_blocks

        return config_score_blocks(config, method)

    def check(self, method) -> None:
        """`Family.check` (which runs `config_check`: capabilities, score blocks), plus what only the
        loaded tower tells: that its encoder is CLIP-style, as the score hooks expect."""
        super().check(method)
        if method.stage == "pre" and method.scores() and not hasattr(self.tower.encoder.layers[0], "layer_norm1"):
            raise TypeError(f"vision tower must be a CLIP-style encoder, got {type(self.tower).__name__}")

    def processor_expects(self) -> dict:
        return {"patch_size": self.config.vision_config.patch_size,
                "vision_feature_select_strategy": self.config.vision_feature_select_strategy}

    def shapes(self) -> Shapes:
        import torch

        lm, tower = self.language_model, self.tower
        attn, mlp = lm.layers[0].self_attn, lm.layers[0].mlp
        vlayer = tower.encoder.layers[0]
        conv = tower.embeddings.patch_embedding.weight  # (vd, 3, p, p)
        linears = [mod.weight.shape for mod in self.base.multi_modal_projector.modules() if isinstance(mod, torch.nn.Linear)]
        return Shapes(d=attn.q_proj.weight.shape[1], m=mlp.gate_proj.weight.shape[0], depth=len(lm.layers),
                      q_width=attn.q_proj.weight.shape[0], kv_width=attn.k_proj.weight.shape[0],
                      vocab=self.model.lm_head.weight.shape[0], vd=vlayer.self_attn.q_proj.weight.shape[0],
                      vm=vlayer.mlp.fc1.weight.shape[0], vision_depth=len(tower.encoder.layers),
                      patch_inputs=conv.shape[1] * conv.shape[2] * conv.shape[3],
                      projector=tuple(x for shape in linears for x in (shape[1], shape[0])),
                      vision_tokens_extra=int(self.cls_token))
