"""Prints the presets' sizes, counted abstractly (nothing is allocated):

  python -m internvl_jax.models.summary [vision|language|contrastive|chat] [NAME ...]
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from internvl_jax.models import internvl, llm, presets, vit

BUILDERS = {
    "vision": (presets.VISION, lambda n: vit.InternViT(presets.vision(n), rngs=nnx.Rngs(0))),
    "language": (presets.LANGUAGE, lambda n: llm.Decoder(presets.language(n), rngs=nnx.Rngs(0))),
    "contrastive": (presets._CONTRASTIVE, lambda n: internvl.InternVLContrastive(presets.contrastive(n),
                                                                                  rngs=nnx.Rngs(0))),
    "chat": (presets._CHAT, lambda n: internvl.InternVLChat(presets.chat(n), rngs=nnx.Rngs(0))),
}


def count_params(build) -> dict[str, int]:
  """Parameter count of a model built by `build()`, per top-level child and in total, without allocating."""
  abstract = nnx.eval_shape(build)
  counts: dict[str, int] = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    counts[str(path[0])] = counts.get(str(path[0]), 0) + int(np.prod(var.get_value().shape))
  counts["total"] = sum(counts.values())
  return counts


def main(argv: list[str]) -> None:
  kinds = [argv[0]] if argv and argv[0] in BUILDERS else list(BUILDERS)
  names = argv[1:] if argv and argv[0] in BUILDERS else argv
  print(f"{'kind':<12} {'preset':<18} {'parameters':>16}   parts")
  for kind in kinds:
    table, build = BUILDERS[kind]
    for name in (names or table):
      if name not in table:
        continue
      counts = count_params(lambda: build(name))
      parts = ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in counts.items() if k != "total")
      print(f"{kind:<12} {name:<18} {counts['total']:>16,}   {parts}")
  print(f"(jax {jax.__version__}, counted with nnx.eval_shape)")


if __name__ == "__main__":
  main(sys.argv[1:])
