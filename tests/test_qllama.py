import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax.models import presets, qllama, stack


def _model(**kw):
  cfg = presets.qllama("tiny", vision_width=24, num_query_tokens=3, cross_attention_frequency=2, num_layers=4)
  cfg.update(kw)
  return qllama.QLLaMA(cfg, rngs=nnx.Rngs(0))


VISION = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 24)), jnp.float32)
TEXT = jnp.array([[3, 4, 5, 0], [6, 7, 8, 9]])
MASK = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])


def _reference(model, vision, ids, mask):
  """Layer by layer, without scan or grouping: cross-attention after self-attention in layers 0, 2, ..."""
  cfg = model.config
  nq = cfg.num_query_tokens
  b = vision.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(model.query_tokens[...], (b, nq, 32)), model.decoder.embed(ids)], 1)
  valid = jnp.concatenate([jnp.ones((b, nq), bool), mask.astype(bool)], 1)
  t = x.shape[1]
  allowed = (jnp.arange(t)[None] <= jnp.arange(t)[:, None]) | (jnp.arange(t)[None] < nq)
  full_mask = allowed[None, None] & valid[:, None, None, :]
  from internvl_jax.models import layers, llm
  cos, sin = layers.rope_cos_sin(llm.default_positions(valid), 8, cfg.rope_theta)
  for i in range(cfg.num_layers):
    layer = stack.layer_at(model.decoder.layers, i)
    x, _ = layer.self_attention(x, cos, sin, full_mask)
    if i % cfg.cross_attention_frequency == 0:
      cross = stack.layer_at(model.cross_attention, i // cfg.cross_attention_frequency)
      x = x.at[:, :nq].set(cross(x[:, :nq], vision))
    x = layer.feed_forward(x)
  return model.decoder.norm(x)


@pytest.mark.parametrize("scan", [True, False])
def test_query_path_matches_a_layer_by_layer_reference(scan):
  model = _model(scan_layers=scan)
  out = model(VISION, TEXT, MASK).last_hidden_state
  ref = _reference(model, VISION, TEXT, MASK)
  assert out.shape == (2, 3 + 4, 32)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_queries_are_bidirectional_and_text_is_causal_after_them():
  model = _model()
  base = model(VISION, TEXT, MASK).last_hidden_state
  # Changing the last text token changes neither the queries nor earlier text.
  changed = model(VISION, TEXT.at[1, 3].set(99), MASK).last_hidden_state
  np.testing.assert_allclose(changed[1, :6], base[1, :6], atol=1e-6)
  # Query 0 sees query 2 (bidirectional among queries).
  model.query_tokens[...] = model.query_tokens[...].at[0, 2].add(1.0)
  moved = model(VISION, TEXT, MASK).last_hidden_state
  assert float(jnp.abs(moved[:, 0] - base[:, 0]).max()) > 1e-4


def test_vision_reaches_text_only_through_the_queries():
  model = _model()
  other = VISION * 2 + 1
  a, b = model(VISION).last_hidden_state, model(other).last_hidden_state
  assert a.shape == (2, 3, 32) and float(jnp.abs(a - b).max()) > 1e-4
  # The text path has no cross-attention at all.
  np.testing.assert_allclose(model.encode_text(TEXT, MASK),
                             model.decoder(TEXT, attention_mask=MASK).last_hidden_state, atol=1e-6)


def test_cross_attention_count_and_shapes():
  model = _model()
  assert model.cross_attention.k.kernel.shape == (2, 24, 32)  # layers 0 and 2 of 4
  assert model.query_tokens.shape == (1, 3, 32)
  with pytest.raises(ValueError, match="cross_attention_frequency"):
    _model(num_layers=3)


def test_logits_of_the_query_path():
  model = _model()
  out = model(VISION, TEXT, MASK, return_logits=True)
  assert out.logits.shape == (2, 7, 128)
