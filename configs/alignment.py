"""Stage 2: contrastive + caption_weight * generative (caption LM loss) on the same image-text batch.

The seed variant adds a small causal caption decoder (its text tower is bidirectional); InternVL-C/G caption
through QLLaMA. Usually initialised from stage 1: --config.init.path=STAGE1_WORKDIR.

  python train.py --config configs/alignment.py:model=tiny --workdir DIR

--config.contrastive_accum_steps=K computes each step in K chunks against one contrastive loss over the whole batch
(the caption loss is split by tokens, so the step still equals the unchunked one); see configs/contrastive.py.
"""

from internvl_jax.train import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg)
  return defaults.base_config("alignment", args.get("model", "tiny"))
