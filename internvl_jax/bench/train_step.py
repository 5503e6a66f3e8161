"""A minimal contrastive train step (symmetric InfoNCE + optax.adamw) for the benchmark.

It has the shape of work of the trainer's stage-1 step (internvl_jax/train/steps.py: model forward, InfoNCE,
backward, AdamW) and nothing else, so that it compares like for like with its PyTorch twin in torch_side.py.
The trainer's own step adds what PyTorch's twin lacks (skipping non-finite updates, gradient norm, metrics,
dropout keys, the sharded loss on a mesh); timing it would fold those into the JAX / PyTorch ratio.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from internvl_jax.models import internvl


def info_nce(image: jax.Array, text: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over a batch of matching pairs. image, text: [B, E] unit-norm float32; scale: exp(s)."""
  logits = scale * image @ text.T
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (i2t.mean() + t2i.mean())


def optimizer(learning_rate: float = 1e-4, weight_decay: float = 0.05) -> optax.GradientTransformation:
  """AdamW as in InternVL stage 1 (the schedule does not matter for speed)."""
  return optax.adamw(learning_rate, b1=0.9, b2=0.98, weight_decay=weight_decay)


def make_contrastive_step(model: internvl.InternVLContrastive, tx: optax.GradientTransformation):
  """Returns (step, state): step(state, pixel_values, input_ids, attention_mask) -> (state, loss), jitted with
  the state donated, and the initial state (params, opt_state, rest). Pure functions of arrays, so the benchmark
  can lower and compile it separately from running it."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  def loss_fn(p, rest, pixel_values, input_ids, attention_mask):
    m = nnx.merge(graphdef, p, rest)
    image, text, scale = m(pixel_values, input_ids, attention_mask)
    return info_nce(image, text, scale)

  def step(state: tuple[Any, Any, Any], pixel_values, input_ids, attention_mask):
    p, o, r = state
    loss, grads = jax.value_and_grad(loss_fn)(p, r, pixel_values, input_ids, attention_mask)
    updates, o = tx.update(grads, o, p)
    return (optax.apply_updates(p, updates), o, r), loss

  return jax.jit(step, donate_argnums=0), (params, opt_state, rest)


def make_fwdbwd(model: nnx.Module):
  """Forward + backward of a vision tower without an optimizer (what fits a 6B tower on one GPU): returns
  (fn, params_and_rest); fn(state, pixel_values) -> (grads, loss) with a scalar loss on the pooled output."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, r, pixel_values):
    out = nnx.merge(graphdef, p, r)(pixel_values)
    return jnp.mean(jnp.square(out.pooler_output.astype(jnp.float32)))

  def fwdbwd(state, pixel_values):
    p, r = state
    loss, grads = jax.value_and_grad(loss_fn)(p, r, pixel_values)
    return grads, loss

  return jax.jit(fwdbwd), (params, rest)
