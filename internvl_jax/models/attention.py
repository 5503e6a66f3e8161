"""The one attention entry point used by every attention in the package, plus mask builders.

impl: "xla" (portable), "cudnn" (flash attention on NVIDIA GPUs, bf16/fp16), "splash" (Pallas splash attention on
TPU), "auto" (cuDNN on GPU, splash on TPU where they can run, XLA otherwise; the choice is logged once).
Logits and softmax are float32 in every implementation.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from internvl_jax import sharding

IMPLS = ("xla", "cudnn", "splash", "auto")
# CPU path: float32 logits per query block, and the most blocks written out as static slices (BENCHMARKS.md:
# on a 32 MiB-L3 EPYC, InternViT-300M attention at 224 px, batch 8, runs 109 ms unblocked (34 MB of logits),
# 33-35 ms in 2 blocks, 39-52 ms in 4-8; a lax.map over 5 blocks ran 65-76 ms, most of it copies).
CPU_LOGITS_BLOCK_BYTES = 20 * 2**20
CPU_MAX_STATIC_BLOCKS = 16
SPLASH_BLOCK = 128  # splash's default block size: sequences are padded to a multiple of it
_logged_choice: set[str] = set()


def causal_mask(q_len: int, k_len: int, offset: int | jax.Array = 0, window: int | jax.Array = 0) -> jax.Array:
  """[q_len, k_len] bool: query i (at absolute slot offset + i) sees keys at slots <= offset + i; with window > 0
  only the last `window` of them (slots > offset + i - window, transformers' sliding-window rule). window may be
  a traced int32 scalar (GPT-OSS: one window per layer, scanned over the layers; <= 0 means no window)."""
  q = jnp.arange(q_len)[:, None] + offset
  k = jnp.arange(k_len)[None, :]
  if isinstance(window, jax.Array):
    return (k <= q) & ((window <= 0) | (k > q - window))
  if window:
    return (k <= q) & (k > q - window)
  return k <= q


def prefix_causal_mask(length: int, prefix_len: int | jax.Array) -> jax.Array:
  """[L, L] bool: bidirectional inside the first `prefix_len` positions, causal after (prefix-LM)."""
  k = jnp.arange(length)[None, :]
  return causal_mask(length, length) | (k < prefix_len)


def padding_mask(q_valid: jax.Array | None, k_valid: jax.Array) -> jax.Array:
  """q_valid [B, Tq] (or None), k_valid [B, Tk] -> [B, 1, Tq, Tk] bool. Padded queries see valid keys only."""
  m = k_valid[:, None, None, :].astype(bool)
  if q_valid is not None:
    m = m & q_valid[:, None, :, None].astype(bool)
  return m


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """Packed sequences: q_segments [B, Tq], k_segments [B, Tk] int (0 = padding, 1.. one per example) ->
  [B, 1, Tq, Tk] bool, True where query and key belong to the same example (padding sees and is seen by none)."""
  q, k = q_segments[:, None, :, None], k_segments[:, None, None, :]
  return (q == k) & (k > 0)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of broadcastable masks ([Tq, Tk] or [B, 1|H, Tq, Tk]); None entries are ignored."""
  out = None
  for m in masks:
    if m is None:
      continue
    m = m[None, None] if m.ndim == 2 else m
    out = m if out is None else (out & m)
  return out


def _cudnn_ok(q: jax.Array, k: jax.Array, mask) -> bool:
  if jax.default_backend() != "gpu" or mask is not None:
    return False
  head_dim = q.shape[-1]
  return q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and head_dim % 8 == 0 and head_dim <= 128


def _mesh_in_context():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _splash_ok(q: jax.Array, k: jax.Array, mask) -> bool:
  """TPU, no explicit mask (causal is fine), head_dim a multiple of 64, and either one device or a mesh in context
  (a Pallas kernel is opaque to XLA's SPMD partitioner: without shard_map over the mesh it would run replicated)."""
  if jax.default_backend() != "tpu" or mask is not None or q.shape[-1] % 64:
    return False
  return jax.device_count() == 1 or _mesh_in_context() is not None


def choose_impl(impl: str, q: jax.Array, k: jax.Array, mask) -> str:
  """Resolves 'auto' to 'cudnn' (GPU), 'splash' (TPU) or 'xla' for these shapes; logs the choice once per
  outcome."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
  if impl != "auto":
    return impl
  chosen = "cudnn" if _cudnn_ok(q, k, mask) else "splash" if _splash_ok(q, k, mask) else "xla"
  if chosen not in _logged_choice:
    _logged_choice.add(chosen)
    logging.info("attention impl 'auto' -> %s (backend %s, dtype %s)", chosen, jax.default_backend(), q.dtype)
  return chosen


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          causal: bool = False, scale: float | None = None, impl: str = "xla",
                          sinks: jax.Array | None = None) -> jax.Array:
  """Multi-head attention.

  q: [B, T, H, hd]; k, v: [B, S, Hkv, hd] with H a multiple of Hkv (grouped-query attention).
  mask: bool, broadcastable to [B, H, T, S], True = attend. causal: adds the lower-triangular mask (T == S).
  sinks: float32 [H] or None: GPT-OSS's attention sinks, a learned logit per head that joins each softmax as an
  extra key with no value (the weights of the real keys then sum to less than 1).
  Returns [B, T, H, hd] in q.dtype.
  """
  if sinks is not None:
    # Neither cuDNN's fused attention nor splash (as called here) takes a sink column, so sinks always run the
    # XLA math; on CPU it is blocked for the cache, elsewhere one block (XLA fuses it as jax.nn's XLA path).
    if impl not in IMPLS:
      raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    budget = None if jax.default_backend() == "cpu" else 2**62
    return _cpu_attention(q, k, v, mask=mask, causal=causal, scale=scale, budget_bytes=budget, sinks=sinks)
  chosen = choose_impl(impl, q, k, mask)
  if chosen == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn")
  if chosen == "splash":
    if mask is not None:
      raise ValueError("splash attention takes no explicit mask here (only causal); use impl='xla'")
    return splash_attention(q, k, v, causal=causal, scale=scale)
  if jax.default_backend() == "cpu":
    return _cpu_attention(q, k, v, mask=mask, causal=causal, scale=scale)
  # The XLA path of jax.nn.dot_product_attention computes logits and softmax in float32 and masks with a
  # large finite negative, so fully-masked rows (padding queries) give finite values rather than NaN.
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="xla")


def cpu_query_blocks(batch: int, heads: int, q_len: int, k_len: int,
                     budget_bytes: int | None = None) -> tuple[int, int]:
  """(n_blocks, rows per block) of the CPU path: the fewest equal query blocks whose float32 logits
  [batch, heads, rows, k_len] fit `budget_bytes` (default CPU_LOGITS_BLOCK_BYTES)."""
  budget = CPU_LOGITS_BLOCK_BYTES if budget_bytes is None else budget_bytes
  n_blocks = min(q_len, max(1, -(-(batch * heads * q_len * k_len * 4) // budget)))
  rows = -(-q_len // n_blocks)
  return -(-q_len // rows), rows


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None, causal: bool,
                   scale: float | None, budget_bytes: int | None = None, sinks: jax.Array | None = None) -> jax.Array:
  """The XLA path, arranged for XLA's CPU backend (measured in BENCHMARKS.md).

  Same maths as jax.nn.dot_product_attention's XLA path (float32 logits, masked logits set to the same large
  finite negative so fully-masked rows stay finite), arranged for how XLA's CPU backend runs it:
  - heads are moved next to the batch once ([B, Hkv, G, T, hd]), so both matmuls are plain batched GEMMs;
  - XLA CPU (jaxlib >= 0.10, YNNPACK) fuses QK^T, the softmax and AV of one block into a single kernel, which
    is fast while the block's logits fit the last-level cache and 3-4x slower once they do not. Queries are
    therefore split into the fewest equal blocks whose logits fit CPU_LOGITS_BLOCK_BYTES, as static slices
    (up to CPU_MAX_STATIC_BLOCKS; a lax.map over blocks beyond that keeps the program small, at the cost of a
    copy of q into block order);
  - the softmax is normalised after the second matmul: exp(l - max) @ v / sum(exp(l - max)) divides a
    [.., T, hd] result instead of the [.., T, S] probabilities;
  - the scale multiplies q ([T, hd]) rather than the logits ([T, S]).
  budget_bytes overrides CPU_LOGITS_BLOCK_BYTES (tests force several blocks at tiny shapes).
  sinks [H] float32 (or None): one more logit per head in every row's softmax, whose probability is dropped: it
  enters the row max and the normaliser only.
  """
  b, t, h, hd = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  scale = hd**-0.5 if scale is None else scale
  qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, hkv, g, hd).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, hd]
  if causal:
    mask = combine_masks(mask, causal_mask(t, s))
  if mask is not None:  # -> [B|1, Hkv|1, G|1, T|1, S]
    mask = combine_masks(mask)
    mask = mask.reshape(mask.shape[0], hkv, g, *mask.shape[2:]) if mask.shape[1] == h else mask[:, :, None]
  per_row_mask = mask is not None and mask.shape[3] == t
  sink = None if sinks is None else sinks.astype(jnp.float32).reshape(1, hkv, g, 1, 1)

  def attend(qb: jax.Array, mb: jax.Array | None) -> jax.Array:  # qb [B, Hkv, G, tb, hd] -> same shape, float32
    logits = jnp.einsum("bkgtd,bksd->bkgts", qb, kh, preferred_element_type=jnp.float32)
    if mb is not None:
      logits = jnp.where(mb, logits, -0.7 * jnp.finfo(jnp.float32).max)
    top = jnp.max(logits, axis=-1, keepdims=True)
    if sink is not None:
      top = jnp.maximum(top, sink)
    e = jnp.exp(logits - top)
    out = jnp.einsum("bkgts,bksd->bkgtd", e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    total = jnp.sum(e, axis=-1, keepdims=True)
    if sink is not None:
      total = total + jnp.exp(sink - top)
    return out / total

  n_blocks, rows = cpu_query_blocks(b, h, t, s, budget_bytes)
  if n_blocks == 1:
    out = attend(qh, mask)
  elif n_blocks <= CPU_MAX_STATIC_BLOCKS:
    rows_of = lambda x, i: x[..., i:i + rows, :]
    out = jnp.concatenate([attend(rows_of(qh, i), rows_of(mask, i) if per_row_mask else mask)
                           for i in range(0, t, rows)], axis=-2)
  else:
    pad = n_blocks * rows - t

    def to_blocks(x: jax.Array) -> jax.Array:  # [..., T, last] -> [n_blocks, ..., rows, last]
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)], constant_values=True if x.dtype == bool else 0)
      x = x.reshape(*x.shape[:-2], n_blocks, rows, x.shape[-1])
      return jnp.moveaxis(x, -3, 0)

    if per_row_mask:
      out = jax.lax.map(lambda qm: attend(*qm), (to_blocks(qh), to_blocks(mask)))
    else:  # no mask, or one shared by every query row
      out = jax.lax.map(lambda qb: attend(qb, mask), to_blocks(qh))
    out = jnp.moveaxis(out, 0, -3).reshape(b, hkv, g, n_blocks * rows, hd)[:, :, :, :t]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t_pad: int, s_pad: int, t: int, s: int, heads: int, causal: bool, interpret: bool):
  """A single-device splash MHA kernel for padded lengths: padded keys are masked out (a static mask, so splash
  skips fully-masked blocks); padded queries attend to the real keys and are dropped by the caller."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  m = np.zeros((t_pad, s_pad), bool)
  m[:, :s] = True
  if causal:
    m &= np.arange(s_pad)[None, :] <= np.arange(t_pad)[:, None]
  return sa.make_splash_mha_single_device(sa.MultiHeadMask([sa.NumpyMask(m)] * heads), interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, scale: float | None = None,
                     interpret: bool = False) -> jax.Array:
  """Pallas splash attention (TPU). q [B, T, H, hd], k/v [B, S, Hkv, hd] -> [B, T, H, hd] in q.dtype.

  Splash wants [H, T, hd] per example with T, S multiples of its block: heads go first, sequences are padded to
  SPLASH_BLOCK (InternViT's 1 + 16^2 = 257 tokens -> 384) and padded keys masked. Grouped KV heads are repeated
  (splash MHA needs equal heads). With a mesh in context the kernel runs under shard_map, batch over
  sharding.BATCH_AXES and heads over 'tensor', because XLA cannot partition the custom call itself.
  interpret=True runs the kernel in the Pallas interpreter (CPU tests).
  """
  b, t, h, hd = q.shape
  s = k.shape[1]
  if k.shape[2] != h:
    k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
  scale = hd**-0.5 if scale is None else scale
  pad = lambda n: -(-n // SPLASH_BLOCK) * SPLASH_BLOCK
  t_pad, s_pad = pad(t), pad(s)
  to_heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh = to_heads_first(q * jnp.asarray(scale, q.dtype), t_pad)  # splash applies no scale of its own
  kh, vh = to_heads_first(k, s_pad), to_heads_first(v, s_pad)

  def run(qh, kh, vh):  # [b, h_local, T, hd]
    kernel = _splash_kernel(t_pad, s_pad, t, s, qh.shape[1], causal, interpret)
    return jax.vmap(kernel)(qh, kh, vh)

  mesh = _mesh_in_context()
  if mesh is not None:
    batch = sharding.split_rows_over(mesh, b) or None  # an uneven batch (a short eval batch) splits less
    heads = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 and h % mesh.shape["tensor"] == 0 \
        else None
    spec = P(batch, heads)
    run = jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  out = run(qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
