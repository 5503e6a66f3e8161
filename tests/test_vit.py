import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import param_count
from internvl_jax.models import presets, stack, vit


def _tiny(**kw):
  cfg = presets.vision("tiny")
  cfg.update(kw)
  return cfg


def _torch_reference(model: vit.InternViT, pixels: np.ndarray) -> np.ndarray:
  """A direct PyTorch transcription of DESIGN §4 (fused qkv, full-width QK RMSNorm, erf GELU, layer scale)."""
  cfg = model.config
  st = jax.tree.map(lambda a: torch.from_numpy(np.asarray(a)), nnx.to_pure_dict(nnx.state(model)))
  x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
  w = st["embeddings"]["patch"]["kernel"].permute(3, 2, 0, 1)
  x = torch.nn.functional.conv2d(x, w, st["embeddings"]["patch"]["bias"], stride=cfg.patch_size)
  x = x.flatten(2).transpose(1, 2)
  b, d = x.shape[0], x.shape[-1]
  x = torch.cat([st["embeddings"]["cls_token"].expand(b, 1, d), x], 1) + st["embeddings"]["position"]

  def norm(t, p):
    if cfg.norm_type == "rms_norm":
      return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * p["scale"]
    return torch.nn.functional.layer_norm(t, (d,), p["scale"], p["bias"], cfg.norm_eps)

  blocks = st["blocks"]
  for i in range(cfg.num_layers):
    p = jax.tree.map(lambda a: a[i], blocks)
    h = norm(x, p["norm1"])
    qkv = h @ p["attn"]["qkv"]["kernel"] + (p["attn"]["qkv"]["bias"] if cfg.qkv_bias else 0)
    q, k, v = qkv.chunk(3, -1)
    if cfg.qk_norm:
      rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * s
      q, k = rms(q, p["attn"]["q_norm"]["scale"]), rms(k, p["attn"]["k_norm"]["scale"])
    heads = lambda t: t.reshape(b, -1, cfg.num_heads, d // cfg.num_heads).transpose(1, 2)
    a = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    a = a.transpose(1, 2).reshape(b, -1, d) @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"]
    x = x + p["ls1"] * a
    h = norm(x, p["norm2"])
    h = torch.nn.functional.gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
    x = x + p["ls2"] * (h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"])
  return x.numpy()


@pytest.mark.parametrize("kind", ["rms_qknorm_6b_style", "layernorm_300m_style"])
def test_matches_a_pytorch_transcription(rng, kind):
  kw = (dict(norm_type="rms_norm", qk_norm=True, qkv_bias=False) if kind.startswith("rms")
        else dict(norm_type="layer_norm", qk_norm=False, qkv_bias=True))
  model = vit.InternViT(_tiny(**kw), rngs=nnx.Rngs(0))
  pixels = rng.normal(size=(2, 56, 56, 3)).astype(np.float32)
  out = model(jnp.asarray(pixels))
  ref = _torch_reference(model, pixels)
  err = float(np.abs(np.asarray(out.last_hidden_state) - ref).max())
  assert err < 1e-5, err
  np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[:, 0])


def test_shapes_dtypes_and_bfloat16_close_to_float32(rng):
  pixels = jnp.asarray(rng.normal(size=(2, 56, 56, 3)), jnp.float32)
  f32 = vit.InternViT(_tiny(), rngs=nnx.Rngs(0))
  bf16 = vit.InternViT(_tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
  a, b = f32(pixels, output_hidden_states=True), bf16(pixels)
  assert a.last_hidden_state.shape == (2, 1 + 16, 32) and a.last_hidden_state.dtype == jnp.float32
  assert b.last_hidden_state.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  assert len(a.hidden_states) == 3 and jnp.array_equal(a.hidden_states[-1], a.last_hidden_state)
  rel = jnp.linalg.norm(b.last_hidden_state.astype(jnp.float32) - a.last_hidden_state) / jnp.linalg.norm(
      a.last_hidden_state)
  assert rel < 2e-2, rel


def test_other_resolutions_and_bad_sizes():
  model = vit.InternViT(_tiny(), rngs=nnx.Rngs(0))
  assert model(jnp.zeros((1, 84, 42, 3))).last_hidden_state.shape == (1, 1 + 6 * 3, 32)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    model(jnp.zeros((1, 50, 56, 3)))


def test_qk_norm_is_over_the_full_width(rng):
  cfg = _tiny(qk_norm=True, qkv_bias=False)
  attn = vit.VisionAttention(cfg, rngs=nnx.Rngs(0))
  # A per-head norm would be invisible to a per-head rescale of q; a full-width norm is not.
  attn.q_norm.scale[...] = jnp.linspace(0.5, 2.0, 32)
  x = jnp.asarray(rng.normal(size=(1, 5, 32)), jnp.float32)
  out = attn(x)
  q, k, v = jnp.split(attn.qkv(x), 3, -1)
  def rms(t, s, groups):
    t = t.reshape(*t.shape[:-1], groups, -1)
    t = t * jax.lax.rsqrt(jnp.mean(t * t, -1, keepdims=True) + cfg.norm_eps)
    return t.reshape(*t.shape[:-2], -1) * s
  def attend(qn, kn):
    h = lambda t: t.reshape(1, 5, 2, 16)
    a = jax.nn.dot_product_attention(h(qn), h(kn), h(v))
    return attn.proj(a.reshape(1, 5, 32))
  full = attend(rms(q, attn.q_norm.scale[...], 1), rms(k, attn.k_norm.scale[...], 1))
  per_head = attend(rms(q, attn.q_norm.scale[...], 2), rms(k, attn.k_norm.scale[...], 2))
  np.testing.assert_allclose(out, full, atol=1e-5)
  assert float(jnp.abs(out - per_head).max()) > 1e-3


def test_split_qkv_equals_fused_with_the_same_weights(rng):
  fused = vit.InternViT(_tiny(), rngs=nnx.Rngs(0))
  split = vit.InternViT(_tiny(qkv_fused=False), rngs=nnx.Rngs(1))
  sf, ss = nnx.state(fused), nnx.state(split)
  for name in ("patch",):
    ss["embeddings"][name] = sf["embeddings"][name]
  nnx.update(split, nnx.state(fused, nnx.Not(nnx.PathContains("qkv"))))
  kern, bias = fused.blocks.attn.qkv.kernel[...], fused.blocks.attn.qkv.bias[...]
  for i, name in enumerate("qkv"):
    getattr(split.blocks.attn, name).kernel[...] = kern[..., i * 32:(i + 1) * 32]
    getattr(split.blocks.attn, name).bias[...] = bias[..., i * 32:(i + 1) * 32]
  x = jnp.asarray(rng.normal(size=(1, 56, 56, 3)), jnp.float32)
  np.testing.assert_allclose(split(x).last_hidden_state, fused(x).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_loop_and_remat_keeps_outputs_and_gradients(rng, remat):
  x = jnp.asarray(rng.normal(size=(2, 56, 56, 3)), jnp.float32)
  key = jax.random.key(3)
  ref = vit.InternViT(_tiny(scan_layers=False, drop_path_rate=0.2), rngs=nnx.Rngs(0))
  other = vit.InternViT(_tiny(scan_layers=True, remat=remat, drop_path_rate=0.2), rngs=nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(x, dropout_key=key).last_hidden_state ** 2)
  (l1, g1), (l2, g2) = nnx.jit(nnx.value_and_grad(loss))(ref), nnx.jit(nnx.value_and_grad(loss))(other)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(a).max()))


def test_drop_path_only_with_a_key_and_grows_with_depth(rng):
  model = vit.InternViT(_tiny(drop_path_rate=0.5), rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(2, 56, 56, 3)), jnp.float32)
  assert jnp.array_equal(model(x).last_hidden_state, model(x).last_hidden_state)
  assert not jnp.array_equal(model(x, dropout_key=jax.random.key(0)).last_hidden_state, model(x).last_hidden_state)


