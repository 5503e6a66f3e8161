"""Weight-only post-training quantization for inference (int8 per output channel, int4 in groups), with qwix.

What it is for: memory. A quantized linear layer keeps int8 / int4 values plus float32 scales instead of float32
weights (about 4x / 8x smaller); the matmul itself still runs in floating point (qwix dequantizes the weight on the
fly), so any speed-up comes only from reading less weight memory (BENCHMARKS.md). Activations stay float; norms,
embeddings (looked up by gather, and used as the tied LM head) and the patch-embedding convolution stay float.

How it uses qwix (pinned in requirements.txt): qwix's PTQ provider (qwix.PtqProvider + qwix.quantize_model)
intercepts each dot_general and computes it against a quantized kernel stored as its `WithAux(QArray)` parameter.
qwix's own first-call initialisation cannot place those kernels in our models, because our layers are stacked
(models/stack.py: kernels [L, in, out] with logical names ('layers', ...)) and run through merged per-layer views
(scan, or the loop when scan_layers=False): qwix replaces the parameter on the transient per-layer module (lost
after the step) and first fails an assertion comparing the sliced [in, out] shape with the 3 stacked axis names.
So this module quantizes every selected kernel ONCE, on the whole stack, with qwix's own quantizer and qwix's own
"how" rule for a dot_general right-hand side (per-channel on every non-contracted axis, the layer axis included;
grouped along the contracted `in` axis for int4), stores it as qwix's WithAux parameter, and lets
qwix.quantize_model (skip_nnx_init) intercept the calls. Slicing a stacked WithAux per layer slices qvalue and
scale together, so scan and loop both work.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx
import qwix
# The PTQ parameter container and the dot_general "how" rule are not re-exported by qwix's top level; qwix is
# pinned, so these two imports are stable for this version.
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util as qwix_flax

from internvl_jax.models import lora as lora_lib

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_INT4_GROUP = 128


def _selected_paths(model: nnx.Module, vision: bool) -> list[tuple[tuple, nnx.Linear]]:
  """The nnx.Linear modules to quantize: everything outside the vision side (language model: attention q/k/v/o,
  MLP, a separate LM head), plus the vision tower and projector when vision=True. Not MoE routers (a small matrix
  whose rounding would move tokens between experts) nor LoRA layers (merge the adapters first; their A / B are
  plain parameters qwix would not see)."""
  out = []
  for path, mod in nnx.iter_modules(model):
    # plain dense layers (nnx.Linear, or layers.Linear: the same parameters with a CPU-friendly input layout);
    # not a LoRA layer, whose adapters qwix would not see
    if not isinstance(mod, nnx.Linear) or isinstance(mod, lora_lib.LoRALinear) or "router" in map(str, path):
      continue
    top = str(path[0]) if path else ""
    if top in ("vision", "projector") and not vision:
      continue
    out.append((path, mod))
  return out


def _how(kernel_ndim: int, qtype, group_size: int | None):
  """qwix's rule for a dot_general rhs whose contracted axis is ndim-2 (nnx.Linear's `in`, after any leading
  stacked-layer axes): per-channel scales on every other axis, tiles of group_size along `in` if given."""
  contract = kernel_ndim - 2
  dims = (((0,), (contract,)), ((), ()))
  return qwix_dot_general.get_how_to_quantize(dimension_numbers=dims, ndims=(2, kernel_ndim), for_lhs=False,
                                              tile_size=group_size, qtype=qtype)


def quantize(model: nnx.Module, mode: str = "int8", vision: bool = False, group_size: int | None = None) -> nnx.Module:
  """A weight-quantized copy of `model` (llm.Decoder or internvl.InternVLChat; the original is left unchanged).

  mode 'int8': symmetric absmax, one float32 scale per output channel (and per layer of a stack).
  mode 'int4': symmetric absmax in groups of `group_size` input rows (default 128, or the whole input width when
  it is smaller) per output channel. group_size with int8 makes int8 grouped too.
  vision: also quantize the vision tower's and the projector's linear layers (the patch convolution stays float).
  Nothing is run: the kernels are quantized directly. Returns the quantized model; call it or pass it to
  generate.generate like the original (its __call__ is qwix-intercepted; other methods, e.g. InternVLChat.embed
  called alone, are not).
  """
  if mode not in QTYPES:
    raise ValueError(f"quantize mode {mode!r} is not one of {sorted(QTYPES)}")
  if group_size is None and mode == "int4":
    group_size = DEFAULT_INT4_GROUP
  if group_size is not None and group_size <= 0:
    raise ValueError(f"group_size must be positive, got {group_size}")
  model = nnx.clone(model)
  targets = _selected_paths(model, vision)
  if not targets:
    raise ValueError(f"{type(model).__name__} has no linear layers to quantize")
  names = []
  for path, lin in targets:
    kernel = lin.kernel
    value = kernel.get_value()
    size_in = value.shape[-2]
    group = None if group_size is None else min(group_size, size_in)
    if group is not None and size_in % group:
      raise ValueError(f"group_size {group} does not divide the input width {size_in} of {'/'.join(map(str, path))}"
                       f"; pick a divisor of {size_in}")
    how = _how(value.ndim, QTYPES[mode], group)
    quantized = qwix_ptq.WithAux(qwix.quantize(value, how.qtype, channelwise_axes=how.channelwise_axes,
                                               tiled_axes=how.tiled_axes), how)
    # each leaf (qvalue, scale) becomes a Param carrying the kernel's logical axis names, as qwix's PTQ does
    lin.kernel = jax.tree.map(lambda v, k=kernel: qwix_flax.update_boxed(k, value=v), quantized)
    names.append(re.escape("/".join(map(str, path))))
  rule = qwix.QuantizationRule(module_path="|".join(names), weight_qtype=QTYPES[mode], tile_size=group_size)
  return qwix.quantize_model(model, qwix.PtqProvider([rule]), skip_nnx_init=True)


def param_bytes(model: nnx.Module) -> int:
  """Bytes of the model's parameters at their logical width (an int4 value counts half a byte, whatever the
  backend's storage)."""
  total = 0
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    bits = jnp.iinfo(leaf.dtype).bits if jnp.issubdtype(leaf.dtype, jnp.integer) else jnp.finfo(leaf.dtype).bits
    total += leaf.size * bits // 8
  return total
