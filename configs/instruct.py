"""Stage 3: instruction tuning of the chat model — LM loss on answer tokens only; the vision tower is frozen by
default (no gradients, no optimizer state); projector + language model are trained.

  python train.py --config configs/instruct.py:model=tiny --workdir DIR
  models: tiny | seed_1b | internvl2_1b_like | internvl2_4b | internvl3_9b
"""

from internvl_jax.train import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg)
  return defaults.base_config("instruct", args.get("model", "tiny"))
