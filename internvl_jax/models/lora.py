"""LoRA adapters on dense layers: y = W x + b + (alpha / r) * B A x (peft's LoRA, the one InternVL's
wrap_llm_lora / wrap_backbone_lora apply with lora_alpha = 2 r).

Built on flax.nnx.LoRA (Flax's own, already a pinned dependency) rather than qwix's LoRA provider. nnx.LoRA
creates its A [in, r] and B [r, out] at construction as `nnx.LoRAParam`s (a Param subtype, so filters can pick
the adapters), with initialisers and per-parameter metadata we choose: inside the stacked layers (stack.stacked)
they get the leading 'layers' axis like every other weight, and logical axis names (A: (in, None), B: (None, out))
shard them by the same table as the base kernel. qwix (0.1.8) instead intercepts dot_general / einsum at call
time and creates the adapters lazily on a first traced call of the model, taking shardings from the concrete
weights; inside our scan over stacked layers the modules are rebuilt per step from sliced states, so adapters
made there would not gain the 'layers' axis. nnx.LoRA has no alpha / r scaling and no dropout: the subclass here
adds both. The base layer keeps its own parameter paths (q/kernel, q/bias), so converters, init_from and
base checkpoints see the same tree; the adapters sit beside them (q/lora/lora_a, q/lora/lora_b).

Initialisation as peft: B = 0 (the adapted model starts equal to the base model), A kaiming-uniform with
a = sqrt(5), i.e. uniform(+-1/sqrt(in)), which is variance_scaling(1/3, fan_in, uniform) on [in, r].

Dropout as peft's (lora_dropout, official recipe 0.05): on the input of the adapter branch only, training only,
y = W x + b + (alpha / r) * B A dropout(x), inverted (kept entries scaled by 1 / (1 - p)). The key comes from the
train step through the model (a `lora_key` argument, its own stream, apart from the vision tower's drop-path /
dropout key) to stack.run_stacked, which gives every layer of a scanned stack its own key (split over the layer
axis) and holds it in a scope (`dropout_scope`) while that layer runs; each adapter called in the scope draws
fold_in(layer key, i) for its call index i in the layer (q, k, v, o, gate, up, down: 0..6). Without a scope (eval,
generation) or with rate 0 the branch is exactly the dropout-free one. A scope instead of a key argument on every
layer call keeps the layers' signatures (attention, MLP, SwiGLU, MoE layers) free of an argument that only the
adapters read.

Config (per tower, set from the run config by train/freezing.py): lora_rank (0 = off), lora_alpha, lora_dropout.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.models import cpu_layout

PEFT_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# [layer key, adapter calls so far] of the layer running now (dropout_scope), or None (no dropout)
_SCOPE: contextvars.ContextVar[list | None] = contextvars.ContextVar("lora_dropout_scope", default=None)


@contextlib.contextmanager
def dropout_scope(key: jax.Array | None):
  """Adapters called inside draw their dropout masks from `key` (one layer's key; None: no dropout). Enter it
  inside the traced function (the scan / remat body) so no tracer outlives its trace."""
  token = _SCOPE.set(None if key is None else [key, 0])
  try:
    yield
  finally:
    _SCOPE.reset(token)


def next_key() -> jax.Array | None:
  """The key of the next adapter call in the current scope: fold_in(layer key, call index); None outside one."""
  scope = _SCOPE.get()
  if scope is None:
    return None
  key, scope[1] = jax.random.fold_in(scope[0], scope[1]), scope[1] + 1
  return key


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout of the adapter input x [..., in]: kept entries x / (1 - rate), others 0 (identity when
  rate == 0 or key is None). The mask is bernoulli(key, 1 - rate, x.shape)."""
  if rate <= 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class LoRALinear(nnx.Linear):
  """nnx.Linear plus a scaled LoRA adapter. kernel [in, out] (+ bias [out]); lora.lora_a [in, r], lora.lora_b
  [r, out]. __call__: [..., in] -> [..., out] = linear(x) + (alpha / r) * (dropout(x) @ A) @ B, in `dtype`;
  dropout (rate `dropout`) only inside a dropout_scope with a key (training)."""

  def __init__(self, in_features: int, out_features: int, names: tuple[str | None, str | None], *, rank: int,
               alpha: float, rngs: nnx.Rngs, dropout: float = 0.0, dtype=jnp.float32, **linear_kw):
    super().__init__(in_features, out_features, dtype=dtype, rngs=rngs, **linear_kw)
    self.lora = nnx.LoRA(in_features, rank, out_features, dtype=dtype, param_dtype=jnp.float32,
                         a_initializer=PEFT_A_INIT, a_metadata={"out_sharding": (names[0], None)},
                         b_metadata={"out_sharding": (None, names[1])}, rngs=rngs)
    self.scaling = float(alpha) / rank
    self.dropout_rate = float(dropout)

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is None:  # on CPU: one [N, in] matrix (cpu_layout.as_rows)
      return cpu_layout.as_rows(self._call, x)
    return self._call(x, out_sharding)

  def _call(self, x: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(x, out_sharding=out_sharding)
    if self.dropout_rate > 0.0:  # rate 0: no key drawn, the graph is exactly the dropout-free one
      x = dropout(x, self.dropout_rate, next_key())
    return y + (self.scaling * self.lora(x)).astype(y.dtype)


def lora_args(cfg) -> tuple[int, float, float] | None:
  """(rank, alpha, dropout) of a tower config (fields lora_rank, lora_alpha (0 = 2 * rank), lora_dropout), or
  None when off."""
  rank = int(cfg.get("lora_rank", 0) or 0)
  if not rank:
    return None
  return rank, float(cfg.get("lora_alpha", 0) or 2 * rank), float(cfg.get("lora_dropout", 0) or 0)


def wants_key(cfg) -> bool:
  """Whether a tower config's adapters use dropout (so its stacks need per-layer keys)."""
  args = lora_args(cfg)
  return bool(args and args[2] > 0)


def merge_params(tree: dict, scaling: float) -> dict:
  """A nested dict of numpy arrays with every adapter merged into its base kernel and dropped:
  kernel + scaling * A @ B (batched over leading axes such as 'layers'). For a model built without LoRA."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and "lora" in v and "kernel" in v:
      a, b = np.asarray(v["lora"]["lora_a"], np.float64), np.asarray(v["lora"]["lora_b"], np.float64)
      kernel = np.asarray(v["kernel"])
      merged = kernel.astype(np.float64) + scaling * np.einsum("...ir,...ro->...io", a, b)
      # a bfloat16 base (config.lora_base_dtype) merges into the adapters' float32, not back into bfloat16
      dtype = np.result_type(kernel.dtype, np.asarray(v["lora"]["lora_a"]).dtype)
      out[k] = dict({n: x for n, x in v.items() if n != "lora"}, kernel=merged.astype(dtype))
    elif isinstance(v, dict):
      out[k] = merge_params(v, scaling)
    else:
      out[k] = v
  return out


def merge_chat_params(tree: dict, model_cfg) -> tuple[dict, object]:
  """A chat model's variables (nested dict) with each tower's adapters merged at that tower's alpha / r, and the
  model config without LoRA that those variables fit (to export or serve a LoRA run as a plain model)."""
  out = dict(tree)
  for tower in ("language", "vision"):
    args = lora_args(model_cfg[tower])
    if args and tower in out:
      out[tower] = merge_params(out[tower], args[1] / args[0])
  return out, without_lora(model_cfg)


def without_lora(model_cfg):
  """A copy of a chat model config with LoRA off in both towers (the plain model a LoRA model merges into)."""
  cfg = model_cfg.copy_and_resolve_references()
  for tower in ("language", "vision"):
    with cfg.unlocked():
      cfg[tower].lora_rank, cfg[tower].lora_alpha, cfg[tower].lora_dropout = 0, 0.0, 0.0
  return cfg
