"""Loss functions of the three stages and the jitted train / eval steps.

A loss function takes (model, batch, dropout_key, cfg, mesh) and returns (loss, metrics). The train step
differentiates it with respect to the trainable parameters only, applies the optimizer, and skips the update
(keeping parameters and optimizer state) when the loss or the gradient norm is not finite.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internvl_jax import losses, sharding
from internvl_jax.train import contrastive_accum, freezing, state as state_lib


CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


def _contrastive(img, txt, scale, cfg, mesh: Mesh | None, bias=None):
  """The image-text loss of config.loss over the global batch, the one dispatch of the stages' contrastive terms.

  img, txt: [B, E] float32 embeddings; scale: [] exp(s); bias: [] the sigmoid loss's b (model.loss_params()).
  'softmax' (default): symmetric InfoNCE, the sharded form (per-device rows of the similarity matrix) when the
  batch is split over more than one device and config.sharded_contrastive_loss (default on), else the plain one.
  'sigmoid': SigLIP's pairwise loss, with the same switch choosing the ring form (losses.sharded_sigmoid_loss)."""
  kind = cfg.get("loss", "softmax") if cfg is not None else "softmax"
  sharded = mesh is not None and cfg.get("sharded_contrastive_loss", True) and losses.batch_axes_of(mesh)
  if kind == "sigmoid":
    if bias is None:  # a model built without the bias (config.loss changed after the model config was made)
      raise ValueError("config.loss='sigmoid' needs the model's logit bias; build the model from the run config "
                       "(train.state.run_model_config) so that model.logit_bias_init is set")
    if sharded:
      return losses.sharded_sigmoid_loss(img, txt, scale, bias, mesh)
    return losses.sigmoid_loss(img, txt, scale, bias)
  if kind != "softmax":
    raise ValueError(f"config.loss={kind!r} is not one of {CONTRASTIVE_LOSSES}")
  if sharded:
    return losses.sharded_contrastive_loss(img, txt, scale, mesh)
  return losses.contrastive_loss(img, txt, scale)


def contrastive_towers(model, batch: dict, key) -> tuple[jax.Array, jax.Array]:
  """The two towers of stage 1: (image embeddings [B, E], text embeddings [B, E]) float32, unit-norm."""
  return (model.encode_image(batch["pixel_values"], dropout_key=key),
          model.encode_text(batch["input_ids"], batch["attention_mask"]))


def contrastive_head(model, img, txt, cfg, mesh: Mesh | None = None):
  """The contrastive loss on given embeddings [B, E]; the one place the loss's own parameters (the logit scale, the
  sigmoid loss's bias) are read from the model, so that contrastive_accum.py differentiates them without naming
  them."""
  scale, bias = model.loss_params()
  return _contrastive(img, txt, scale, cfg, mesh, bias=bias)


def contrastive_loss_fn(model, batch: dict, key, cfg, mesh: Mesh | None = None):
  """Stage 1. batch: pixel_values [B, S, S, 3], input_ids / attention_mask [B, T]."""
  img, txt = contrastive_towers(model, batch, key)
  return contrastive_head(model, img, txt, cfg, mesh)


def alignment_towers(model, batch: dict, key):
  """Stage 2's forward pass (one pass of the vision tower): (image embeddings [B, E], text embeddings [B, E],
  caption LM loss [] (token mean over the batch), losses.lm_loss's metrics)."""
  k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
  out = model.vision(batch["pixel_values"], dropout_key=k1)
  img = model.image_features(out, dropout_key=k2)
  txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
  logits = model.caption_logits(out, batch["input_ids"], batch["attention_mask"])
  targets, mask = losses.shift_for_next_token(batch["input_ids"], batch["attention_mask"])
  g_loss, g_metrics = losses.lm_loss(logits, targets, mask)
  return img, txt, g_loss, g_metrics


def alignment_loss_fn(model, batch: dict, key, cfg, mesh: Mesh | None = None):
  """Stage 2: contrastive + caption_weight * caption LM loss on the same batch."""
  img, txt, g_loss, g_metrics = alignment_towers(model, batch, key)
  c_loss, metrics = contrastive_head(model, img, txt, cfg, mesh)
  metrics.update({"loss_contrastive": c_loss, "loss_caption": g_loss, "caption_token_acc": g_metrics["token_acc"]})
  return c_loss + cfg.caption_weight * g_loss, metrics


LORA_STREAM = 0x10AA  # folded into the step's key: LoRA dropout draws from its own stream


def instruct_loss_fn(model, batch: dict, key, cfg, mesh: Mesh | None = None):
  """Stage 3: LM loss on answer tokens only, weighed by config.loss_reduction (losses.lm_loss). batch:
  pixel_values [B, K, S, S, 3] (K tile slots), input_ids / attention_mask / loss_mask [B, T]. A mixture-of-experts
  language model adds router_aux_loss_coef (its config's, i.e. the checkpoint's) x the router load-balancing
  loss, as transformers' Qwen3-MoE does. key: the LoRA dropout stream only (models/lora.py; the vision tower's
  drop-path / dropout stay off in stage 3), used when config.lora_dropout > 0."""
  lora_key = None if key is None else jax.random.fold_in(key, LORA_STREAM)
  out, targets, mask = _instruct_forward(model, batch, lora_key)
  reduction = "token" if cfg is None else cfg.get("loss_reduction", "token")  # cfg None: a bare call (tests)
  loss, metrics = losses.lm_loss(out.logits, targets, mask, reduction, batch.get("segment_ids"))
  if out.aux_loss is not None:
    coef = float(model.config.language.get("router_aux_loss_coef", 0.0))
    metrics = dict(metrics, loss_lm=loss, router_aux_loss=out.aux_loss)
    loss = loss + coef * out.aux_loss
  if "segment_ids" in batch:  # packed rows: examples in the batch (a row's segments are numbered 1..n)
    metrics = dict(metrics, examples=jnp.sum(jnp.max(batch["segment_ids"], axis=1)).astype(jnp.float32))
  return loss, metrics


