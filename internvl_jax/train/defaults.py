"""Default run configs shared by configs/*.py: every field train.py reads, with its default, in one place."""

from __future__ import annotations

import difflib

import ml_collections

from internvl_jax.models import captioning, presets

# stage -> (default learning rate, default warmup)
_STAGE_LR = {"contrastive": (1e-3, 200), "alignment": (5e-4, 200), "instruct": (2e-4, 100)}

# vision-tower names accepted as :model= for the image-text stages, mapped to a contrastive preset
_VISION_ALIASES = {"internvit_300m": ("seed_300m", "internvit_300m"), "internvit_6b": ("internvl_c", None)}


def parse_arg(arg: str | None, allowed: tuple[str, ...] = ("model",)) -> dict:
  """'model=tiny,foo=bar' -> {'model': 'tiny', 'foo': 'bar'}; a key outside `allowed` is an error with the
  nearest allowed name (a typo such as 'modle=' would otherwise silently train the default model)."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    if "=" not in part:
      raise ValueError(f"config argument {part!r} is not key=value (e.g. configs/contrastive.py:model=tiny)")
    k, v = part.split("=", 1)
    k = k.strip()
    if k not in allowed:
      near = difflib.get_close_matches(k, allowed, n=1)
      hint = f"did you mean {near[0]!r}? " if near else ""
      takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no arguments"
      raise ValueError(f"config argument {k!r} is not one this config file reads; {hint}{takes}")
    out[k] = v.strip()
  return out


def model_config(task: str, name: str) -> ml_collections.ConfigDict:
  """The model preset of a stage. Image-text stages: presets.contrastive names, plus internvit_300m / internvit_6b
  (the vision tower with its usual text tower). Instruct: presets.chat names."""
  if task == "instruct":
    cfg = presets.chat(name)
    cfg.freeze_vision = True
  else:
    preset, vision = _VISION_ALIASES.get(name, (name, None))
    cfg = presets.contrastive(preset)
    if vision:
      cfg.vision = presets.vision(vision)
    if task == "alignment" and cfg.variant == "seed":
      cfg.caption_decoder = captioning.caption_decoder_config(cfg)
  cfg.image_size = 0  # input size; 0 = the vision preset's (position embeddings are resized otherwise)
  _defaults_for_the_target(cfg)
  return cfg


# towers from this width up get full rematerialisation by default: InternViT-6B (3200) and 7B+ language models
# (3584 / 4096 ...), which do not fit 80 GB accelerators without it at their usual batch (docs/scaling.md: InternViT-6B
# stage 1 at fsdp=8, 32 images per chip: 221.8 GiB per device in float32 without remat, 39.7 GiB in bfloat16 + full)
LARGE_TOWER_WIDTH = 3200


def _defaults_for_the_target(cfg: ml_collections.ConfigDict) -> None:
  """Compute dtype 'auto' (bfloat16 on GPU / TPU, float32 on CPU; layers.auto_dtype) for towers left at the
  presets' float32, and remat 'full' for large towers left at 'none'. An explicit --config.model.*.dtype / remat
  wins; the planner resolves 'auto' for its --platform."""
  for key in ("vision", "text", "language", "caption_decoder"):
    if not cfg.get(key):
      continue
    tower = cfg[key]
    if tower.get("dtype", "float32") == "float32":
      tower.dtype = "auto"
    if tower.get("hidden_size", 0) >= LARGE_TOWER_WIDTH and tower.get("remat", "none") == "none":
      tower.remat = "full"


def base_config(task: str, model: str = "tiny") -> ml_collections.ConfigDict:
  lr, warmup = _STAGE_LR[task]
  c = ml_collections.ConfigDict()
  c.task = task
  c.model_name = model
  c.model = model_config(task, model)
  c.tokenizer = ""  # a tokenizer.json; empty: build one from the training texts (saved in the workdir)
  c.init = ml_collections.ConfigDict(dict(path="", partial=False))

  c.data = ml_collections.ConfigDict()
  c.data.train = ml_collections.ConfigDict(dict(source="demo", split="train", size=20000, path="", name="",
                                                data_dir="", image_key="image", caption_key="captions.text"))
  # source=wds (data/wds.py): path = shard patterns ('/d/{00000..00099}.tar,/e/*.tar'); caption_field = the
  # key.json field read when a sample has no key.txt; shuffle_buffer = samples per shuffle window; resampled =
  # shards drawn with replacement (endless, no epochs); shuffle_shards = shard order drawn anew each epoch
  c.data.train.update(dict(caption_field="caption", shuffle_buffer=1000, resampled=False, shuffle_shards=True))
  # a weighted mixture of named sources instead of data.train ('laion:0.7,coyo:0.3'); each name is a block of
  # data.sources defined in a config file, e.g. c.data.sources.laion = ConfigDict(dict(source='wds', path=...))
  c.data.train.mixture = ml_collections.FieldReference(None, field_type=object)  # a string, a dict or a list
  c.data.sources = ml_collections.ConfigDict()
  c.data.eval = ml_collections.ConfigDict(dict(source="demo", split="eval", size=512, path="", name="",
                                               data_dir="", image_key="image", caption_key="captions.text"))
  c.data.max_text_len = 64 if task == "instruct" else 32
  c.data.max_tiles = 1  # instruct: tile slots per example (dynamic tiling when > 1)
  # instruct: the dynamic-tiling cap (0: max_tiles - 1; an internvl meta dataset's own wins) and the frames a
  # video record is sampled to (uniform in [min, max] in training, at most max_tiles: one slot each)
  c.data.max_dynamic_patch = 0
  c.data.min_num_frame, c.data.max_num_frame = 8, 32
  # instruct: pack several examples per row (data/packing.py): each example takes only its own tiles and tokens;
  # a batch is batch_size rows of max_text_len tokens plus a global budget of tiles_per_batch tiles (0: derived
  # from 32 training records' tiles per token, see data/packing.default_tiles_per_batch; logged)
  c.data.packing = False
  c.data.tiles_per_batch = 0
  # conversation template (data/templates.py): 'plain' (our word-level tokenizer's markers) or a released one,
  # 'internvl2_5' | 'internlm2-chat' | 'Hermes-2' | 'phi3-chat' | 'internvl3_5_gpt_oss', for that release's tokenizer
  c.data.template = "plain"
  c.data.system_message = None  # None: the template's default system message (a record's system turn wins)
  # with system_message None and no system turn: False writes no system block at all (as the Jinja templates of
  # transformers-native -hf folders do; configs/finetune.py sets it from the folder)
  c.data.default_system_block = True
  c.data.augment = False  # random-resized-crop for training images
  c.data.max_bad_fraction = 0.05
  c.data.num_threads = 2

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  c.batch_size = 32  # global
  c.eval_batch_size = 64
  c.total_steps = 1000
  c.grad_accum_steps = 1
  if task != "instruct":
    # K > 1: each batch's gradient computed in K chunks (one chunk's activations in memory) against ONE contrastive
    # loss over the whole batch (train/contrastive_accum.py); grad_accum_steps instead averages separate batches
    c.contrastive_accum_steps = 1
  c.lr = lr
  c.warmup_steps = warmup
  c.min_lr_ratio = 0.0
  c.weight_decay = 0.05
  c.b1, c.b2, c.eps = 0.9, 0.98, 1e-6
  c.grad_clip = 1.0
  c.sharded_contrastive_loss = True  # the image-text loss computed per batch shard (losses.sharded_*_loss)
  c.caption_weight = 1.0  # alignment: loss = contrastive + caption_weight * caption LM loss
  if task != "instruct":
    add_image_text_fields(c)
  c.dropout_rng = True

  c.seed = 0
  c.log_every = 50
  c.eval_every = 0  # 0 = at the end only
  c.eval_limit = 0  # 0 = the whole eval split
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.max_bad_steps = 10  # non-finite steps in a row before training stops
  c.progress = True
  if task == "instruct":
    add_finetune_fields(c)
  return c


def add_image_text_fields(c: ml_collections.ConfigDict) -> None:
  """The image-text stages' loss and LiT switches (losses.py, train/freezing.py)."""
  # 'softmax': symmetric InfoNCE (CLIP, InternVL); 'sigmoid': SigLIP's pairwise loss, with a learnable bias
  # (model.logit_bias_init = -10) and the logit scale started at log 10 (train/state.run_model_config)
  c.loss = "softmax"
  c.lock_vision = False  # LiT: the image tower gets no gradient and no optimizer state
  c.lock_text = False  # the text tower likewise
  c.unlock_last_n = 0  # N > 0: the last N layers of each locked tower train


