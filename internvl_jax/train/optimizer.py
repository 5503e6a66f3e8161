"""The optimizer of every stage: AdamW with linear warmup + cosine decay, weight decay only on kernels,
global-norm clipping and optional gradient accumulation (optax.MultiSteps).

Gradient accumulation averages gradients of `grad_accum_steps` consecutive batches before one update; it does NOT
enlarge the set of negatives of the contrastive loss (each batch's InfoNCE only sees that batch), so it is a
memory knob, not a substitute for a large contrastive batch. config.contrastive_accum_steps is
(train/contrastive_accum.py); the two compose (each batch one contrastive batch, grad_accum_steps of them per update).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from internvl_jax.train import freezing

# parameter leaf names that are decayed; everything else (norm scales and biases, biases, embeddings, position
# and class embeddings, query tokens, layer-scale vectors, the logit scale) is not
DECAYED_LEAVES = ("kernel", "lora_a", "lora_b")  # LoRA matrices decay too, as under the HF Trainer


def weight_decay_mask(params) -> dict:
  """A pytree of bools like params: True where weight decay applies (matrices: Linear and Conv kernels).

  Decided by the leaf's name rather than its rank, because scanned layers add a leading 'layers' axis that makes
  a norm scale [L, D] look like a matrix."""

  def decide(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", str(last)))
    return str(name) in DECAYED_LEAVES

  return jax.tree_util.tree_map_with_path(decide, params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to cfg.lr over cfg.warmup_steps, then cosine to cfg.lr * cfg.min_lr_ratio at the
  last optimizer update (total_steps / grad_accum_steps updates)."""
  updates = max(cfg.total_steps // cfg.get("grad_accum_steps", 1), 1)
  warmup = min(cfg.warmup_steps, updates - 1) if updates > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=updates,
      end_value=cfg.lr * cfg.get("min_lr_ratio", 0.0))


def masked_layers(layer_masks: dict) -> optax.GradientTransformation:
  """Zeroes the updates of frozen layers inside partly trained stacked leaves (freezing.layer_masks), so that
  weight decay cannot move them either."""
  def update(updates, state, params=None):
    return freezing.apply_layer_masks(updates, layer_masks), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict, params,
                   layer_masks: dict | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """cfg: the run config (lr, warmup_steps, total_steps, weight_decay, b1, b2, eps, grad_clip, grad_accum_steps,
  min_lr_ratio). params: the trainable parameter tree (for the decay mask). layer_masks: 'path' -> bool [L] of
  the leaves only some of whose layers train (their other layers get zero updates). Returns (tx, schedule)."""
  schedule = learning_rate_schedule(cfg)
  parts = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask(params)))
  if layer_masks:
    parts.append(masked_layers(layer_masks))
  tx = optax.chain(*parts)
  k = cfg.get("grad_accum_steps", 1)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx, schedule
