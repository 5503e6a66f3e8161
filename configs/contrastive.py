"""Stage 1: contrastive image-text training (symmetric InfoNCE, learnable temperature; the negatives of each
example are all other examples of the global batch).

  python train.py --config configs/contrastive.py:model=tiny --workdir DIR
  models: tiny | seed_300m | seed_1b | seed_6b | internvit_300m | internvit_6b | tiny_internvl_c | internvl_c | ...
"""

from internvl_jax.train import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg)
  return defaults.base_config("contrastive", args.get("model", "tiny"))
