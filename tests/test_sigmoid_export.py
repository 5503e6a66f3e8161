"""A model trained with the sigmoid loss exports with its logit bias: the seed layout's PyTorch code adds it to the
logits; an InternVL-C model (whose InternVL-14B layout has no bias) falls back to the internvl_jax layout. Both
load back with the bias."""

import json
import os

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from internvl_jax import convert
from internvl_jax.models import internvl, presets


def _params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _sigmoid_model(name):
  cfg = presets.contrastive(name)
  cfg.logit_scale_init, cfg.logit_bias_init = 1.7, -3.25
  return internvl.InternVLContrastive(cfg, rngs=nnx.Rngs(1))


def test_seed_export_keeps_the_bias_in_torch_and_back(tmp_path):
  from transformers import AutoModel
  model = _sigmoid_model("tiny")
  out = str(tmp_path / "seed")
  convert.save_pretrained(model, out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["logit_bias"] is True
  back = convert.load_pretrained(out)
  assert float(back.logit_bias[...]) == -3.25
  a, b = _params(back), _params(model)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  torch_model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
  ids = rng.integers(1, 128, (3, 5))
  mask = np.ones_like(ids)
  img, txt, scale = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    _, _, logits = torch_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                               input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  want = np.exp(1.7) * np.asarray(img) @ np.asarray(txt).T - 3.25  # t x image.text + b
  np.testing.assert_allclose(logits.numpy(), want, rtol=1e-4, atol=1e-4)


def test_internvl_c_with_a_bias_falls_back_to_our_layout(tmp_path):
  model = _sigmoid_model("tiny_internvl_c")
  out = str(tmp_path / "c")
  convert.save_pretrained(model, out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == "internvl_jax"
  back = convert.load_pretrained(out)
  assert float(back.logit_bias[...]) == -3.25
  a, b = _params(back), _params(model)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
