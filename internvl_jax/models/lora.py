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
adds the scaling. The base layer keeps its own parameter paths (q/kernel, q/bias), so converters, init_from and
base checkpoints see the same tree; the adapters sit beside them (q/lora/lora_a, q/lora/lora_b).

Initialisation as peft: B = 0 (the adapted model starts equal to the base model), A kaiming-uniform with
a = sqrt(5), i.e. uniform(+-1/sqrt(in)), which is variance_scaling(1/3, fan_in, uniform) on [in, r].

Config (per tower, set from the run config by train/freezing.py): lora_rank (0 = off), lora_alpha.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PEFT_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRALinear(nnx.Linear):
  """nnx.Linear plus a scaled LoRA adapter. kernel [in, out] (+ bias [out]); lora.lora_a [in, r], lora.lora_b
  [r, out]. __call__: [..., in] -> [..., out] = linear(x) + (alpha / r) * (x @ A) @ B, in `dtype`."""

  def __init__(self, in_features: int, out_features: int, names: tuple[str | None, str | None], *, rank: int,
               alpha: float, rngs: nnx.Rngs, dtype=jnp.float32, **linear_kw):
    super().__init__(in_features, out_features, dtype=dtype, rngs=rngs, **linear_kw)
    self.lora = nnx.LoRA(in_features, rank, out_features, dtype=dtype, param_dtype=jnp.float32,
                         a_initializer=PEFT_A_INIT, a_metadata={"out_sharding": (names[0], None)},
                         b_metadata={"out_sharding": (None, names[1])}, rngs=rngs)
    self.scaling = float(alpha) / rank

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(x, out_sharding=out_sharding)
    return y + (self.scaling * self.lora(x)).astype(y.dtype)


def lora_args(cfg) -> tuple[int, float] | None:
  """(rank, alpha) of a tower config (fields lora_rank, lora_alpha; alpha 0 = 2 * rank), or None when off."""
  rank = int(cfg.get("lora_rank", 0) or 0)
  return (rank, float(cfg.get("lora_alpha", 0) or 2 * rank)) if rank else None


def merge_params(tree: dict, scaling: float) -> dict:
  """A nested dict of numpy arrays with every adapter merged into its base kernel and dropped:
  kernel + scaling * A @ B (batched over leading axes such as 'layers'). For a model built without LoRA."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and "lora" in v and "kernel" in v:
      a, b = np.asarray(v["lora"]["lora_a"], np.float64), np.asarray(v["lora"]["lora_b"], np.float64)
      kernel = np.asarray(v["kernel"])
      merged = kernel.astype(np.float64) + scaling * np.einsum("...ir,...ro->...io", a, b)
      out[k] = dict({n: x for n, x in v.items() if n != "lora"}, kernel=merged.astype(kernel.dtype))
    elif isinstance(v, dict):
      out[k] = merge_params(v, scaling)
    else:
      out[k] = v
  return out


def merge_chat_params(tree: dict, model_cfg) -> tuple[dict, object]:
  """A chat model's variables (nested dict) with each tower's adapters merged at that tower's alpha / r, and the
  model config without LoRA that those variables fit (to export or serve a LoRA run as a plain model)."""
  out, cfg = dict(tree), model_cfg.copy_and_resolve_references()
  for tower in ("language", "vision"):
    args = lora_args(model_cfg[tower])
    if args and tower in out:
      out[tower] = merge_params(out[tower], args[1] / args[0])
    with cfg.unlocked():
      cfg[tower].lora_rank, cfg[tower].lora_alpha = 0, 0.0
  return out, cfg
