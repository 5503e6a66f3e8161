"""Mixture-of-experts feed-forward (Qwen3-MoE, GPT-OSS): a softmax router picks the top-k experts of each token,
every expert is a SwiGLU, and no token is ever dropped (so results equal a per-token reference).

GPT-OSS options: a router bias (router_bias), biases on the expert projections (expert_bias) and its clamped
SwiGLU (expert_act 'gpt_oss_clamped', see _activation). Its routing, softmax over the top-k logits, is
norm_topk_prob=True here: softmax(top-k logits) = top-k softmax probabilities renormalised.

Dropless grouped matmul: the N*k (token, expert) assignments are sorted by expert, `jax.lax.ragged_dot` runs the
gate / up / down projections over the contiguous group of each expert (one matmul each, no dense all-experts
einsum, no capacity padding), and the outputs are unsorted and summed with the router weights.

Expert parallelism: with a mesh in context (the train step traces under it) whose 'expert' axis is > 1, the
experts run in a shard_map: each device keeps its E / n_expert experts (gathered over fsdp / tensor like any
FSDP weight), runs only the assignments routed to them, and a psum over 'expert' adds the partial outputs. The
batch is split over data x fsdp, so devices along 'expert' see the same tokens. (XLA:CPU has no ragged-dot
instruction: there ragged_dot lowers to a dense masked fallback; GPU / TPU lower it to chlo.ragged_dot.)

Parameters (logical names in brackets; 'expert' maps to the mesh axis 'expert' in sharding.py):
  router  kernel [D, E] float32      [embed, -]   (bias [E] with router_bias)
  gate, up       [E, D, I]           [expert, embed, mlp]
  down           [E, I, D]           [expert, mlp, embed]
  gate_bias, up_bias [E, I], down_bias [E, D]      (expert_bias only)

Config fields (language config): num_experts (0 = dense model), num_experts_per_tok, moe_mlp_dim,
norm_topk_prob, decoder_sparse_step, mlp_only_layers, router_aux_loss_coef; router_bias, expert_bias,
expert_act ('swiglu' | 'gpt_oss_clamped'), swiglu_alpha, swiglu_limit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from internvl_jax.models import layers


def is_moe_layer(cfg: ml_collections.ConfigDict, i: int) -> bool:
  """Whether decoder layer i has routed experts (transformers' Qwen3-MoE rule)."""
  n = cfg.get("num_experts", 0) or 0
  step = cfg.get("decoder_sparse_step", 1) or 1
  return n > 0 and i not in tuple(cfg.get("mlp_only_layers") or ()) and (i + 1) % step == 0


def moe_layer_ids(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  return tuple(i for i in range(cfg.num_layers) if is_moe_layer(cfg, i))


class MoE(nnx.Module):
  """Routed SwiGLU experts. __call__: x [B, T, D], token_mask [B, T] bool -> (y [B, T, D], stats) where stats =
  (counts [E] float32: top-k assignments of real tokens per expert, prob_sum [E] float32: router probabilities
  summed over real tokens), the two sums transformers' load-balancing loss is made of."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_mlp_dim
    if not 0 < cfg.num_experts_per_tok <= e:
      raise ValueError(f"num_experts_per_tok {cfg.num_experts_per_tok} must be in 1..num_experts ({e})")
    self.num_experts, self.top_k, self.norm_topk_prob = e, cfg.num_experts_per_tok, bool(cfg.norm_topk_prob)
    self.dtype = layers.to_dtype(cfg.dtype)
    # The router stays float32: its top-k choice is discrete, and a rounding flip would swap whole experts.
    self.router = layers.dense(d, e, ("embed", None), use_bias=bool(cfg.get("router_bias", False)),
                               dtype=jnp.float32, init_std=cfg.init_std, rngs=rngs)
    act = cfg.get("expert_act", "swiglu") or "swiglu"
    if act not in ACTIVATIONS:
      raise ValueError(f"expert_act {act!r} is not one of {ACTIVATIONS}")
    self.act = (act, float(cfg.get("swiglu_alpha", 1.702)), float(cfg.get("swiglu_limit", 7.0)))
    init = nnx.initializers.normal(cfg.init_std)
    self.gate = nnx.Param(init(rngs.params(), (e, d, i), jnp.float32), out_sharding=("expert", "embed", "mlp"))
    self.up = nnx.Param(init(rngs.params(), (e, d, i), jnp.float32), out_sharding=("expert", "embed", "mlp"))
    self.down = nnx.Param(init(rngs.params(), (e, i, d), jnp.float32), out_sharding=("expert", "mlp", "embed"))
    bias = lambda shape, names: nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names) if cfg.get(
        "expert_bias", False) else None
    self.gate_bias, self.up_bias = bias((e, i), ("expert", "mlp")), bias((e, i), ("expert", "mlp"))
    self.down_bias = bias((e, d), ("expert", "embed"))

  def route(self, flat: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """flat [N, D] -> (probs [N, E], weights [N, k], experts [N, k] int32), all float32 but the ids."""
    probs = jax.nn.softmax(self.router(flat.astype(jnp.float32)), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts

  def experts(self, flat: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    """Dropless grouped SwiGLU. flat [N, D]; weights, experts [N, k] -> [N, D] in the compute dtype.
    With a mesh in context whose 'expert' axis has size > 1, each device runs its own experts only (shard_map)."""
    ws = tuple(w[...].astype(self.dtype) for w in (self.gate, self.up, self.down))  # cast before any gather
    bs = () if self.gate_bias is None else tuple(b[...].astype(self.dtype) for b in (self.gate_bias, self.up_bias,
                                                                                        self.down_bias))
    mesh = _expert_mesh()
    if mesh is None:
      return _grouped_swiglu(flat.astype(self.dtype), weights, experts, *ws, *bs, first=0, out_dtype=self.dtype,
                             act=self.act)
    batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if batch and flat.shape[0] % math.prod(mesh.shape[a] for a in batch):
      batch = ()  # tokens that do not split evenly run replicated
    tokens = P(batch or None, None)

    def local(flat, weights, experts, gate, up, down, *biases):
      # this device's experts are [first, first + E / n_expert); others' assignments get weight 0 here and
      # are added by the psum over 'expert' (tokens are the same on every device along that axis)
      first = jax.lax.axis_index("expert") * gate.shape[0]
      # Said explicitly, so that the gradient of the (expert-invariant) tokens is summed over 'expert': left
      # implicit, the transpose of the varying-index gather below dropped that sum (wrong token gradients).
      flat, weights = (jax.lax.pcast(a, "expert", to="varying") for a in (flat, weights))
      y = _grouped_swiglu(flat, weights, experts, gate, up, down, *biases, first=first, out_dtype=jnp.float32,
                          act=self.act)
      return jax.lax.psum(y, "expert")

    wspec = P("expert", None, None)
    bspecs = (P("expert", None),) * len(bs)  # the expert biases, split like their weights
    y = jax.shard_map(local, in_specs=(tokens, tokens, tokens, wspec, wspec, wspec, *bspecs), out_specs=tokens)(
        flat.astype(self.dtype), weights, experts, *ws, *bs)
    return y.astype(self.dtype)

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    probs, weights, experts = self.route(flat)
    y = self.experts(flat, weights, experts).reshape(b, t, d)
    real = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    counts = jnp.zeros((self.num_experts,), jnp.float32).at[experts.reshape(-1)].add(jnp.repeat(real, self.top_k))
    prob_sum = jnp.sum(probs * real[:, None], axis=0)
    return y, (counts, prob_sum)


def _expert_mesh():
  """The mesh in context (jax.sharding.use_abstract_mesh, as the train step sets it) when it splits experts."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
    return None
  return mesh


ACTIVATIONS = ("swiglu", "gpt_oss_clamped")


def _activation(gate, up, act):
  """The gated activation of each expert; act = (name, alpha, limit). 'swiglu': silu(gate) * up.
  'gpt_oss_clamped' (transformers GptOssExperts): gate clamped to <= limit, up to [-limit, limit], then
  (up + 1) * gate * sigmoid(alpha * gate)."""
  name, alpha, limit = act
  if name == "swiglu":
    return jax.nn.silu(gate) * up
  gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
  return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def _grouped_swiglu(flat, weights, experts, gate, up, down, gate_bias=None, up_bias=None, down_bias=None, *, first,
                    out_dtype, act=("swiglu", 0.0, 0.0)):
  """Sum over slots of weight x SwiGLU_e(token) for the assignments to experts [first, first + gate.shape[0]).
  flat [N, D] and gate, up [E_l, D, I], down [E_l, I, D] (biases: gate_bias, up_bias [E_l, I], down_bias
  [E_l, D] or None) in the compute dtype; weights (float32), experts [N, k] -> [N, D] in out_dtype; act: see
  _activation."""
  n, d = flat.shape
  k, e_local = experts.shape[1], gate.shape[0]
  rel = experts - first
  mine = (rel >= 0) & (rel < e_local)
  key = jnp.where(mine, rel, e_local).reshape(-1)  # [N*k]; assignment a = token a // k, slot a % k; others last
  order = jnp.argsort(key, stable=True)  # assignments grouped by expert
  sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)  # rows past the groups: no expert
  xs = flat[order // k]  # [N*k, D]
  mm = lambda a, w: jax.lax.ragged_dot(a, w, sizes)
  if gate_bias is None:
    add = lambda y, b: y
  else:  # each sorted row's expert (rows of other devices' experts take the last; their output is dropped below)
    row_expert = jnp.minimum(key[order], e_local - 1)
    add = lambda y, b: y + b[row_expert]
  h = _activation(add(mm(xs, gate), gate_bias), add(mm(xs, up), up_bias), act)  # [N*k, I]
  out = add(mm(h, down), down_bias)[jnp.argsort(order)].reshape(n, k, d)  # back to (token, slot) order: a gather
  out = jnp.where(mine[..., None], out.astype(jnp.float32), 0.0)
  return jnp.einsum("nkd,nk->nd", out, weights).astype(out_dtype)


def load_balancing_loss(counts: jax.Array, prob_sum: jax.Array, num_tokens: jax.Array, num_moe_layers: int):
  """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6, summed over layers first):
  E * sum_e (counts_e / R) * (prob_sum_e / R), R = real tokens x MoE layers; counts, prob_sum [E] summed over
  the MoE layers. Returns a float32 scalar (not yet multiplied by router_aux_loss_coef)."""
  rows = jnp.maximum(jnp.asarray(num_tokens, jnp.float32) * num_moe_layers, 1.0)
  return counts.shape[0] * jnp.sum((counts / rows) * (prob_sum / rows))
