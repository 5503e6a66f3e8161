"""Stage 3: instruction tuning of the chat model — LM loss on answer tokens only; the vision tower is frozen by
default (no gradients, no optimizer state); projector + language model are trained. The official fine-tuning
switches (freeze_backbone, unfreeze_vit_layers, freeze_mlp, freeze_llm, unfreeze_lm_head, use_llm_lora,
use_backbone_lora, lora_alpha, loss_reduction) are fields of this config (defaults.add_finetune_fields).

  python train.py --config configs/instruct.py:model=tiny --workdir DIR
  models: tiny | seed_1b | internvl2_1b_like | internvl2_4b | internvl3_9b
"""

from internvl_jax.train import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg)
  return defaults.base_config("instruct", args.get("model", "tiny"))