def add_finetune_fields(c: ml_collections.ConfigDict) -> None:
  """Stage 3's official fine-tuning switches (names as in InternVL's internvl_chat_finetune.py; train/freezing.py
  and models/lora.py say what each does)."""
  # None: model.freeze_vision (True by default here); True / False override it
  c.freeze_backbone = ml_collections.FieldReference(None, field_type=bool)
  c.unfreeze_vit_layers = 0  # n != 0: vision blocks[n:] train on a frozen tower (-4 = the last 4)
  c.freeze_mlp = False
  c.freeze_llm = False
  c.unfreeze_lm_head = False
  c.use_llm_lora = 0  # LoRA rank on the language model (q, k, v, o, gate, up, down); 0 = off
  c.use_backbone_lora = 0  # LoRA rank on the vision tower (qkv, proj, fc1, fc2); 0 = off
  c.lora_alpha = 0.0  # 0: 2 * rank, as the official wrap_llm_lora / wrap_backbone_lora
  c.lora_dropout = 0.0  # dropout on the adapters' input in training (peft's; the official recipe uses 0.05)
  # the dtype a LoRA run holds its frozen variables (the base) in: 'float32', or 'bfloat16' to halve their memory
  # (adapters, trained groups and optimizer state stay float32; compute promotes to each tower's dtype)
  c.lora_base_dtype = "float32"
  # 'token' (mean over answer tokens), 'sample' (each example's token mean, averaged over examples) or 'square'
  # (InternVL 2.5: token weights 1/sqrt(n_i) for an example of n_i answer tokens); losses.lm_loss
  c.loss_reduction = "token"
