"""Contrastive gradient accumulation (GradCache; open_clip's --accum-freq): a large contrastive batch on small
memory, with every example's negatives still the whole global batch.

config.contrastive_accum_steps = K > 1 splits the global batch [B] of one train step into K chunks of B / K rows
and, inside the one jitted step:
  1. runs the towers on each chunk without gradients (lax.map: one chunk's activations alive at a time) and keeps
     only the embeddings [B, E];
  2. evaluates the loss head (steps.contrastive_head: the contrastive loss over the mesh's batch axes) once on all
     B embeddings and differentiates it with respect to the embeddings and the parameters. The head reads the
     loss's own parameters (the logit scale, or any other it reads) from the model, so they get their gradient
     here without being named;
  3. re-runs the towers on each chunk under jax.vjp, pulls back that chunk's embedding gradients and sums the
     parameter gradients over the chunks (lax.scan).
The train step then applies one optimizer update. Loss, metrics and gradients equal those of one step on the whole
batch (tests/test_contrastive_accum.py), while the towers' activation memory is that of one chunk.

Chunk c holds rows c, c + K, c + 2K, ... so that with the batch split over n devices every chunk is spread over all
of them (B / K must be a multiple of n; no data moves between devices); the embeddings return to the original row
order before the loss. Each chunk's dropout / drop-path key is fold_in(step key, c), the same in passes 1 and 3;
with dropout on, the masks therefore differ from those of an unchunked step (an equally random draw).

Stage 2 (alignment) works too: the caption LM loss is a sum over tokens, so each chunk adds its token sum divided by
the global number of caption tokens (known from the batch alone), pulled back together with its embeddings.
Combined with config.grad_accum_steps = M (optax.MultiSteps), each data batch of B rows is one contrastive batch
(negatives: B) and M such batches are averaged into one update.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from internvl_jax import losses, sharding
from internvl_jax.train import state as state_lib

TASKS = ("contrastive", "alignment")


def check_chunks(batch_size: int, k: int, shards: int) -> None:
  """One-line ValueError unless B splits into k chunks whose rows split evenly over the `shards` batch shards."""
  if k < 1 or batch_size % k or (batch_size // k) % shards:
    raise ValueError(f"config.batch_size={batch_size} does not split into contrastive_accum_steps={k} chunks that "
                     f"are each a multiple of the {shards} batch shards (mesh data x fsdp x expert); use a batch "
                     f"size that is a multiple of {k * shards} or change contrastive_accum_steps")


def to_chunks(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B / k, ...], chunk c = rows c, c + k, ...: every device's rows hold B / (k n) of each chunk."""
  y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))


def from_chunks(y: jax.Array) -> jax.Array:
  """The inverse of to_chunks: [k, B / k, ...] -> [B, ...] in the original row order."""
  x = jnp.swapaxes(y, 0, 1).reshape((y.shape[0] * y.shape[1],) + y.shape[2:])
  return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _towers(task: str, cfg, batch: dict) -> tuple[Callable, tuple[str, ...]]:
  """((model, chunk, key) -> ((img [b, E], txt [b, E]), additive loss [], additive metrics), the metrics' names):
  the chunk's embeddings plus its share of any loss that is a plain sum over examples (stage 2's caption loss,
  normalised by the whole batch's caption tokens)."""
  from internvl_jax.train import steps  # local: steps imports this module

  if task == "contrastive":
    return lambda model, chunk, key: (steps.contrastive_towers(model, chunk, key), jnp.zeros((), jnp.float32), {}), ()
  _, mask = losses.shift_for_next_token(batch["input_ids"], batch["attention_mask"])
  total = jnp.maximum(jnp.sum(mask).astype(jnp.float32), 1.0)  # the batch's caption tokens (losses.lm_loss's)

  def towers(model, chunk, key):
    img, txt, g_loss, g_metrics = steps.alignment_towers(model, chunk, key)
    share = g_metrics["tokens"] / total  # the chunk's token mean -> its part of the batch's token mean
    extra = {"loss_caption": g_loss * share, "caption_token_acc": g_metrics["token_acc"] * share}
    return (img, txt), cfg.caption_weight * extra["loss_caption"], extra

  return towers, ("loss_caption", "caption_token_acc")


def value_and_grad(graphdef, params, frozen, batch: dict, key, cfg, mesh: Mesh | None, k: int,
                   grad_shardings=None):
  """((loss [], metrics), grads like params) of cfg.task's loss on `batch` computed in k chunks (module doc);
  equal to jax.value_and_grad of the task's loss function on the whole batch (dropout off). grad_shardings: the
  params' shardings, kept by the gradient accumulator."""
  if cfg.task not in TASKS:
    raise ValueError(f"config.contrastive_accum_steps chunks a contrastive batch; task {cfg.task!r} has no "
                     "contrastive loss (use grad_accum_steps)")
  from internvl_jax.train import steps  # local: steps imports this module

  check_chunks(batch["input_ids"].shape[0], k, 1 if mesh is None else sharding.batch_ways(mesh))
  towers, extra_names = _towers(cfg.task, cfg, batch)
  chunks = jax.tree.map(lambda x: to_chunks(x, k), batch)
  chunk_key = (lambda c: None) if key is None else (lambda c: jax.random.fold_in(key, c))
  model_of = lambda p: state_lib.merge_model(graphdef, {"params": p, "frozen": frozen})

  # 1. embeddings of every chunk, no gradients
  def embed(xs):
    chunk, c = xs
    return towers(model_of(params), chunk, chunk_key(c))[0]

  img, txt = jax.tree.map(from_chunks, jax.lax.map(embed, (chunks, jnp.arange(k))))

  # 2. the loss head on all embeddings: gradients w.r.t. them and w.r.t. the head's own parameters
  head = lambda p, a, t: steps.contrastive_head(model_of(p), a, t, cfg, mesh)
  (c_loss, metrics), (g_params, g_img, g_txt) = jax.value_and_grad(head, (0, 1, 2), has_aux=True)(params, img, txt)
  cot = (to_chunks(g_img, k), to_chunks(g_txt, k))
  if grad_shardings is not None:
    g_params = jax.lax.with_sharding_constraint(g_params, grad_shardings)

  # 3. per chunk: re-run the towers under vjp (same key as in 1) and pull back the embedding gradients
  def pull_back(carry, xs):
    grads, extra_loss, extra_metrics = carry
    chunk, c, g_a, g_t = xs
    (_, loss_c, metrics_c), vjp = jax.vjp(lambda p: towers(model_of(p), chunk, chunk_key(c)), params)
    (g,) = vjp(((g_a, g_t), jnp.ones_like(loss_c), jax.tree.map(jnp.zeros_like, metrics_c)))
    grads = jax.tree.map(jnp.add, grads, g)
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return (grads, extra_loss + loss_c, jax.tree.map(jnp.add, extra_metrics, metrics_c)), None

  zero = jnp.zeros((), jnp.float32)
  carry = (g_params, zero, {name: zero for name in extra_names})
  (grads, extra_loss, extra_metrics), _ = jax.lax.scan(pull_back, carry, (chunks, jnp.arange(k)) + cot)
  metrics = dict(metrics, **extra_metrics)
  if cfg.task == "alignment":
    metrics["loss_contrastive"] = c_loss
  return (c_loss + extra_loss, metrics), grads
