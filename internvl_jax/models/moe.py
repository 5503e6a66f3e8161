"""Mixture-of-experts feed-forward (Qwen3-MoE, GPT-OSS): a softmax router picks the top-k experts of each token,
every expert is a SwiGLU, and no token is ever dropped (so results equal a per-token reference).

GPT-OSS options: a router bias (router_bias), biases on the expert projections (expert_bias) and its clamped
SwiGLU (expert_act 'gpt_oss_clamped', see _activation). Its routing, softmax over the top-k logits, is
norm_topk_prob=True here: softmax(top-k logits) = top-k softmax probabilities renormalised.

Dropless grouped matmul: the N*k (token, expert) assignments are sorted by expert, `jax.lax.ragged_dot` runs the
gate / up / down projections over the contiguous group of each expert (one matmul each, no dense all-experts
einsum, no capacity padding), and the outputs are unsorted and summed with the router weights.

Expert parallelism: with a mesh in context (the train step traces under it) whose 'expert' axis is > 1, the
batch is split over data x fsdp x expert for the whole model (sharding.BATCH_AXES), so the devices along
'expert' hold different tokens and share attention, norms and router work like any data-parallel axis; only the
experts are split differently: each device keeps E / n_expert of them (gathered over fsdp / tensor like any FSDP
weight). Inside a shard_map, the n_expert devices of a group all-gather their tokens and routing over 'expert'
(each then holds the group's tokens), run their own experts on every assignment routed to them (others weigh 0
there), and psum_scatter the partial outputs back over 'expert': each device gets the full sums for its own
tokens. Why this scheme rather than an all_to_all dispatch: it is dropless and exact with fixed shapes (no
capacity factor, no padding of per-expert buffers, no data-dependent sizes), its transpose is the same pair the
other way round (gradients need no special care), and it moves less: per device and layer, 2 x (n_expert - 1) x
its tokens x D (gather in, reduce-scatter out) against an all_to_all's 2 x top_k x (n_expert - 1) / n_expert x
its tokens x D (the assignments to other devices' experts and back), so it is no worse while n_expert <= top_k
(8 for Qwen3-MoE); an exact-size all_to_all is the next step for wider expert axes. Each device's grouped
matmuls compute only the groups of its own experts (about 1 / n_expert of the group's assignments; rows past
them stay zero), so expert FLOPs per device shrink with n_expert while the gathered activations grow to
n_expert x its tokens. When the
tokens do not split over 'expert' (e.g. a 1-row decode step), they stay the same along it and the partial
outputs are psum-ed instead.
(XLA:CPU has no ragged-dot instruction: there ragged_dot lowers to a dense masked matmul over all local experts,
E_local times the expert FLOPs actually needed; GPU / TPU lower it to chlo.ragged_dot.)

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

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from internvl_jax import sharding
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
    # every per-expert weight ([E, ...], cast before any gather), biases after them; the shard_map below passes
    # them through as a tuple
    ws = tuple(w[...].astype(self.dtype) for w in (self.gate, self.up, self.down))
    if self.gate_bias is not None:
      ws += tuple(b[...].astype(self.dtype) for b in (self.gate_bias, self.up_bias, self.down_bias))
    run = lambda flat, weights, experts, ws, first, out_dtype: _grouped_swiglu(
        flat, weights, experts, *ws, first=first, out_dtype=out_dtype, act=self.act)
    mesh = _expert_mesh()
    if mesh is None:
      return run(flat.astype(self.dtype), weights, experts, ws, 0, self.dtype)
    return _expert_parallel(run, mesh, flat.astype(self.dtype), weights, experts, ws).astype(self.dtype)

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


def _expert_parallel(run, mesh, flat, weights, experts, ws):
  """run(flat, weights, experts, ws, first, out_dtype) -> [n, D] under a shard_map over `mesh`: every weight of
  `ws` ([E, ...]) split over 'expert' on its leading axis, the N tokens over the batch axes (sharding.BATCH_AXES).
  Returns [N, D] float32 laid out like the tokens."""
  axes = sharding.split_rows_over(mesh, flat.shape[0])  # the tokens' split; 'expert' goes first when N is uneven
  tokens = P(axes or None, None)

  def local(flat, weights, experts, *ws):
    first = jax.lax.axis_index("expert") * ws[0].shape[0]  # this device's experts: [first, first + E / n_expert)
    if "expert" in axes:
      # Tokens split over 'expert' too: gather the group's tokens, run this device's experts on all of them
      # (others' assignments weigh 0 here), and reduce-scatter: each device gets its own tokens' sums back.
      flat, weights, experts = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (flat, weights, experts))
      y = run(flat, weights, experts, ws, first, jnp.float32)
      return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    # Tokens the same on every device along 'expert' (N does not split over it, e.g. one decode token).
    # Said explicitly, so that the gradient of the (expert-invariant) tokens is summed over 'expert': left
    # implicit, the transpose of the varying-index gather below dropped that sum (wrong token gradients).
    flat, weights = (jax.lax.pcast(a, "expert", to="varying") for a in (flat, weights))
    return jax.lax.psum(run(flat, weights, experts, ws, first, jnp.float32), "expert")

  wspecs = tuple(P("expert", *([None] * (w.ndim - 1))) for w in ws)
  return jax.shard_map(local, in_specs=(tokens, tokens, tokens) + wspecs, out_specs=tokens)(flat, weights, experts,
                                                                                           *ws)


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
