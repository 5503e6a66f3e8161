"""impl='auto' picks cuDNN on GPU, splash on TPU, XLA elsewhere (backend mocked), logs once, and the splash path
(run by the Pallas interpreter on CPU) equals XLA attention. cuDNN numerics need a GPU: benchmarks/gpu.sh."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.models import attention


def _qkv(b=2, t=5, h=2, hkv=2, hd=64, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, h, hd)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, t, hkv, hd)), dtype) for _ in range(2))
  return q, k, v


@pytest.fixture
def backend(monkeypatch):
  def set_backend(name):
    monkeypatch.setattr(jax, "default_backend", lambda: name)
    attention._logged_choice.clear()
  yield set_backend
  attention._logged_choice.clear()


def test_auto_choice_per_backend(backend):
  q, k, _ = _qkv(dtype=jnp.bfloat16)
  backend("gpu")
  assert attention.choose_impl("auto", q, k, None) == "cudnn"
  assert attention.choose_impl("auto", q.astype(jnp.float32), k.astype(jnp.float32), None) == "xla"  # cuDNN: bf16
  assert attention.choose_impl("auto", q, k, jnp.ones((5, 5), bool)) == "xla"
  backend("tpu")
  assert attention.choose_impl("auto", q, k, None) == ("splash" if jax.device_count() == 1 else "xla")
  assert attention.choose_impl("auto", q, k, jnp.ones((5, 5), bool)) == "xla"
  backend("cpu")
  assert attention.choose_impl("auto", q, k, None) == "xla"
  assert attention.choose_impl("splash", q, k, None) == "splash"  # explicit choices are kept
  with pytest.raises(ValueError, match="not one of"):
    attention.choose_impl("flash", q, k, None)


def test_choice_is_logged_once(backend, caplog):
  q, k, _ = _qkv(dtype=jnp.bfloat16)
  backend("gpu")
  with caplog.at_level(logging.INFO):
    for _ in range(3):
      attention.choose_impl("auto", q, k, None)
  assert sum("-> cudnn" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("causal,hkv", [(False, 2), (True, 1)])
def test_splash_kernel_matches_xla(causal, hkv):
  q, k, v = _qkv(hkv=hkv)  # T = 5 is padded to one 128 block; hkv=1 exercises the head repeat
  ref = attention.dot_product_attention(q, k, v, causal=causal, impl="xla")
  out = attention.splash_attention(q, k, v, causal=causal, interpret=True)
  assert out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-4, rtol=2e-4)


def test_auto_routes_to_the_kernels(backend, monkeypatch):
  q, k, v = _qkv(dtype=jnp.bfloat16)
  calls = []
  real_splash = attention.splash_attention
  monkeypatch.setattr(attention, "splash_attention",
                      lambda *a, **kw: calls.append("splash") or real_splash(*a, interpret=True, **kw))
  real_dpa = jax.nn.dot_product_attention

  def fake_dpa(*a, implementation=None, **kw):
    calls.append(implementation)
    return real_dpa(*a, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_dpa)
  backend("gpu")
  attention.dot_product_attention(q, k, v, impl="auto")
  if jax.device_count() == 1:
    backend("tpu")
    out = attention.dot_product_attention(q, k, v, impl="auto")
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  assert calls[0] == "cudnn" and calls[1:] == (["splash"] if jax.device_count() == 1 else [])


# Block counts forced through the logits budget: 1 (unblocked), 2-4 (static slices, last block shorter),
# 17-20 (> CPU_MAX_STATIC_BLOCKS: lax.map over blocks, the last one padded).
@pytest.mark.parametrize("t,mask_kind,n_blocks", [
    (128, "causal", 2), (128, "padding", 1), (257, "none", 2), (257, "causal", 20), (257, "per_query", 2),
    (257, "per_query", 20), (257, "padding", 3), (257, "per_head", 20), (600, "causal", 17), (600, "per_query", 4)])
def test_cpu_query_blocked_attention_matches_xla(t, mask_kind, n_blocks):
  """The CPU path (static query blocks, or lax.map over padded blocks beyond CPU_MAX_STATIC_BLOCKS) equals
  jax.nn.dot_product_attention's XLA path, with grouped KV heads, every mask shape the models pass, and
  fully-masked query rows."""
  rng = np.random.default_rng(t)
  b, h, hkv, hd = 2, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, h, hd)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(b, t, hkv, hd)).astype(np.float32)) for _ in range(2))
  causal, mask = mask_kind == "causal", None
  if mask_kind == "per_query":
    m = rng.random((b, 1, t, t)) > 0.3
    m[0, 0, 5] = False  # a fully-masked query row must stay finite
    mask = jnp.asarray(m)
  elif mask_kind == "padding":
    mask = attention.padding_mask(None, jnp.asarray(np.arange(t)[None] < np.array([[t], [t - 40]])))
  elif mask_kind == "per_head":
    mask = jnp.asarray(rng.random((b, h, t, t)) > 0.5)
  budget = -(-b * h * t * t * 4 // n_blocks)
  assert attention.cpu_query_blocks(b, h, t, t, budget)[0] == n_blocks
  assert (n_blocks > attention.CPU_MAX_STATIC_BLOCKS) == (n_blocks >= 17)
  run = lambda q: attention._cpu_attention(q, k, v, mask=mask, causal=causal, scale=None, budget_bytes=budget)
  out = run(q)
  kk, vv = (jnp.repeat(x, h // hkv, axis=2) for x in (k, v))
  ref = jax.nn.dot_product_attention(q, kk, vv, mask=mask, is_causal=causal, implementation="xla")
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)
  grad = jax.grad(lambda q: jnp.sum(run(q) ** 2))
  grad_ref = jax.grad(lambda q: jnp.sum(jax.nn.dot_product_attention(q, kk, vv, mask=mask, is_causal=causal,
                                                                     implementation="xla") ** 2))
  np.testing.assert_allclose(np.asarray(grad(q)), np.asarray(grad_ref(q)), atol=2e-5, rtol=1e-4)
