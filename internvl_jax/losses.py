"""Training losses: symmetric InfoNCE with a learnable temperature, the sigmoid pairwise loss of SigLIP, and a
masked language-model loss.

All compute in float32 whatever the activation dtype. Under jit with a batch sharded over the mesh, the
similarity matrix is formed over the *global* batch, so the negatives of every example are all other examples of
the global batch. `contrastive_loss` / `sigmoid_loss` leave the layout of the [B, B] logits to XLA (which may
replicate them); `sharded_contrastive_loss` computes each device's rows where its batch shard lives (memory
B_local x B per device); `sharded_sigmoid_loss` passes the text shards around a ring (memory B_local x B_local).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from internvl_jax import sharding


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropies over the batch.

  image_emb, text_emb: [B, E] (unit-norm, as the models return them); scale: [] the multiplier exp(s)
  (already exponentiated). Row i of the logits [B, B] = scale * <image_i, text_j>; the target is j = i.
  Returns (loss [], metrics with per-direction losses and in-batch top-1 accuracies).
  """
  img = image_emb.astype(jnp.float32)
  txt = text_emb.astype(jnp.float32)
  logits = jnp.asarray(scale, jnp.float32) * img @ txt.T  # [B, B]
  labels = jnp.arange(logits.shape[0])
  i2t = _cross_entropy(logits, labels)
  t2i = _cross_entropy(logits.T, labels)
  loss = 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
  metrics = {
      "loss_i2t": jnp.mean(i2t), "loss_t2i": jnp.mean(t2i),
      "acc_i2t": jnp.mean(jnp.argmax(logits, axis=1) == labels), "acc_t2i": jnp.mean(jnp.argmax(logits, axis=0) == labels),
      "logit_scale": jnp.asarray(scale, jnp.float32),
  }
  return loss, metrics


def batch_axes_of(mesh: Mesh, axes: Sequence[str] = sharding.BATCH_AXES) -> tuple[str, ...]:
  """The mesh axes (of `axes`) the batch is split over, dropping those of size 1 (sharding.batch_axes)."""
  return sharding.batch_axes(mesh, axes)


