"""LLaMA / Qwen2 / Qwen3-style decoder with grouped-query attention, RoPE, SwiGLU, RMSNorm and a functional KV cache.

Options: q/k/v biases (Qwen2), per-head RMSNorm on q and k before RoPE (Qwen3, `qk_norm`), routed experts in
some or all layers (Qwen3-MoE, `num_experts` > 0, see moe.py). A model whose layers mix dense and MoE
feed-forwards keeps two stacks (`layers`: the MoE layers, `dense_layers`: the others) and runs each run of
consecutive same-kind layers as one scan.

Phi-3 and InternLM3 are this decoder too: Phi-3 adds config options (partial rotary `rotary_dim`, `rope_type`
'longrope', `sliding_window`); its fused checkpoint tensors are split by the converter.

GPT-OSS too: attention sinks (`attention_sinks`, a learned logit per head in every softmax), q/k/v and output
biases (`qkv_bias`, `o_bias`), `rope_type` 'yarn', windows on some layers only (`layer_types`: the window of each
layer is a scanned input that narrows the shared causal mask, so one scan still runs all layers), and routed
experts in every layer with biases and a clamped SwiGLU (moe.py).

With `causal=False` and a pooling rule the same module is the contrastive model's text tower.

KV cache (a plain dict, so jit/scan/donation treat it as data):
  k, v  [L, B, S, Hkv, hd]  keys/values in the compute dtype, written at slots [index, index + T)
  mask  [B, S] bool         which slots hold real (non-pad) tokens
  index int32 []            next slot to write (shared by the batch; left padding keeps rows aligned)
  pos   [B] int32           next RoPE position of each row (counts real tokens only)
  k_ring, v_ring [L_sliding, B, W, Hkv, hd]  only with config.window_cache: sliding layers' last W slots
                            (window_cache.py); k, v then hold the full-attention layers only
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from internvl_jax.models import attention, layers, lora, moe, stack, window_cache


class DecoderOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, vocab] float32 (None when the model has no LM head output requested)
  last_hidden_state: jax.Array  # [B, T, D] after the final norm
  cache: dict | None
  aux_loss: jax.Array | None = None  # float32 [] router load-balancing loss (MoE models; coefficient not applied)


def head_dim(cfg: ml_collections.ConfigDict) -> int:
  return cfg.get("head_dim") or cfg.hidden_size // cfg.num_heads


def layer_windows(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The sliding window of each layer (0 = full attention): sliding_window on every layer (Phi-3), or only on the
  layers that layer_types names 'sliding_attention' (GPT-OSS alternates them with 'full_attention')."""
  window = int(cfg.get("sliding_window", 0) or 0)
  types = tuple(cfg.get("layer_types") or ())
  if not types:
    return (window,) * cfg.num_layers
  if len(types) != cfg.num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
    raise ValueError(f"layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                     f"{cfg.num_layers} layers, got {list(types)}")
  return tuple(window if kind == "sliding_attention" else 0 for kind in types)


def default_positions(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """RoPE positions that count real tokens only: left or right padding leaves real tokens' positions unchanged.
  attention_mask [B, T] -> [B, T] int32."""
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
  return jnp.maximum(pos, 0) + jnp.asarray(start, jnp.int32).reshape(-1, 1)


def yarn_inv_freq(cfg: ml_collections.ConfigDict, rd: int) -> np.ndarray:
  """YaRN inverse frequencies [rd/2] float32 (transformers' _compute_yarn_parameters): dimensions that turn
  fewer than beta_slow times over the original context are interpolated (divided by factor), those that turn more
  than beta_fast times are kept, and a linear ramp blends the ones between; truncate rounds the ramp's ends."""
  base, factor = float(cfg.rope_theta), float(cfg.rope_factor)
  pos_freqs = np.float32(base) ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd))
  extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)

  def correction_dim(rotations):
    return rd * math.log(cfg.rope_original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.get("rope_truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rd - 1)
  if low == high:
    high += 0.001  # as transformers: avoids a zero-width ramp
  ramp = np.clip((np.arange(rd // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
  return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def rope_tables(cfg: ml_collections.ConfigDict, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, rd] float32 for integer positions [B, T]; rd = cfg.rotary_dim (0: the whole head).

  rope_type 'longrope' (Phi-3 128k): inverse frequencies are divided by rope_long_factor when the call's largest
  position + 1 exceeds rope_original_max, by rope_short_factor otherwise (one choice for the whole call, as
  transformers decides per forward: with a cache, keys keep the factors they were written with); cos and sin are
  multiplied by rope_attention_factor in every case. generate.longrope_recompute_step covers Phi-3's generate.
  rope_type 'yarn' (GPT-OSS): fixed inverse frequencies from yarn_inv_freq, cos and sin times
  rope_attention_factor."""
  rd = cfg.get("rotary_dim", 0) or head_dim(cfg)
  kind = cfg.get("rope_type", "default")
  scale = 1.0
  if kind == "yarn":
    inv_freq = jnp.asarray(yarn_inv_freq(cfg, rd))
    scale = float(cfg.rope_attention_factor)
  elif kind in ("default", "longrope"):
    wavelengths = cfg.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd)  # [rd/2]
    factors = 1.0
    if kind == "longrope":
      use_long = jnp.max(positions) + 1 > cfg.rope_original_max
      factors = jnp.where(use_long, jnp.asarray(cfg.rope_long_factor, jnp.float32),
                          jnp.asarray(cfg.rope_short_factor, jnp.float32))
      scale = float(cfg.rope_attention_factor)
    inv_freq = 1.0 / (factors * wavelengths)
  else:
    raise ValueError(f"rope_type {kind!r} is not 'default', 'longrope' or 'yarn'")
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


class DecoderAttention(nnx.Module):
  """Grouped-query self-attention with RoPE; q/k/v biases optional (Qwen2), an output bias (o_bias) and attention
  sinks (attention_sinks: a learned logit per head, models/attention.py) optional (GPT-OSS)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, hd, dtype = cfg.hidden_size, head_dim(cfg), layers.to_dtype(cfg.dtype)
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.impl = cfg.attention_impl
    kw = dict(dtype=dtype, init_std=cfg.init_std, lora=lora.lora_args(cfg), rngs=rngs)  # LoRA: q, k, v, o
    self.q = layers.dense(d, cfg.num_heads * hd, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.k = layers.dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.v = layers.dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.o = layers.dense(cfg.num_heads * hd, d, ("heads", "embed"), use_bias=cfg.get("o_bias", False), **kw)
    # float32 like the softmax they join; replicated ('norm' maps to no mesh axis), being one number per head
    self.sinks = nnx.Param(nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.num_heads,), jnp.float32),
                           out_sharding=("norm",)) if cfg.get("attention_sinks", False) else None
    # Qwen3: RMSNorm over each head's head_dim on q and k (one scale [hd] shared by the heads), before RoPE.
    qk_norm = cfg.get("qk_norm", False)
    self.q_norm = layers.RMSNorm(hd, eps=cfg.norm_eps, dtype=dtype) if qk_norm else None
    self.k_norm = layers.RMSNorm(hd, eps=cfg.norm_eps, dtype=dtype) if qk_norm else None

  def __call__(self, x, cos, sin, mask, kv=None, index=None, ring=False):
    """x [B, T, D]; cos/sin [B, T, hd]; mask bool [B, 1, T, S]; kv: this layer's cached (k, v) [B, S, Hkv, hd]
    or None; ring: kv is a sliding layer's ring [B, W, Hkv, hd] (window_cache.py) and mask covers [ring ; new]
    keys [B, 1, T, W + T]. Returns (out [B, T, D], (k, v) updated or None)."""
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if kv is not None and ring:
      k_ring, v_ring = kv
      kv = (window_cache.write(k_ring, k, index), window_cache.write(v_ring, v, index))
      k = jnp.concatenate([k_ring, k.astype(k_ring.dtype)], axis=1)
      v = jnp.concatenate([v_ring, v.astype(v_ring.dtype)], axis=1)
    elif kv is not None:
      k_cache, v_cache = kv
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      k, v, kv = k_cache, v_cache, (k_cache, v_cache)
    sinks = None if self.sinks is None else self.sinks[...]
    out = attention.dot_product_attention(q, k, v, mask=mask, impl=self.impl, sinks=sinks)
    return self.o(out.reshape(b, t, -1)), kv


class DecoderLayer(nnx.Module):
  """Pre-norm: x + attn(norm(x)); x + ffn(norm(x)), ffn a SwiGLU or (sparse=True) routed experts."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, sparse: bool = False):
    dtype = layers.to_dtype(cfg.dtype)
    self.input_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
    self.attn = DecoderAttention(cfg, rngs=rngs)
    self.post_attention_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
    self.sparse = sparse
    # LoRA (cfg.lora_rank) adapts gate / up / down of a dense feed-forward; routed experts get none
    self.mlp = moe.MoE(cfg, rngs=rngs) if sparse else layers.SwiGLU(
        cfg.hidden_size, cfg.mlp_dim, dtype=dtype, init_std=cfg.init_std, lora=lora.lora_args(cfg), rngs=rngs)

  def self_attention(self, x, cos, sin, mask, kv=None, index=None, ring=False):
    h, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, index, ring)
    return x + h, kv

  def feed_forward(self, x):
    return self.feed_forward_with_stats(x)[0]

  def feed_forward_with_stats(self, x, token_mask=None):
    """-> (x + ffn(norm(x)), router stats (see moe.MoE) or None for a dense layer)."""
    if not self.sparse:
      return x + self.mlp(self.post_attention_norm(x)), None
    y, stats = self.mlp(self.post_attention_norm(x), token_mask)
    return x + y, stats

  def __call__(self, x, cos, sin, mask, kv=None, index=None):
    x, kv = self.self_attention(x, cos, sin, mask, kv, index)
    return self.feed_forward(x), kv


class Decoder(nnx.Module):
  """Token ids [B, T] (or embeddings [B, T, D]) -> DecoderOutput."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = layers.to_dtype(cfg.dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                           embedding_init=layers.logical(nnx.initializers.normal(cfg.init_std), ("vocab", "embed")))
    sparse = moe.moe_layer_ids(cfg)
    self.layers = stack.stacked(lambda r: DecoderLayer(cfg, rngs=r, sparse=bool(sparse)), len(sparse) or
                                cfg.num_layers, rngs)
    mixed = 0 < len(sparse) < cfg.num_layers
    self.dense_layers = stack.stacked(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers - len(sparse),
                                      rngs) if mixed else None
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
    separate_head = cfg.lm_head and not cfg.tie_embeddings
    self.lm_head = layers.dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
                                init_std=cfg.init_std, rngs=rngs) if separate_head else None

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty cache for `max_length` slots (prompt + new tokens). With config.window_cache, sliding-window
    layers get rings of min(window, max_length) slots instead (k_ring, v_ring [L_sliding, B, W, Hkv, hd]; k, v
    then hold the full-attention layers only, in layer order)."""
    cfg = self.config
    dtype = layers.to_dtype(cfg.dtype) if dtype is None else dtype
    windows = layer_windows(cfg)
    rings = sum(1 for w in windows if w) if cfg.get("window_cache", False) else 0
    shape = lambda n, s: (n, batch_size, s, cfg.num_kv_heads, head_dim(cfg))
    cache = {"k": jnp.zeros(shape(cfg.num_layers - rings, max_length), dtype),
             "v": jnp.zeros(shape(cfg.num_layers - rings, max_length), dtype),
             "mask": jnp.zeros((batch_size, max_length), bool), "index": jnp.zeros((), jnp.int32),
             "pos": jnp.zeros((batch_size,), jnp.int32)}
    if rings:
      if self.dense_layers is not None or len({w for w in windows if w}) > 1:
        raise ValueError("window_cache needs one layer stack (no dense / MoE mix) and one window size")
      size = min(max(windows), max_length)
      cache.update(k_ring=jnp.zeros(shape(rings, size), dtype), v_ring=jnp.zeros(shape(rings, size), dtype))
    return cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final hidden [B, T, D] -> logits [B, T, vocab] float32."""
    if self.lm_head is not None:
      return self.lm_head(hidden).astype(jnp.float32)
    return self.embed.attend(hidden).astype(jnp.float32)

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cache: dict | None = None, prefix_len: int | jax.Array | None = None,
               return_logits: bool = True, pixel_values: None = None,
               segment_ids: jax.Array | None = None, lora_key: jax.Array | None = None) -> DecoderOutput:
    """attention_mask [B, T] (1 = real token); positions [B, T] int (default: counts real tokens);
    segment_ids [B, T] int: packed rows (0 = padding, 1.. one per example), attention stays inside an example
    and positions restart at 0 for each (no cache);
    pixel_values: accepted (and must be None) so that a text-only LM has the chat model's call signature;
    prefix_len: bidirectional attention inside the first prefix_len positions (prefix-LM), causal after;
    cache: from init_cache, for prefill and then one (or a few) tokens at a time;
    lora_key: LoRA dropout (training; used when the adapters have a rate; not with a cache)."""
    cfg = self.config
    if pixel_values is not None:
      raise ValueError("this is a text-only language model; pixel_values must be None")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(layers.to_dtype(cfg.dtype))
    b, t, _ = x.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool) if segment_ids is None else segment_ids > 0
    attention_mask = attention_mask.astype(bool)
    if segment_ids is not None and (cache is not None or prefix_len is not None):
      raise ValueError("packed rows (segment_ids) take no KV cache and no prefix_len")

    windows = layer_windows(cfg)
    if any(windows) and prefix_len is not None:
      raise ValueError("a sliding-window decoder has no prefix-LM mode (prefix_len)")
    # One window for all layers: built into the shared mask. Windows that differ by layer (GPT-OSS): the shared
    # mask is the full causal one and each layer narrows it with its window, a scanned input (one scan still
    # runs all layers).
    per_layer = len(set(windows)) > 1
    window = 0 if per_layer else windows[0]
    layer_window = jnp.asarray(windows, jnp.int32) if per_layer else None
    if cache is None:
      if positions is None:
        positions = default_positions(attention_mask) if segment_ids is None else segment_positions(segment_ids)
      order = None
      if cfg.causal:
        order = (attention.causal_mask(t, t, window=window) if prefix_len is None
                 else attention.prefix_causal_mask(t, prefix_len))
      if segment_ids is not None:  # packed rows: attention stays inside each example
        order = attention.combine_masks(order, attention.segment_mask(segment_ids, segment_ids))
      mask = attention.combine_masks(attention.padding_mask(None, attention_mask), order)
      kv_xs, index, s = None, None, t
    else:
      if not cfg.causal:
        raise ValueError("a KV cache needs a causal decoder (config.causal=True)")
      index = cache["index"]
      if positions is None:
        positions = default_positions(attention_mask, cache["pos"])
      key_valid = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
      s = key_valid.shape[1]
      mask = attention.combine_masks(attention.padding_mask(None, key_valid),
                                     attention.causal_mask(t, s, index, window=window))
      kv_xs = (cache["k"], cache["v"])

    cos, sin = rope_tables(cfg, positions)
    if cache is not None and "k_ring" in cache:
      ring_mask = window_cache.key_mask(key_valid, attention_mask, index, cache["k_ring"].shape[2], max(windows))
      x, (k, v, k_ring, v_ring), stats = self._run_grouped(x, cos, sin, mask, ring_mask, cache, index,
                                                           attention_mask)
      return self._finish(x, cache, {"k": k, "v": v, "k_ring": k_ring, "v_ring": v_ring, "mask": key_valid},
                          stats, attention_mask, return_logits)

    def body(layer, h, xs):
      kv, w = xs
      m = mask if w is None else attention.combine_masks(
          mask, attention.causal_mask(t, s, 0 if index is None else index, window=w))
      h, kv = layer.self_attention(h, cos, sin, m, kv, index)
      h, stats = layer.feed_forward_with_stats(h, attention_mask)
      return h, (kv, stats)

    lora_key = lora_key if cache is None and lora.wants_key(cfg) else None
    x, new_kv, stats = self._run_layers(body, x, (kv_xs, layer_window), lora_key)
    new = None if cache is None else {"k": new_kv[0], "v": new_kv[1], "mask": key_valid}
    return self._finish(x, cache, new, stats, attention_mask, return_logits)

  def _finish(self, x, cache, new, stats, attention_mask, return_logits) -> DecoderOutput:
    """Final norm, logits, the cache's index / positions moved on, the router loss."""
    cfg = self.config
    x = self.norm(x)
    new_cache = None
    if cache is not None:
      new_cache = dict(new, index=cache["index"] + attention_mask.shape[1],
                       pos=cache["pos"] + attention_mask.sum(axis=1).astype(jnp.int32))
    aux = None
    if stats is not None:
      aux = moe.load_balancing_loss(stats[0].sum(0), stats[1].sum(0), attention_mask.sum(), stats[0].shape[0])
    return DecoderOutput(self.logits(x) if (return_logits and cfg.lm_head) else None, x, new_cache, aux)

  def _run_grouped(self, x, cos, sin, mask, ring_mask, cache, index, attention_mask):
    """The cached call with rings (window_cache.py): one scan over groups of `period` layers (GPT-OSS: a
    sliding and a full one), each layer with its own kind of cache. Returns (x, (k, v, k_ring, v_ring) stacked
    over their layers, router stats [L, E] or None)."""
    cfg = self.config
    kinds = layer_windows(cfg)[:window_cache.period(layer_windows(cfg))]
    groups, n_ring = cfg.num_layers // len(kinds), sum(1 for w in kinds if w)
    split = lambda a, n: a.reshape((groups, n) + a.shape[1:])
    xs = (split(cache["k"], len(kinds) - n_ring), split(cache["v"], len(kinds) - n_ring),
          split(cache["k_ring"], n_ring), split(cache["v_ring"], n_ring))

    def body(group, h, xs):
      outs, used, stats = ([], [], [], []), [0, 0], []
      for j, w in enumerate(kinds):
        layer, r = stack.layer_at(group, j), int(bool(w))  # r: 0 full-cache layer, 1 ring layer
        i = used[r]
        kv = (xs[2 * r][i], xs[2 * r + 1][i])
        h, kv = layer.self_attention(h, cos, sin, ring_mask if w else mask, kv, index, ring=bool(w))
        outs[2 * r].append(kv[0])
        outs[2 * r + 1].append(kv[1])
        used[r] += 1
        h, st = layer.feed_forward_with_stats(h, attention_mask)
        stats.append(st)
      new = tuple(jnp.stack(o) if o else like for o, like in zip(outs, xs))  # a kind absent: its empty slice
      return h, (new, None if stats[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *stats))

    x, (new, stats) = stack.run_stacked(stack.regroup(self.layers, len(kinds)), body, x, xs, scan=cfg.scan_layers,
                                        remat=cfg.remat)
    merge = lambda a: a.reshape((-1,) + a.shape[2:])  # [groups, n, ...] -> layer order
    return x, tuple(merge(a) for a in new), None if stats is None else jax.tree.map(merge, stats)

  def _run_layers(self, body, x, xs, lora_key=None):
    """Runs every layer in order: one scan over `layers`, or (dense and MoE layers mixed) one scan per run of
    same-kind layers. xs: per-layer inputs ((k, v) or None, windows [L] or None), leading axis L. lora_key: LoRA
    dropout (a run of layers starting at layer i gets fold_in(lora_key, i)).
    Returns (x, (k, v) stacked over all layers or None, router stats [L_moe, E] or None)."""
    kv_xs = xs[0]
    cfg = self.config
    run = lambda mods, h, xs, k: stack.run_stacked(mods, body, h, xs, scan=cfg.scan_layers, remat=cfg.remat,
                                                   lora_key=k)
    if self.dense_layers is None:
      x, (kv, stats) = run(self.layers, x, xs, lora_key)
      return x, kv, stats
    kinds = [moe.is_moe_layer(cfg, i) for i in range(cfg.num_layers)]
    kvs, all_stats, start, used = [], [], 0, {True: 0, False: 0}
    while start < cfg.num_layers:
      kind, stop = kinds[start], start
      while stop < cfg.num_layers and kinds[stop] == kind:
        stop += 1
      mods = self.layers if kind else self.dense_layers
      part = stack.layer_range(mods, used[kind], used[kind] + stop - start)
      key = None if lora_key is None else jax.random.fold_in(lora_key, start)
      x, (kv, stats) = run(part, x, jax.tree.map(lambda a: a[start:stop], xs), key)
      kvs.append(kv)
      if kind:
        all_stats.append(stats)
      used[kind] += stop - start
      start = stop
    kv = None if kv_xs is None else jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)
    stats = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *all_stats)
    return x, kv, stats


def pool_tokens(hidden: jax.Array, attention_mask: jax.Array | None, how: str) -> jax.Array:
  """hidden [B, T, D] -> [B, D]. how: 'first' (CLS-style), 'mean' (over real tokens), 'last' (last real token,
  i.e. the EOS of a right-padded caption)."""
  b, t, _ = hidden.shape
  mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  if how == "first":
    return hidden[:, 0]
  if how == "mean":
    w = mask.astype(jnp.float32)[..., None]
    return (jnp.sum(hidden.astype(jnp.float32) * w, 1) / jnp.maximum(w.sum(1), 1.0)).astype(hidden.dtype)
  if how == "last":
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"text pooling {how!r} is not one of 'first', 'mean', 'last'")


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """RoPE positions of packed rows: each example (a run of equal segment ids) counts from 0, as if it ran alone.
  segment_ids [B, T] int -> [B, T] int32 (padding gets the count of its run too; it is never attended)."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)[None, :]
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