def test_running_fewer_layers_equals_the_hidden_state_of_that_layer(rng):
  model = vit.InternViT(_tiny(num_layers=3), rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(1, 56, 56, 3)), jnp.float32)
  full = model(x, output_hidden_states=True)
  np.testing.assert_allclose(model(x, num_layers=2).last_hidden_state, full.hidden_states[2], atol=1e-6)
  with pytest.raises(ValueError):
    model(x, num_layers=4)


def test_mean_and_attention_pooling():
  x = jnp.ones((2, 56, 56, 3))
  mean = vit.InternViT(_tiny(pooling="mean"), rngs=nnx.Rngs(0))(x)
  np.testing.assert_allclose(mean.pooler_output, mean.last_hidden_state.mean(1), atol=1e-6)
  att = vit.InternViT(_tiny(pooling="attention", pool_heads=2, pool_out_dim=8), rngs=nnx.Rngs(0))(x)
  assert att.pooler_output.shape == (2, 8)
  with pytest.raises(ValueError, match="pooling"):
    vit.InternViT(_tiny(pooling="max"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,expected", [("internvit_300m", 304e6), ("internvit_6b", 5.9e9)])
def test_real_preset_parameter_counts(name, expected):
  abstract = nnx.eval_shape(lambda: vit.InternViT(presets.vision(name), rngs=nnx.Rngs(0)))
  n = param_count(abstract)
  assert abs(n - expected) / expected < 0.01, n


def test_preset_facts():
  six = presets.vision("internvit_6b")
  assert (six.hidden_size, six.num_layers, six.num_heads, six.mlp_dim, six.norm_type, six.qk_norm, six.qkv_bias,
          six.layer_scale_init, six.image_size) == (3200, 48, 25, 12800, "rms_norm", True, False, 0.1, 224)
  assert presets.vision("internvit_6b_448").num_layers == 45
  small = presets.vision("internvit_300m")
  assert (small.hidden_size, small.num_layers, small.norm_type, small.qkv_bias, small.qk_norm) == (
      1024, 24, "layer_norm", True, False)
  with pytest.raises(ValueError, match="unknown vision preset"):
    presets.vision("vit_huge")


def test_parameters_carry_logical_axes_with_a_layers_axis():
  model = nnx.eval_shape(lambda: vit.InternViT(_tiny(), rngs=nnx.Rngs(0)))
  assert model.blocks.attn.qkv.kernel.out_sharding == ("layers", "embed", "qkv")
  assert model.blocks.mlp.fc1.kernel.out_sharding == ("layers", "embed", "mlp")
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.get_value().ndim, path
  real = vit.InternViT(_tiny(), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(stack.layer_at(real.blocks, 1).attn.qkv.kernel[...], real.blocks.attn.qkv.kernel[1])


def test_dropout_only_after_the_attention_projection(rng):
  # Official InternVisionEncoderLayer: InternAttention applies config.dropout after proj (proj_drop); InternMLP is
  # fc1 -> GELU -> fc2 with no dropout at all.
  block = vit.VisionBlock(_tiny(dropout=0.5), rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(2, 17, 32)), jnp.float32)
  key = jax.random.key(1)
  np.testing.assert_array_equal(block.mlp(x, key), block.mlp(x))
  assert not jnp.array_equal(block.attn(x, key), block.attn(x))
