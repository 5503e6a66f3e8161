"""Attention-pooling probe of a frozen vision tower: InternVL's `attention_pooling` classification head trained with
Optax on the tower's cached last-layer tokens.

  probe, log = train_attention_probe(train_tokens [N, T, D], train_labels [N], num_classes, num_heads)
  logits = predict(probe, test_tokens [M, T, D])                          # float32 [M, C]

Structure (OpenGVLab/InternVL at 2410d1d, `classification/models/intern_vit_6b.py`, `CLS_TARGET:
'attention_pooling'` in every `configs/attn_pooling_probing/*.yaml`): `AttentionPoolingBlock(dim=D,
num_heads=<the tower's heads>, qkv_bias=True, norm_layer=LayerNorm(eps=1e-5), out_dim=D)` over all T = 1 + N tokens of
the last block (class token included) — its query is the mean of the tokens (not a free parameter), LayerNorm'd
like keys and values, then learned q / k / v projections with biases, softmax(q k^T / sqrt(D / heads)) v and an
output Linear(D, D) — then `SyncBatchNorm(D, eps=1e-6)` and `Linear(D, classes)` initialised N(0, 0.01), bias 0.
heads.AttentionPooling is that block (the InternVL-C pooling layer has the same form).

Hyper-parameters (the same configs and `classification/config.py`, `main.py`, `optimizer.py`): SGD with Nesterov
momentum 0.9, BASE_LR 0.1 scaled by batch / 512, WEIGHT_DECAY 0, cosine decay to 0 after a 1-epoch linear warm-up
from 0 (per step), 10 epochs, gradient clipping at global norm 5, label smoothing 0.1; 64 GPUs x 16 images = 1024 per
step. Not reproduced, because the tokens are computed once from un-augmented images: RandomResizedCrop + flip, mixup /
cutmix, and the EMA (decay 0.998) copy whose accuracy the official log also reports. Defaults here: batch 1024 (or
the whole train split when smaller), lr 0.1 x batch / 512, 10 epochs.

Memory: the cached tokens are N x T x D values on the host (float32, or bfloat16 with --dtype bfloat16), e.g.
10,000 images x 257 x 1024 x 4 B = 10.5 GB for InternViT-300M at 224 px: a probe for sets of that order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from internvl_jax.models import heads

EPOCHS = 10
BATCH_SIZE = 1024  # 64 GPUs x 16
BASE_LR = 0.1  # per 512 images (linear scaling rule)
WARMUP_EPOCHS = 1
CLIP_GRAD = 5.0
LABEL_SMOOTHING = 0.1
MOMENTUM = 0.9


class AttentionProbe(nnx.Module):
  """tokens [B, T, D] -> logits float32 [B, C]: attention pooling (mean-token query) -> BatchNorm -> Linear."""

  def __init__(self, dim: int, num_heads: int, num_classes: int, *, rngs: nnx.Rngs):
    self.pool = heads.AttentionPooling(dim, num_heads, dim, rngs=rngs)
    # flax's momentum is the running average's decay: torch's default 0.1 update is 0.9 here
    self.norm = nnx.BatchNorm(dim, epsilon=1e-6, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.head(self.norm(self.pool(tokens.astype(jnp.float32)))).astype(jnp.float32)


def _loss(model: AttentionProbe, tokens, labels, smoothing: float):
  logits = model(tokens)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


@nnx.jit(static_argnums=(4,))
def _train_step(model, optimizer, tokens, labels, smoothing):
  loss, grads = nnx.value_and_grad(_loss)(model, tokens, labels, smoothing)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def train_attention_probe(tokens: np.ndarray, labels: np.ndarray, num_classes: int, num_heads: int, *,
                          epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, base_lr: float = BASE_LR,
                          warmup_epochs: float = WARMUP_EPOCHS, smoothing: float = LABEL_SMOOTHING, seed: int = 0,
                          progress: bool = True) -> tuple[AttentionProbe, dict]:
  """Trains a probe on cached tokens [N, T, D] (any float dtype, host memory) and int labels [N] with the official
  recipe (module docstring): batches of min(batch_size, N) drawn without replacement each epoch (the rest of an
  epoch dropped, as the official train loader), lr = base_lr x batch / 512. Returns (the probe in eval mode,
  {"steps", "batch_size", "lr", "final_loss"})."""
  tokens, labels = np.asarray(tokens), np.asarray(labels, np.int32)
  n, _, dim = tokens.shape
  if dim % num_heads:
    raise ValueError(f"attention probe: width {dim} is not divisible by {num_heads} heads")
  batch = min(batch_size, n)
  steps_per_epoch = n // batch
  total = max(1, epochs * steps_per_epoch)
  lr = base_lr * batch / 512
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, int(warmup_epochs * steps_per_epoch), total, 0.0)
  tx = optax.chain(optax.clip_by_global_norm(CLIP_GRAD), optax.sgd(schedule, momentum=MOMENTUM, nesterov=True))
  model = AttentionProbe(dim, num_heads, num_classes, rngs=nnx.Rngs(seed))
  model.train()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  loss = float("nan")
  with tqdm(total=total, desc="attention probe", disable=not progress, leave=False) as bar:
    for _ in range(epochs):
      perm = rng.permutation(n)
      for s in range(steps_per_epoch):
        idx = np.sort(perm[s * batch:(s + 1) * batch])  # sorted: contiguous-ish host reads
        loss = _train_step(model, optimizer, jnp.asarray(tokens[idx]), jnp.asarray(labels[idx]), smoothing)
        bar.update()
  model.eval()
  return model, {"steps": total, "batch_size": batch, "lr": lr, "final_loss": float(loss)}


def predict(model: AttentionProbe, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Logits float32 [M, C] of a trained probe (eval mode: BatchNorm's running statistics) on tokens [M, T, D]."""
  model.eval()
  out = [np.asarray(_logits(model, jnp.asarray(tokens[i:i + batch_size]))) for i in range(0, len(tokens), batch_size)]
  return np.concatenate(out)
