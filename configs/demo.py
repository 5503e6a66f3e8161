"""The embedded demo: stage 1 (contrastive) then stage 3 (instruct) on the procedurally drawn `demo` world, sized
to train on 2 CPU cores in a few minutes and really learn (see README for the measured figures).

  python train.py --config configs/demo.py --workdir DIR        # DIR/stage1 and DIR/stage3
  override one stage: --config.stages.stage1.total_steps=500

Stage 3 starts from stage 1 (its vision tower, frozen; the tokenizer too) through config.init; "<workdir>" in a
path stands for the --workdir given to train.py.
"""

import ml_collections

from internvl_jax.train import defaults

IMAGE = 56  # 4 x 4 patches of 14 px; one shape per 2 x 2 patch cell


def _vision(v):
  v.hidden_size, v.num_layers, v.num_heads, v.mlp_dim, v.image_size = 96, 3, 4, 192, IMAGE
  return v


def stage1():
  c = defaults.base_config("contrastive", "tiny")
  _vision(c.model.vision)
  t = c.model.text
  t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.mlp_dim = 96, 2, 4, 4, 192
  c.model.embed_dim = 64
  c.data.train.size, c.data.eval.size = 8000, 500
  c.data.max_text_len = 12
  c.batch_size, c.eval_batch_size = 64, 100
  c.total_steps, c.warmup_steps, c.lr, c.weight_decay = 2000, 100, 2e-3, 0.01
  c.log_every, c.eval_every, c.checkpoint_every = 50, 500, 500
  return c


def stage3():
  c = defaults.base_config("instruct", "tiny")
  _vision(c.model.vision)
  lm = c.model.language
  # Width 128 (not 64): "where is the X?" needs the LM to compare two cells' tokens; at width 64 it stayed near
  # chance on those questions (held-out exact match 0.73 overall) while colour/shape questions were solved.
  lm.hidden_size, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.mlp_dim = 128, 2, 4, 4, 256
  c.init.path = "<workdir>/stage1"
  c.data.train.size, c.data.eval.size = 8000, 500
  c.data.max_text_len = 20
  c.batch_size, c.eval_batch_size = 64, 100
  c.total_steps, c.warmup_steps, c.lr, c.weight_decay = 1200, 50, 2e-3, 0.01
  c.log_every, c.eval_every, c.checkpoint_every = 50, 400, 400
  return c


def get_config(arg=None):
  defaults.parse_arg(arg, allowed=())  # no arguments yet; rejects malformed ones
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict({"stage1": stage1(), "stage3": stage3()})
  c.stage_order = ("stage1", "stage3")
  return c