def sharded_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, mesh: Mesh,
                             batch_axes: Sequence[str] = sharding.BATCH_AXES) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE whose similarity rows are computed where the batch lives; same value, gradients and
  metrics as `contrastive_loss` on the full batch.

  image_emb, text_emb: [B, E] global arrays whose leading axis is split over `batch_axes` of `mesh` (B must
  divide by their product n); scale: [] (already exponentiated). Under shard_map each device holds b = B / n rows
  of both towers, gathers the other tower ([B, E]: cheap next to the towers) and forms only its [b, B] block of
  logits in each direction, so its temporaries are O(b * B) rather than O(B * B). The gradient flows back to
  the other devices' rows through all_gather's transpose (a reduce-scatter). Returns (loss [], metrics).
  """
  axes = batch_axes_of(mesh, batch_axes) or tuple(batch_axes[:1])
  n = image_emb.shape[0]

  def local(img, txt, s):
    b = img.shape[0]
    img, txt, s = img.astype(jnp.float32), txt.astype(jnp.float32), s.astype(jnp.float32)
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)  # [B, E], shards in mesh order = global row order
    all_img = jax.lax.all_gather(img, axes, tiled=True)
    labels = jax.lax.axis_index(axes) * b + jnp.arange(b)  # global index of this device's rows

    def ce_sum(logits):  # [b, B] -> (sum of row cross-entropies, number of top-1 hits)
      picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
      return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked), jnp.sum(jnp.argmax(logits, 1) == labels)

    i2t, acc_i2t = ce_sum(s * img @ all_txt.T)  # rows of the [B, B] logits
    t2i, acc_t2i = ce_sum(s * txt @ all_img.T)  # rows of its transpose
    return jax.lax.psum(jnp.stack([i2t, t2i, acc_i2t.astype(jnp.float32), acc_t2i.astype(jnp.float32)]), axes)

  spec = P(axes)
  total = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())(
      image_emb, text_emb, jnp.asarray(scale, jnp.float32))
  loss = 0.5 * (total[0] + total[1]) / n
  metrics = {"loss_i2t": total[0] / n, "loss_t2i": total[1] / n, "acc_i2t": total[2] / n,
             "acc_t2i": total[3] / n, "logit_scale": jnp.asarray(scale, jnp.float32)}
  return loss, metrics


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array,
                 bias: jax.Array) -> tuple[jax.Array, dict]:
  """The pairwise sigmoid loss of SigLIP (Zhai et al. 2023): every image-text pair of the batch is a binary
  question "do these match?", with no normalisation over the batch.

  image_emb, text_emb: [B, E] (unit-norm, as the models return them); scale: [] t = exp(t') (already
  exponentiated); bias: [] b. logits = t * image @ text.T + b [B, B]; label z_ij = +1 on the diagonal, -1 elsewhere;
  loss = -sum_ij log_sigmoid(z_ij * logits_ij) / B. Returns (loss [], metrics: its matching-pair and non-matching
  parts loss_pos / loss_neg, in-batch top-1 accuracies acc_i2t / acc_t2i, logit_scale t, logit_bias b).
  """
  img, txt = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  t, b = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
  logits = t * img @ txt.T + b  # [B, B]
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  terms = -jax.nn.log_sigmoid(jnp.where(eye, logits, -logits))
  pos, neg = jnp.sum(jnp.where(eye, terms, 0.0)), jnp.sum(jnp.where(eye, 0.0, terms))
  labels = jnp.arange(n)
  metrics = {"loss_pos": pos / n, "loss_neg": neg / n,
             "acc_i2t": jnp.mean(jnp.argmax(logits, axis=1) == labels),
             "acc_t2i": jnp.mean(jnp.argmax(logits, axis=0) == labels), "logit_scale": t, "logit_bias": b}
  return (pos + neg) / n, metrics


def _running_argmax(best, idx, values, indices):
  """Keeps, per entry, the larger value (ties: the smaller index, as jnp.argmax over the whole row)."""
  take = (values > best) | ((values == best) & (indices < idx))
  return jnp.where(take, values, best), jnp.where(take, indices, idx)


def sharded_sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, bias: jax.Array, mesh: Mesh,
                         batch_axes: Sequence[str] = sharding.BATCH_AXES) -> tuple[jax.Array, dict]:
  """`sigmoid_loss` over the global batch without any device holding more than a [b, b] block of logits
  (b = B / n, n = the product of the mesh's `batch_axes`); same value, gradients and metrics.

  image_emb, text_emb: [B, E] global arrays whose leading axis is split over `batch_axes`; scale [] t (already
  exponentiated), bias [] b. Under shard_map each device first scores its own images against its own texts (the
  only block with matching pairs), then the text shards travel one step around the ring (ppermute over the batch
  axes, n - 1 steps, the next shard's transfer independent of the current block so the two can overlap) and each
  device adds the terms of its images against every other shard's texts (all negatives). The loss sums the terms
  (psum) and divides by the global B. Gradients flow back around the ring through ppermute's transpose. The
  text-to-image accuracy's running argmax travels with its texts. Returns (loss [], metrics as sigmoid_loss).
  """
  axes = batch_axes_of(mesh, batch_axes) or tuple(batch_axes[:1])
  n = int(np.prod([mesh.shape[a] for a in axes]))
  total = image_emb.shape[0]
  ring = [(i, (i + 1) % n) for i in range(n)]  # device i hands its text shard on to device i + 1

  def local(img, txt, t, b):
    img, txt, t, b = (x.astype(jnp.float32) for x in (img, txt, t, b))
    m = img.shape[0]
    me = jax.lax.axis_index(axes)
    rows = jnp.arange(m)
    own = me * m + rows  # global indices of this device's images (and, at step 0, texts)

    def score(acc, txt_k, k):
      """Adds the block of this device's images x the text shard k steps up the ring (shard me - k)."""
      i_best, i_idx, t_best, t_idx, pos, neg = acc
      logits = t * img @ txt_k.T + b  # [m, m]
      positive = (rows[:, None] == rows[None, :]) & (k == 0)
      terms = -jax.nn.log_sigmoid(jnp.where(positive, logits, -logits))
      cols = ((me - k) % n) * m + rows
      i_best, i_idx = _running_argmax(i_best, i_idx, jnp.max(logits, 1), cols[jnp.argmax(logits, 1)])
      t_best, t_idx = _running_argmax(t_best, t_idx, jnp.max(logits, 0), own[jnp.argmax(logits, 0)])
      return (i_best, i_idx, t_best, t_idx, pos + jnp.sum(jnp.where(positive, terms, 0.0)),
              neg + jnp.sum(jnp.where(positive, 0.0, terms)))

    def step(carry, k):
      txt_k, acc = carry
      nxt = jax.lax.ppermute(txt_k, axes, ring)  # needs nothing from this block: may overlap with it
      i_best, i_idx, t_best, t_idx, pos, neg = score(acc, txt_k, k)
      t_best, t_idx = jax.lax.ppermute((t_best, t_idx), axes, ring)  # the texts' argmax travels with them
      return (nxt, (i_best, i_idx, t_best, t_idx, pos, neg)), None

    start = (jnp.full((m,), -jnp.inf), jnp.full((m,), total), jnp.full((m,), -jnp.inf), jnp.full((m,), total),
             jnp.zeros(()), jnp.zeros(()))
    start = jax.lax.pcast(start, axes, to="varying")  # per-device values: the scan carry's type must say so
    (txt_k, acc), _ = jax.lax.scan(step, (txt, start), jnp.arange(n - 1))
    _, i_idx, _, t_idx, pos, neg = score(acc, txt_k, n - 1)
    held = ((me + 1) % n) * m + rows  # after n - 1 steps this device holds shard me - (n - 1) = me + 1
    hits = jnp.stack([jnp.sum(i_idx == own), jnp.sum(t_idx == held)]).astype(jnp.float32)
    return jax.lax.psum(jnp.concatenate([jnp.stack([pos, neg]), hits]), axes)

  spec = P(axes)
  t, b = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
  sums = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(image_emb, text_emb, t, b)
  metrics = {"loss_pos": sums[0] / total, "loss_neg": sums[1] / total, "acc_i2t": sums[2] / total,
             "acc_t2i": sums[3] / total, "logit_scale": t, "logit_bias": b}
  return (sums[0] + sums[1]) / total, metrics


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[N, C] float32 logits, [N] int labels -> [N] per-row cross-entropy (logsumexp form, stable)."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def shift_for_next_token(input_ids: jax.Array, loss_mask: jax.Array,
                         segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Targets for next-token prediction. input_ids, loss_mask [B, T] -> targets, mask [B, T] where position t
  holds token t + 1 (and whether it counts); the last position never counts. Pair with logits [B, T, V].
  segment_ids [B, T] (packed rows): the last token of an example never predicts the next example's first."""
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(bool)
  if segment_ids is not None:
    mask = mask & (jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1) == segment_ids)
  return targets, mask


def example_token_counts(mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """For a per-example loss reduction: mask [B, T] bool (the counted targets of shift_for_next_token),
  segment_ids [B, T] (packed rows; None: one example per row) -> float32 [B, T], at each position the number of
  counted tokens of its example (one example = one (row, segment) pair)."""
  mask = mask.astype(jnp.float32)
  if segment_ids is None:
    return jnp.broadcast_to(mask.sum(axis=1, keepdims=True), mask.shape)
  b, t = segment_ids.shape
  ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + segment_ids.astype(jnp.int32)).reshape(-1)
  counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=b * (t + 1))
  return counts[ids].reshape(b, t)


