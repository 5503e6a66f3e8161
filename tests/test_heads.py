import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax.models import heads


def test_pixel_shuffle_v2_follows_the_published_formula():
  h = w = 4
  x = np.arange(h * w * 3, dtype=np.float32).reshape(1, h * w, 3)  # token (r, c) at index r*w + c
  out = np.asarray(heads.pixel_shuffle(jnp.asarray(x), (h, w), 0.5, "v2"))
  grid = x.reshape(h, w, 3)
  assert out.shape == (1, 4, 12)
  for i in range(2):
    for j in range(2):
      expected = np.concatenate([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j],
                                 grid[2 * i + 1, 2 * j + 1]])
      np.testing.assert_array_equal(out[0, i * 2 + j], expected)


def test_pixel_shuffle_v1_is_the_transposed_grid():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6 * 4, 5)), jnp.float32)
  v2 = heads.pixel_shuffle(x, (6, 4), 0.5, "v2").reshape(2, 3, 2, 20)
  v1 = heads.pixel_shuffle(x, (6, 4), 0.5, "v1").reshape(2, 2, 3, 20)
  np.testing.assert_array_equal(v1, v2.transpose(0, 2, 1, 3))
  with pytest.raises(ValueError):
    heads.pixel_shuffle(x, (5, 5), 0.5)
  with pytest.raises(ValueError, match="ps_version"):
    heads.pixel_shuffle(x, (6, 4), 0.5, "v3")


def test_chat_projector_is_layernorm_linear_gelu_linear(rng):
  proj = heads.ChatProjector(8, 6, rngs=nnx.Rngs(0))
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  n = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  h = n @ np.asarray(proj.linear_1.kernel[...]) + np.asarray(proj.linear_1.bias[...])
  h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False))
  ref = h @ np.asarray(proj.linear_2.kernel[...]) + np.asarray(proj.linear_2.bias[...])
  np.testing.assert_allclose(proj(jnp.asarray(x)), ref, atol=1e-5)


def test_projection_mlp_depths():
  for n in (1, 2, 3):
    mlp = heads.ProjectionMLP(8, 5, num_layers=n, hidden_dim=7, rngs=nnx.Rngs(0))
    assert len(mlp.linears) == n and mlp(jnp.ones((2, 8))).shape == (2, 5)
  single = heads.ProjectionMLP(8, 5, num_layers=1, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(single(jnp.ones((1, 8))), jnp.ones((1, 8)) @ single.linears[0].kernel[...]
                             + single.linears[0].bias[...], atol=1e-6)
  with pytest.raises(ValueError):
    heads.ProjectionMLP(8, 5, num_layers=0, rngs=nnx.Rngs(0))


def test_attention_pooling_matches_numpy(rng):
  pool = heads.AttentionPooling(8, 2, 3, rngs=nnx.Rngs(0))
  pool.q.bias[...] = jnp.linspace(-1, 1, 8)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(pool)))
  ln = lambda t, n: ((t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5) * n["scale"]
                     + n["bias"])
  lin = lambda t, n: t @ n["kernel"] + n["bias"]
  query = x.mean(1, keepdims=True)
  q = lin(ln(query, p["norm_q"]), p["q"]).reshape(2, 1, 2, 4)
  k = lin(ln(x, p["norm_k"]), p["k"]).reshape(2, 5, 2, 4)
  v = lin(ln(x, p["norm_v"]), p["v"]).reshape(2, 5, 2, 4)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  ref = lin(np.einsum("bhqk,bkhd->bqhd", a, v).reshape(2, 8), p["proj"])
  np.testing.assert_allclose(pool(jnp.asarray(x)), ref, atol=1e-5)