def _instruct_forward(model, batch: dict, lora_key=None):
  """(model output, targets [B, T], counted-target mask [B, T] bool) of a stage-3 batch, packed or not."""
  px = batch["pixel_values"]
  # packed rows (data/packing.py): pixel_values [N, S, S, 3] (the tile budget), segment_ids / vision_index [B, T]
  packed = {k: batch[k] for k in ("segment_ids", "vision_index") if k in batch}
  out = model(batch["input_ids"], px.reshape((-1,) + px.shape[-3:]), batch["attention_mask"], lora_key=lora_key,
              **packed)
  targets, mask = losses.shift_for_next_token(batch["input_ids"], batch["loss_mask"])
  return out, targets, mask


LOSS_FNS = {"contrastive": contrastive_loss_fn, "alignment": alignment_loss_fn, "instruct": instruct_loss_fn}


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over sharding.BATCH_AXES ('data', 'fsdp', 'expert'); the rest replicated."""
  return NamedSharding(mesh, P(tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)))


def make_train_step(setup: state_lib.StateSetup, cfg: ml_collections.ConfigDict) -> Callable:
  """jit(state, batch) -> (state, metrics); the state is donated. config.contrastive_accum_steps > 1 computes the
  stage-1 / stage-2 gradient in chunks of the batch against one global contrastive loss (contrastive_accum.py)."""
  loss_fn = LOSS_FNS[cfg.task]
  graphdef = setup.graphdef
  base_key = jax.random.key(cfg.seed)
  accum = cfg.get("grad_accum_steps", 1)
  chunks = cfg.get("contrastive_accum_steps", 1)  # > 1: the batch in chunks, one contrastive loss (GradCache)

  def step(state, batch):
    # the mesh in context turns on the models' activation constraints (sharding.constrain) while tracing
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
      return _step(state, batch)

  def _step(state, batch):
    key = jax.random.fold_in(base_key, state["step"]) if cfg.get("dropout_rng", True) else None

    def compute(params):
      model = state_lib.merge_model(graphdef, {"params": params, "frozen": state["frozen"]})
      return loss_fn(model, batch, key, cfg, setup.mesh)

    if chunks > 1:
      (loss, metrics), grads = contrastive_accum.value_and_grad(graphdef, state["params"], state["frozen"], batch,
                                                                key, cfg, setup.mesh, chunks,
                                                                setup.shardings["params"])
    else:
      (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
    grads = freezing.apply_layer_masks(grads, setup.layer_masks)  # frozen layers of partly trained leaves
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(state, step=state["step"] + 1, params=keep(params, state["params"]),
                     opt_state=keep(opt_state, state["opt_state"]),
                     bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1),
                     skipped=state["skipped"] + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=setup.schedule(state["step"] // accum),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  return jax.jit(step, in_shardings=(setup.shardings, batch_sharding(setup.mesh)),
                 out_shardings=(setup.shardings, None), donate_argnums=0)


def make_embed_step(setup: state_lib.StateSetup) -> Callable:
  """jit(params, frozen, batch) -> (image embeddings [B, E], text embeddings [B, E]) for contrastive models."""

  def embed(params, frozen, batch):
    model = state_lib.merge_model(setup.graphdef, {"params": params, "frozen": frozen})
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
      return model.encode_image(batch["pixel_values"]), model.encode_text(batch["input_ids"], batch["attention_mask"])

  return jax.jit(embed, in_shardings=(setup.shardings["params"], setup.shardings["frozen"],
                                      batch_sharding(setup.mesh)))


def lm_eval_outputs(model, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per row of a stage-3 batch (packed rows too): (loss sum [B] float32, counted tokens [B], exact examples [B],
  examples [B]). An example (a row, or one segment of a packed row) is exact when it has counted tokens and every
  one of them (and the end-of-turn token) is the argmax given the true prefix, which for greedy decoding is the
  same as generating exactly the answer."""
  out, targets, mask = _instruct_forward(model, batch)
  logits = out.logits.astype(jnp.float32)
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  exact, counted, present = losses.example_exact_match(jnp.argmax(logits, -1) == targets, mask,
                                                       batch.get("segment_ids"))
  return (jnp.sum(jnp.where(mask, ce, 0.0), 1), jnp.sum(mask, 1), jnp.sum(exact & (counted > 0) & present, 1),
          jnp.sum(present, 1))


def make_lm_eval_step(setup: state_lib.StateSetup, cfg: ml_collections.ConfigDict) -> Callable:
  """jit(params, frozen, batch) -> lm_eval_outputs: per row (loss sum [B], counted tokens [B], exact examples
  [B], examples [B])."""

  def evaluate(params, frozen, batch):
    return lm_eval_outputs(state_lib.merge_model(setup.graphdef, {"params": params, "frozen": frozen}), batch)

  return jax.jit(evaluate, in_shardings=(setup.shardings["params"], setup.shardings["frozen"],
                                         batch_sharding(setup.mesh)))
