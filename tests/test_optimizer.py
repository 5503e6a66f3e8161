"""Weight-decay mask contents and the learning-rate schedule."""

import jax
from flax import nnx

from internvl_jax.models import internvl, presets
from internvl_jax.train import optimizer


def _paths(tree, value):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in p) for p, v in flat if v == value}


def test_weight_decay_only_on_kernels():
  cfg = presets.contrastive("tiny_internvl_g")
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: internvl.InternVLContrastive(cfg, rngs=nnx.Rngs(0))),
                                      nnx.Param))
  mask = optimizer.weight_decay_mask(params)
  decayed, kept = _paths(mask, True), _paths(mask, False)
  assert decayed and all(p.endswith("kernel") for p in decayed)
  for name in ("logit_scale", "vision/embeddings/position", "vision/embeddings/cls_token",
               "vision/embeddings/patch/bias", "vision/blocks/norm1/scale", "vision/blocks/norm1/bias",
               "vision/blocks/ls1", "text/decoder/embed/embedding", "text/query_tokens",
               "vision/blocks/attn/q_norm/scale", "text/decoder/norm/scale"):
    assert name in kept, name
  for name in ("vision/blocks/attn/qkv/kernel", "vision/embeddings/patch/kernel", "text/decoder/lm_head/kernel",
               "text_projection/kernel"):
    assert name in decayed, name


def test_schedule_warmup_then_cosine(make_config):
  cfg = make_config(total_steps=100, warmup_steps=10, lr=1.0)
  s = optimizer.learning_rate_schedule(cfg)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and float(s(100)) < 1e-6
  assert float(s(5)) < float(s(10)) and float(s(60)) < float(s(20))
