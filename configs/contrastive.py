"""Stage 1: contrastive image-text training (symmetric InfoNCE, learnable temperature; the negatives of each
example are all other examples of the global batch).

  python train.py --config configs/contrastive.py:model=tiny --workdir DIR
  models: tiny | seed_300m | seed_1b | seed_6b | internvit_300m | internvit_6b | tiny_internvl_c | internvl_c | ...

A large contrastive batch on small memory: --config.contrastive_accum_steps=K (default 1 = off) computes each
step's gradient in K chunks of batch_size / K rows against ONE loss over the whole batch (GradCache; the negatives
stay all batch_size examples; the result equals the unchunked step). batch_size / K must be a multiple of the
mesh's data x fsdp x expert. Costs about one extra forward pass of the towers per step. grad_accum_steps, by
contrast, averages separate batches, each with only its own negatives.
"""

from internvl_jax.train import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg)
  return defaults.base_config("contrastive", args.get("model", "tiny"))
