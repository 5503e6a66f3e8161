import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax.models import llm, presets


def _decoder(**kw):
  cfg = presets.language("tiny")
  cfg.update(kw)
  return llm.Decoder(cfg, rngs=nnx.Rngs(0))


IDS = jnp.array([[5, 9, 3, 7, 11, 2, 8], [1, 4, 6, 10, 12, 13, 14]])


def test_later_tokens_do_not_change_earlier_logits():
  model = _decoder()
  a = model(IDS).logits
  b = model(IDS.at[:, 4].set(99)).logits
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
  assert float(jnp.abs(a[:, 4:] - b[:, 4:]).max()) > 1e-3
  assert a.shape == (2, 7, 128) and a.dtype == jnp.float32


def test_bidirectional_text_tower_sees_later_tokens():
  model = _decoder(causal=False, lm_head=False)
  out = model(IDS)
  assert out.logits is None
  changed = model(IDS.at[:, 4].set(99)).last_hidden_state
  assert float(jnp.abs(out.last_hidden_state[:, :4] - changed[:, :4]).max()) > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_token_logits(side):
  model = _decoder()
  real = IDS[:1, :5]
  ref = model(real).logits
  pad = jnp.zeros((1, 3), IDS.dtype)
  ids = jnp.concatenate([pad, real] if side == "left" else [real, pad], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 3)), jnp.ones((1, 5))] if side == "left"
                         else [jnp.ones((1, 5)), jnp.zeros((1, 3))], axis=1)
  out = model(ids, attention_mask=mask).logits
  got = out[:, 3:] if side == "left" else out[:, :5]
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_kv_cache_incremental_equals_full_forward():
  model = _decoder()
  full = model(IDS).logits
  cache = model.init_cache(2, 10)
  step = jax.jit(lambda m, ids, c: m(ids, cache=c))
  out = step(model, IDS[:, :3], cache)
  pieces = [out.logits]
  cache = out.cache
  for t in range(3, 7):
    out = step(model, IDS[:, t:t + 1], cache)
    pieces.append(out.logits)
    cache = out.cache
  inc = jnp.concatenate(pieces, axis=1)
  err = float(jnp.abs(inc - full).max())
  assert err < 1e-5, err
  assert int(cache["index"]) == 7 and cache["k"].shape == (2, 2, 10, 2, 8)


def test_kv_cache_with_left_padding_equals_unpadded_rows():
  model = _decoder()
  ids = jnp.array([[0, 0, 5, 9, 3], [4, 6, 10, 12, 13]])
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  nxt = jnp.array([[7], [14]])
  out = model(ids, attention_mask=mask, cache=model.init_cache(2, 8))
  out2 = model(nxt, cache=out.cache)
  ref0 = model(jnp.array([[5, 9, 3, 7]])).logits[0, -1]
  ref1 = model(jnp.array([[4, 6, 10, 12, 13, 14]])).logits[0, -1]
  np.testing.assert_allclose(out2.logits[0, 0], ref0, atol=1e-5)
  np.testing.assert_allclose(out2.logits[1, 0], ref1, atol=1e-5)
  np.testing.assert_array_equal(out2.cache["pos"], [4, 6])


def test_grouped_query_attention_equals_repeated_heads():
  gqa = _decoder(num_heads=4, num_kv_heads=2)
  mha = _decoder(num_heads=4, num_kv_heads=4)
  nnx.update(mha, nnx.state(gqa, nnx.Not(nnx.Any(nnx.PathContains("k"), nnx.PathContains("v")))))
  for name in ("k", "v"):
    w = getattr(gqa.layers.attn, name).kernel[...].reshape(2, 32, 2, 1, 8)
    getattr(mha.layers.attn, name).kernel[...] = jnp.broadcast_to(w, (2, 32, 2, 2, 8)).reshape(2, 32, 32)
  np.testing.assert_allclose(gqa(IDS).logits, mha(IDS).logits, atol=1e-5)


def test_tied_embeddings_and_qkv_bias():
  model = _decoder(tie_embeddings=True, qkv_bias=True)
  assert model.lm_head is None and model.layers.attn.q.bias is not None
  out = model(IDS)
  np.testing.assert_allclose(out.logits, out.last_hidden_state @ model.embed.embedding[...].T, atol=1e-5)


def test_scan_equals_loop_for_the_decoder_with_gradients():
  a, b = _decoder(scan_layers=True, remat="full"), _decoder(scan_layers=False)
  loss = lambda m: jnp.mean(m(IDS).logits ** 2)
  (la, ga), (lb, gb) = nnx.jit(nnx.value_and_grad(loss))(a), nnx.jit(nnx.value_and_grad(loss))(b)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * float(jnp.abs(x).max()))


def test_bfloat16_decoder_stays_close_to_float32():
  a, b = _decoder(), _decoder(dtype="bfloat16")
  la, lb = a(IDS).logits, b(IDS).logits
  assert lb.dtype == jnp.float32
  assert float(jnp.linalg.norm(la - lb) / jnp.linalg.norm(la)) < 3e-2


def test_pool_tokens():
  h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(llm.pool_tokens(h, mask, "first"), h[:, 0])
  np.testing.assert_array_equal(llm.pool_tokens(h, mask, "last"), jnp.stack([h[0, 1], h[1, 3]]))
  np.testing.assert_allclose(llm.pool_tokens(h, mask, "mean"), jnp.stack([h[0, :2].mean(0), h[1].mean(0)]))
  with pytest.raises(ValueError):
    llm.pool_tokens(h, mask, "max")


def test_cache_needs_a_causal_decoder_and_bad_gqa_is_refused():
  with pytest.raises(ValueError, match="causal"):
    m = _decoder(causal=False)
    m(IDS, cache=m.init_cache(2, 8))
  with pytest.raises(ValueError, match="multiple"):
    _decoder(num_heads=4, num_kv_heads=3)
