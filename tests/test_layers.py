import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from internvl_jax.models import attention, layers, vit


def test_rms_and_layer_norm_match_numpy(rng):
  x = rng.normal(size=(3, 5, 8)).astype(np.float32)
  rms = layers.RMSNorm(8, eps=1e-6)
  rms.scale[...] = jnp.arange(1, 9, dtype=jnp.float32)
  ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.arange(1, 9)
  np.testing.assert_allclose(rms(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)
  ln = layers.LayerNorm(8, eps=1e-5)
  ln.bias[...] = jnp.full((8,), 0.5)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) + 0.5
  np.testing.assert_allclose(ln(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)


def test_norms_compute_in_float32_and_return_compute_dtype(rng):
  x = jnp.asarray(rng.normal(size=(2, 16)) * 300, jnp.bfloat16)
  out = layers.RMSNorm(16, dtype=jnp.bfloat16)(x)
  assert out.dtype == jnp.bfloat16
  ref = layers.RMSNorm(16)(x.astype(jnp.float32))
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)


def test_gelu_is_exact_erf():
  x = torch.linspace(-4, 4, 101)
  np.testing.assert_allclose(layers.gelu_exact(jnp.asarray(x.numpy())), torch.nn.functional.gelu(x).numpy(),
                             atol=1e-6)


def test_rope_matches_half_split_rotation(rng):
  x = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
  pos = np.arange(4)[None]
  cos, sin = layers.rope_cos_sin(jnp.asarray(pos), 8, 10000.0)
  out = np.asarray(layers.apply_rope(jnp.asarray(x), cos, sin))
  inv = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
  ang = pos[0][:, None] * inv  # [T, 4]
  x1, x2 = x[..., :4], x[..., 4:]
  c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # relative property: <rope(q, m), rope(k, n)> depends on m - n only
  q, k = x[:, :1], x[:, 1:2]
  def dot(m, n):
    cq, sq = layers.rope_cos_sin(jnp.array([[m]]), 8, 10000.0)
    ck, sk = layers.rope_cos_sin(jnp.array([[n]]), 8, 10000.0)
    return float(jnp.sum(layers.apply_rope(q, cq, sq) * layers.apply_rope(k, ck, sk)))
  assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-4)


def test_drop_path_is_identity_without_key_and_per_sample_with_key():
  x = jnp.ones((64, 3, 4))
  assert jnp.array_equal(layers.drop_path(x, 0.5, None), x)
  y = layers.drop_path(x, 0.5, jax.random.key(0))
  per_sample = y.reshape(64, -1)
  assert jnp.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # whole sample dropped or scaled
  assert 10 < int((per_sample[:, 0] == 0).sum()) < 54


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((4, 4), (3, 5)), ((5, 3), (8, 11)), ((32, 32), (16, 16))])
def test_bicubic_position_resize_matches_torch(rng, src, dst):
  grid = rng.normal(size=(src[0], src[1], 6)).astype(np.float32)
  pos = np.concatenate([rng.normal(size=(1, 1, 6)).astype(np.float32), grid.reshape(1, -1, 6)], axis=1)
  out = np.asarray(vit.resize_position_embedding(jnp.asarray(pos), src, dst))
  ref = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                                        align_corners=False)[0].permute(1, 2, 0).reshape(1, -1, 6).numpy()
  np.testing.assert_array_equal(out[:, :1], pos[:, :1])  # CLS position untouched
  np.testing.assert_allclose(out[:, 1:], ref, atol=1e-5, rtol=0)


def test_position_resize_is_identity_at_native_size(rng):
  pos = jnp.asarray(rng.normal(size=(1, 17, 4)), jnp.float32)
  assert jnp.array_equal(vit.resize_position_embedding(pos, (4, 4), (4, 4)), pos)
  np.testing.assert_allclose(vit.bicubic_matrix(4, 4), np.eye(4), atol=0)


def test_masks():
  np.testing.assert_array_equal(attention.causal_mask(2, 4, offset=1), [[1, 1, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(attention.prefix_causal_mask(4, 2),
                                [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
  m = attention.combine_masks(attention.padding_mask(None, jnp.array([[0, 1, 1]])), attention.causal_mask(3, 3))
  assert m.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(m[0, 0], [[0, 0, 0], [0, 1, 0], [0, 1, 1]])


def test_attention_matches_naive_softmax_with_gqa_and_mask(rng):
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  mask = rng.random((2, 1, 3, 5)) > 0.3
  mask[..., 0] = True
  out = attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask))
  kk, vv = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(8)
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", p, vv), atol=1e-5)


def test_attention_impl_choice_and_errors():
  q = jnp.zeros((1, 2, 2, 8), jnp.bfloat16)
  assert attention.choose_impl("auto", q, q, None) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  assert attention.choose_impl("auto", q, q, jnp.ones((2, 2), bool)) == "xla"
  with pytest.raises(ValueError, match="not one of"):
    attention.choose_impl("flash", q, q, None)
