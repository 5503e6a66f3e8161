"""QLLaMA, the *query* LLaMA of InternVL-C/G (DESIGN §5): a LLaMA decoder plus learnable query tokens that
cross-attend into vision tokens in layers 0, k, 2k, ... (k = cross_attention_frequency).

- Text path: the plain causal decoder (no queries, no cross-attention).
- Query path: [queries ; optional text]; queries attend to each other bidirectionally, text is causal and sees
  every query; cross-attention (RMSNorm on queries and on vision tokens, no RoPE, no mask, no biases) is applied at
  the query positions only, between self-attention and the MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from internvl_jax.models import attention, layers, llm, stack


class CrossAttention(nnx.Module):
  """x + o(attn(q(norm(x)), k(norm_v(vision)), v(norm_v(vision)))). x [B, Q, D], vision [B, N, Dv] -> [B, Q, D]."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, dv, dtype = cfg.hidden_size, cfg.vision_width, layers.to_dtype(cfg.dtype)
    self.num_heads, self.impl = cfg.num_heads, cfg.attention_impl
    kw = dict(use_bias=False, dtype=dtype, init_std=cfg.init_std, rngs=rngs)
    self.norm_q = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
    self.norm_kv = layers.RMSNorm(dv, eps=cfg.norm_eps, dtype=dtype)
    self.q = layers.dense(d, d, ("embed", "heads"), **kw)
    self.k = layers.dense(dv, d, ("embed", "heads"), **kw)
    self.v = layers.dense(dv, d, ("embed", "heads"), **kw)
    self.o = layers.dense(d, d, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, vision: jax.Array) -> jax.Array:
    b, nq, d = x.shape
    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, d // self.num_heads)
    vision = self.norm_kv(vision)
    q, k, v = heads(self.q(self.norm_q(x))), heads(self.k(vision)), heads(self.v(vision))
    out = attention.dot_product_attention(q, k, v, impl=self.impl)
    return x + self.o(out.reshape(b, nq, d))


class QLLaMA(nnx.Module):
  """cfg: a language config plus vision_width, num_query_tokens, cross_attention_frequency (presets.qllama)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if cfg.num_layers % cfg.cross_attention_frequency:
      raise ValueError(f"num_layers {cfg.num_layers} is not a multiple of cross_attention_frequency "
                       f"{cfg.cross_attention_frequency}")
    self.config = cfg
    self.decoder = llm.Decoder(cfg, rngs=rngs)
    self.query_tokens = nnx.Param(
        nnx.initializers.normal(cfg.init_std)(rngs.params(), (1, cfg.num_query_tokens, cfg.hidden_size)),
        out_sharding=(None, None, "embed"))
    self.cross_attention = stack.stacked(lambda r: CrossAttention(cfg, rngs=r),
                                         cfg.num_layers // cfg.cross_attention_frequency, rngs)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Text only, causal, no cross-attention: [B, T] -> final hidden states [B, T, D]."""
    return self.decoder(input_ids, attention_mask=attention_mask, return_logits=False).last_hidden_state

  def __call__(self, vision_hidden: jax.Array, input_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, return_logits: bool = False) -> llm.DecoderOutput:
    """Query path. vision_hidden [B, N, Dv]; optional text ids [B, T] after the queries.
    Returns a DecoderOutput over [queries ; text] positions (hidden [B, Q + T, D])."""
    cfg = self.config
    b, nq = vision_hidden.shape[0], cfg.num_query_tokens
    dtype = layers.to_dtype(cfg.dtype)
    x = jnp.broadcast_to(self.query_tokens[...].astype(dtype), (b, nq, cfg.hidden_size))
    valid = jnp.ones((b, nq), bool)
    if input_ids is not None:
      text_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
      x = jnp.concatenate([x, self.decoder.embed(input_ids)], axis=1)
      valid = jnp.concatenate([valid, text_mask], axis=1)
    t = x.shape[1]
    mask = attention.combine_masks(attention.padding_mask(None, valid), attention.prefix_causal_mask(t, nq))
    cos, sin = layers.rope_cos_sin(llm.default_positions(valid), llm.head_dim(cfg), cfg.rope_theta)
    vision_hidden = vision_hidden.astype(dtype)
    f = cfg.cross_attention_frequency

    def body(mods, h, _):
      group, cross = mods
      for j in range(f):
        layer = stack.layer_at(group, j)
        h, _ = layer.self_attention(h, cos, sin, mask)
        if j == 0:
          h = jnp.concatenate([cross(h[:, :nq], vision_hidden), h[:, nq:]], axis=1)
        h = layer.feed_forward(h)
      return h, None

    grouped = stack.regroup(self.decoder.layers, f)
    x, _ = stack.run_stacked((grouped, self.cross_attention), body, x, scan=cfg.scan_layers, remat=cfg.remat)
    x = self.decoder.norm(x)
    logits = self.decoder.logits(x) if (return_logits and cfg.lm_head) else None
    return llm.DecoderOutput(logits, x, None)
