"""Configuration of an internvl_jax seed contrastive model exported for PyTorch (written by
`python -m internvl_jax.convert export`; loaded with trust_remote_code=True)."""

from transformers import PretrainedConfig
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig


class InternVLSeedConfig(PretrainedConfig):
  """vision_config: transformers InternVLVisionConfig fields; text_config: the text tower (LLaMA-style names:
  vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
  rms_norm_eps, rope_theta, attention_bias (q/k/v), qk_norm, causal); embed_dim, num_proj_layers, text_pooling
  ('mean' | 'first' | 'last'); logit_bias: the model has a learnable logit bias (trained with the sigmoid loss)."""

  model_type = "internvl_seed"

  def __init__(self, vision_config=None, text_config=None, embed_dim=512, num_proj_layers=2, text_pooling="mean",
               logit_bias=False, **kwargs):
    vision_config = vision_config or {}
    self.vision_config = (vision_config if isinstance(vision_config, InternVLVisionConfig)
                          else InternVLVisionConfig(**vision_config))
    self.text_config = dict(text_config or {})
    self.embed_dim = embed_dim
    self.num_proj_layers = num_proj_layers
    self.text_pooling = text_pooling
    self.logit_bias = logit_bias
    super().__init__(**kwargs)

  def to_dict(self):
    out = super().to_dict()
    out["vision_config"] = self.vision_config.to_dict()
    return out