def example_exact_match(correct: jax.Array, mask: jax.Array,
                        segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Exact match per example, not per row: correct [B, T] bool (argmax == target), mask [B, T] bool (the counted
  targets of shift_for_next_token), segment_ids [B, T] (packed rows; None: one example per row) ->
  (exact [B, E] bool: none of the example's counted tokens is wrong, counted [B, E] int32: its counted tokens,
  present [B, E] bool: the example exists), E = 1 without segment_ids, else T (slot s - 1 = segment s of the row).
  A packed row holds several examples, and a row-wise all() would score them as one."""
  mask = mask.astype(bool)
  if segment_ids is None:
    b = mask.shape[0]
    return (jnp.all(correct | ~mask, axis=1)[:, None], jnp.sum(mask, axis=1, dtype=jnp.int32)[:, None],
            jnp.ones((b, 1), bool))
  b, t = segment_ids.shape
  ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + segment_ids.astype(jnp.int32)).reshape(-1)
  per = lambda x: jax.ops.segment_sum(x.reshape(-1).astype(jnp.int32), ids, num_segments=b * (t + 1)).reshape(
      b, t + 1)[:, 1:]  # segment 0 is padding
  wrong, counted, size = per(mask & ~correct), per(mask), per(jnp.ones_like(mask))
  return wrong == 0, counted, size > 0


LM_REDUCTIONS = ("token", "sample", "square")


def lm_token_weights(mask: jax.Array, reduction: str = "token", segment_ids: jax.Array | None = None) -> jax.Array:
  """Per-token loss weights [B, T] float32 of InternVL's loss_reduction (internvl_chat_finetune.len2weight): every
  counted token of example i weighs 1 ('token'), 1 / n_i ('sample') or 1 / sqrt(n_i) ('square', InternVL 2.5),
  n_i = the example's counted tokens; uncounted positions weigh 0. mask [B, T] bool; segment_ids [B, T]: packed
  rows, one example per (row, segment)."""
  if reduction not in LM_REDUCTIONS:
    raise ValueError(f"loss reduction {reduction!r} is not one of {LM_REDUCTIONS}")
  n = example_token_counts(mask, segment_ids)  # per (row, segment) for packed rows, else per row
  mask = mask.astype(jnp.float32)
  per_example = {"token": jnp.ones_like(n), "sample": 1.0 / jnp.maximum(n, 1.0),
                 "square": jax.lax.rsqrt(jnp.maximum(n, 1.0))}[reduction]
  return mask * per_example


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
            reduction: str = "token", segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Weighted cross-entropy over the positions where mask is true: sum(w * ce) / sum(w), w = lm_token_weights
  (the official normalisation by the weights' sum). 'token' is the token mean; 'sample' the mean over examples of
  each example's token mean; 'square' weighs example i by sqrt(n_i). Under jit the sums run over the global
  batch, which is the official loss_reduction_all_gather=True; with gradient accumulation each micro-batch is
  normalised on its own, as under the HF Trainer.

  logits [B, T, V] (any float dtype, computed in float32), targets [B, T] int, mask [B, T] bool, segment_ids [B, T]
  (packed rows: each segment its own example for 'sample' / 'square') or None.
  Returns (loss [], metrics: token accuracy, number of counted tokens, and per-example exact match, i.e. the
  share of examples (rows, or (row, segment) pairs of packed rows) whose every counted token is the argmax; an
  example with no counted token counts as a match).
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(bool)
  ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.sum(mask)
  w = lm_token_weights(mask, reduction, segment_ids)
  loss = jnp.sum(jnp.where(mask, ce * w, 0.0)) / jnp.maximum(jnp.sum(w), 1e-12)
  correct = jnp.argmax(logits, axis=-1) == targets
  exact, _, present = example_exact_match(correct, mask, segment_ids)
  metrics = {
      "token_acc": jnp.sum(correct & mask) / jnp.maximum(n, 1),
      "exact_match": jnp.sum(exact & present) / jnp.maximum(jnp.sum(present), 1),
      "tokens": n.astype(jnp.float32),
  }
  return loss, metrics
