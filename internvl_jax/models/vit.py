"""InternViT (DESIGN §4): patch conv + CLS + learned positions, pre-norm blocks with layer scale and drop-path,
fused-or-split qkv, QK-norm over the full width, exact-GELU MLP, no final norm."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from internvl_jax.models import attention, heads, layers, lora, stack


class VisionOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, 1 + N, D]
  pooler_output: jax.Array  # [B, D] (or [B, pool_out_dim] for attention pooling)
  hidden_states: tuple | None  # (embeddings, layer 1, ..., layer L), each [B, 1 + N, D], when asked for


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] float32 matrix that reproduces torch's bicubic interpolate (align_corners=False, no antialias)
  along one axis: Keys cubic with a = -0.75, source index scale * (dst + 0.5) - 0.5, borders clamped."""

  def w_near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def w_far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for dst in range(out_size):
    src = scale * (dst + 0.5) - 0.5
    base = int(np.floor(src))
    t = src - base
    weights = (w_far(t + 1), w_near(t), w_near(1 - t), w_far(2 - t))
    for offset, w in zip((-1, 0, 1, 2), weights):
      m[dst, min(max(base + offset, 0), in_size - 1)] += w
  return m.astype(np.float32)


def resize_position_embedding(pos: jax.Array, grid_hw: tuple[int, int], new_hw: tuple[int, int]) -> jax.Array:
  """pos [1, 1 + gh*gw, D] -> [1, 1 + nh*nw, D]: the CLS position kept, the patch grid resized bicubically in
  float32 exactly as torch.nn.functional.interpolate(mode='bicubic', align_corners=False)."""
  if tuple(grid_hw) == tuple(new_hw):
    return pos
  (gh, gw), (nh, nw) = grid_hw, new_hw
  cls_pos, grid = pos[:, :1], pos[:, 1:].astype(jnp.float32).reshape(gh, gw, -1)
  grid = jnp.einsum("hi,ijd,wj->hwd", bicubic_matrix(gh, nh), grid, bicubic_matrix(gw, nw),
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([cls_pos, grid.reshape(1, nh * nw, -1).astype(pos.dtype)], axis=1)


class VisionEmbeddings(nnx.Module):
  """Pixels [B, H, W, C] (H, W multiples of the patch) -> tokens [B, 1 + (H/p)(W/p), D]."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, p, dtype = cfg.hidden_size, cfg.patch_size, layers.to_dtype(cfg.dtype)
    self.patch_size = p
    self.grid = cfg.image_size // p
    self.dtype = dtype
    self.patch = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True,
                          dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=layers.logical(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
                          bias_init=layers.logical(nnx.initializers.zeros, ("embed",)), rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), jnp.float32), out_sharding=(None, None, "embed"))
    self.position = nnx.Param(init(rngs.params(), (1, 1 + self.grid**2, d), jnp.float32),
                              out_sharding=(None, None, "embed"))

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    b, h, w, _ = pixel_values.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = self.patch(pixel_values.astype(self.dtype))  # [B, h/p, w/p, D]
    x = x.reshape(b, -1, x.shape[-1])  # row-major over (h, w), like torch's flatten(2)
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, x.shape[-1]))
    pos = resize_position_embedding(self.position[...], (self.grid, self.grid), (h // p, w // p))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)


class VisionAttention(nnx.Module):
  """Self-attention with fused (official layout: q, k, v rows) or split projections, optional QK-norm."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, dtype = cfg.hidden_size, layers.to_dtype(cfg.dtype)
    if d % cfg.num_heads:
      raise ValueError(f"hidden_size {d} is not divisible by num_heads {cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.impl = cfg.attention_impl
    self.dropout_rate = cfg.dropout
    adapter = lora.lora_args(cfg)  # LoRA (official targets attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
    kw = dict(use_bias=cfg.qkv_bias, dtype=dtype, lora=adapter, rngs=rngs)
    self.fused = cfg.qkv_fused
    if self.fused:
      self.qkv = layers.dense(d, 3 * d, ("embed", "qkv"), **kw)
    else:
      self.q = layers.dense(d, d, ("embed", "heads"), **kw)
      self.k = layers.dense(d, d, ("embed", "heads"), **kw)
      self.v = layers.dense(d, d, ("embed", "heads"), **kw)
    if cfg.qk_norm:
      # Official InternViT-6B: RMSNorm over the whole width (all heads at once), before the head split.
      self.q_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
      self.k_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
    else:
      self.q_norm = self.k_norm = None
    self.proj = layers.dense(d, d, ("heads", "embed"), use_bias=True, dtype=dtype, lora=adapter, rngs=rngs)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    b, n, d = x.shape
    if self.fused:
      q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    else:
      q, k, v = self.q(x), self.k(x), self.v(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    split = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
    out = attention.dot_product_attention(split(q), split(k), split(v), impl=self.impl)
    return layers.dropout(self.proj(out.reshape(b, n, d)), self.dropout_rate, dropout_key)


class VisionBlock(nnx.Module):
  """x + drop_path(ls1 * attn(norm1(x))); x + drop_path(ls2 * mlp(norm2(x)))."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, dtype = cfg.hidden_size, layers.to_dtype(cfg.dtype)
    self.norm1 = layers.make_norm(cfg.norm_type, d, cfg.norm_eps, dtype=dtype)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.norm2 = layers.make_norm(cfg.norm_type, d, cfg.norm_eps, dtype=dtype)
    # The official InternMLP is fc1 -> GELU -> fc2 with no dropout; config.dropout acts only after the attention
    # output projection (InternAttention.proj_drop).
    self.mlp = layers.MLP(d, cfg.mlp_dim, rngs=rngs, dtype=dtype, lora=lora.lora_args(cfg))
    self.ls1 = nnx.Param(jnp.full((d,), cfg.layer_scale_init, jnp.float32), out_sharding=("norm",))
    self.ls2 = nnx.Param(jnp.full((d,), cfg.layer_scale_init, jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array, drop_rate: jax.Array, key: jax.Array | None) -> jax.Array:
    keys = (None,) * 4 if key is None else tuple(jax.random.split(key, 4))
    h = self.attn(self.norm1(x), keys[0]) * self.ls1[...].astype(x.dtype)
    x = x + layers.drop_path(h, drop_rate, keys[1])
    h = self.mlp(self.norm2(x), keys[2]) * self.ls2[...].astype(x.dtype)
    return x + layers.drop_path(h, drop_rate, keys[3])


class InternViT(nnx.Module):
  """InternViT. Call: pixel_values [B, H, W, C] float (normalised) -> VisionOutput in cfg.dtype."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
    self.blocks = stack.stacked(lambda r: VisionBlock(cfg, rngs=r), cfg.num_layers, rngs)
    if cfg.pooling == "attention":
      self.pool = heads.AttentionPooling(cfg.hidden_size, cfg.pool_heads, cfg.pool_out_dim, rngs=rngs,
                                         dtype=layers.to_dtype(cfg.dtype), attention_impl=cfg.attention_impl)
    elif cfg.pooling in ("cls", "mean"):
      self.pool = None
    else:
      raise ValueError(f"vision pooling {cfg.pooling!r} is not one of 'cls', 'mean', 'attention'")

  def __call__(self, pixel_values: jax.Array, *, dropout_key: jax.Array | None = None,
               output_hidden_states: bool = False, num_layers: int | None = None,
               lora_key: jax.Array | None = None) -> VisionOutput:
    """num_layers: run only the first n blocks (a chat model reading layer n needs no more). dropout_key: drop-path
    and attention dropout; lora_key: LoRA dropout only (its own stream; used when the adapters have a rate)."""
    cfg = self.config
    x0 = self.embeddings(pixel_values)
    n = cfg.num_layers if num_layers is None else num_layers
    drop_rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.num_layers, dtype=jnp.float32)
    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    def body(block, h, inputs):
      rate, key = inputs
      h = block(h, rate, key)
      return h, (h if output_hidden_states else None)

    lora_key = lora_key if lora.wants_key(cfg) else None
    x, per_layer = stack.run_stacked(self.blocks, body, x0, (drop_rates, keys), scan=cfg.scan_layers,
                                     remat=cfg.remat, length=n, lora_key=lora_key)
    hidden = (x0,) + tuple(per_layer[i] for i in range(n)) if output_hidden_states else None
    return VisionOutput(x, self._pool(x), hidden)

  def _pool(self, x: jax.Array) -> jax.Array:
    if self.config.pooling == "cls":
      return x[:, 0]
    if self.config.pooling == "mean":
      return jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    return self.pool(x)
