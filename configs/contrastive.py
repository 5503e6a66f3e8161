"""Stage 1: contrastive image-text training (symmetric InfoNCE, learnable temperature; the negatives of each
example are all other examples of the global batch).

  python train.py --config configs/contrastive.py:model=tiny --workdir DIR
  models: tiny | seed_300m | seed_1b | seed_6b | internvit_300m | internvit_6b | tiny_internvl_c | internvl_c | ...

Image-text keys (train/defaults.add_image_text_fields; also in configs/alignment.py):
  loss             'softmax' (default): symmetric InfoNCE with exp(logit_scale). 'sigmoid': SigLIP's pairwise loss,
                   logits = t * image @ text.T + b, +1 on the diagonal and -1 elsewhere, -sum log_sigmoid / B; the
                   model gets a learnable logit_bias (model.logit_bias_init, default -10) and logit_scale starts at
                   log 10 (t = 10); t and b are logged. With the batch split over devices (sharded_contrastive_loss,
                   default on) it runs as a ring: text shards passed by ppermute, [B/n, B/n] logits per device.
  lock_vision      LiT: the image tower (`vision`) locked: no gradient, no optimizer state, bit-identical
  lock_text        the text tower (`text`) locked likewise
  unlock_last_n    N > 0: the last N layers of each locked tower train (its embeddings and final norm stay locked)
  e.g. --config.loss=sigmoid --config.lock_vision=True --config.init.path=STAGE1_WORKDIR

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
