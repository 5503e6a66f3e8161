"""Checks that turn config mistakes into one-line errors before anything compiles, and the small derivations of
the model config from the data (vocabulary size, image token id, input size)."""

from __future__ import annotations

import math

import jax
import ml_collections

from internvl_jax import sharding
from internvl_jax.train import freezing
from internvl_jax.train.state import TASKS


class ConfigError(ValueError):
  """A user-facing config mistake; the message names the field and the fix."""


def input_size(cfg: ml_collections.ConfigDict) -> int:
  """The image size fed to the model: config.model.image_size if set, else the vision preset's."""
  return int(cfg.model.get("image_size", 0) or cfg.model.vision.image_size)


def text_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return cfg.model.language if cfg.task == "instruct" else cfg.model.text


def tokens_per_tile(cfg: ml_collections.ConfigDict) -> int:
  """Vision tokens a chat model makes of one tile: (S / patch * downsample_ratio)^2."""
  grid = input_size(cfg) // cfg.model.vision.patch_size
  return int(round(grid * cfg.model.downsample_ratio)) ** 2


def adapt_model_to_tokenizer(cfg: ml_collections.ConfigDict, tok, *, built: bool) -> None:
  """A tokenizer built for this run sets the text vocabulary (rounded up to a multiple of 8); a given one must fit
  the model's. The chat model's image token id always comes from the tokenizer."""
  text = text_config(cfg)
  with cfg.unlocked():
    if built:
      text.vocab_size = int(math.ceil(tok.vocab_size / 8) * 8)
      if cfg.task == "alignment" and cfg.model.get("caption_decoder"):
        cfg.model.caption_decoder.vocab_size = text.vocab_size
    elif tok.vocab_size > text.vocab_size:
      raise ConfigError(f"tokenizer {tok.source} has {tok.vocab_size} tokens but model vocab_size is "
                        f"{text.vocab_size}; use the model's own tokenizer (config.tokenizer)")
    if cfg.task == "instruct":
      cfg.model.image_token_id = tok.image_token_id


def _heads(name: str, c: ml_collections.ConfigDict) -> None:
  if c.hidden_size % c.num_heads:
    raise ConfigError(f"model.{name}.num_heads={c.num_heads} does not divide model.{name}.hidden_size="
                      f"{c.hidden_size}; pick a divisor")
  if c.get("num_kv_heads") and c.num_heads % c.num_kv_heads:
    raise ConfigError(f"model.{name}.num_kv_heads={c.num_kv_heads} does not divide model.{name}.num_heads="
                      f"{c.num_heads}")


def make_checked_mesh(cfg: ml_collections.ConfigDict):
  bad = {k: v for k, v in dict(cfg.mesh).items() if not isinstance(v, int) or (v < 1 and v != -1)}
  if bad:
    name, value = next(iter(bad.items()))
    raise ConfigError(f"config.mesh.{name}={value} must be a positive number of devices or -1 (all that are left)")
  try:
    return sharding.make_mesh(dict(cfg.mesh))
  except ValueError as e:
    raise ConfigError(f"config.mesh {dict(cfg.mesh)} does not fit the {jax.device_count()} devices ({e}); "
                      "set one axis to -1 or change the sizes") from None


def _check_packing(cfg: ml_collections.ConfigDict) -> None:
  d = cfg.data
  if not d.get("packing", False):
    return
  if cfg.task != "instruct":
    raise ConfigError(f"config.data.packing packs instruct examples; the {cfg.task} stage has one per row, unset it")
  tiles, hosts, k = d.get("tiles_per_batch", 0), jax.process_count(), d.get("max_tiles", 1)
  if tiles < 0 or tiles % cfg.batch_size:  # a multiple of the batch splits over hosts and batch shards like it
    raise ConfigError(f"config.data.tiles_per_batch={tiles} must be 0 (derived from the data) or a positive "
                      f"multiple of config.batch_size={cfg.batch_size}")
  if tiles and tiles // hosts < k:
    raise ConfigError(f"config.data.tiles_per_batch={tiles} gives each of the {hosts} hosts fewer tiles than one "
                      f"example's data.max_tiles={k}; raise it to at least {k * hosts}")


def validate(cfg: ml_collections.ConfigDict, mesh) -> None:
  """Raises ConfigError naming the first bad field."""
  if cfg.task not in TASKS:
    raise ConfigError(f"config.task={cfg.task!r} is not one of {TASKS}")
  m = cfg.model
  _heads("vision", m.vision)
  _heads("language" if cfg.task == "instruct" else "text", text_config(cfg))
  size, patch = input_size(cfg), m.vision.patch_size
  if size % patch:
    raise ConfigError(f"model.image_size={size} is not a multiple of the patch size {patch}; use a multiple")
  if cfg.task == "instruct":
    from internvl_jax.data import templates  # local: only instruct runs need it
    if cfg.data.get("template", "plain") not in templates.NAMES:
      raise ConfigError(f"config.data.template={cfg.data.template!r} is not one of {', '.join(templates.NAMES)}")
    if m.mode != "replace":
      raise ConfigError("model.mode must be 'replace' for instruct training (image tokens in the prompt)")
    d = cfg.data
    if d.get("max_tiles", 1) < 1 or d.get("max_dynamic_patch", 0) < 0:
      raise ConfigError(f"config.data.max_tiles={d.get('max_tiles')} must be >= 1 and data.max_dynamic_patch="
                        f"{d.get('max_dynamic_patch')} >= 0 (0: max_tiles - 1)")
    if not 1 <= d.get("min_num_frame", 8) <= d.get("max_num_frame", 32):
      raise ConfigError(f"config.data.min_num_frame={d.get('min_num_frame')} and max_num_frame="
                        f"{d.get('max_num_frame')} must satisfy 1 <= min <= max")
    f = round(1 / m.downsample_ratio)
    if (size // patch) % f:
      raise ConfigError(f"model.image_size={size} gives a {size // patch}-patch grid that pixel shuffle "
                        f"(downsample_ratio {m.downsample_ratio}) cannot halve; use a multiple of {patch * f}")
  if cfg.task == "instruct":
    _finetune_fields(cfg)
  else:
    _image_text_fields(cfg)
  shards = sharding.batch_ways(mesh)
  for field in ("batch_size", "eval_batch_size"):
    if cfg[field] <= 0 or cfg[field] % shards:
      raise ConfigError(f"config.{field}={cfg[field]} is not a positive multiple of the {shards} batch shards "
                        f"(mesh data x fsdp x expert); change it or config.mesh")
  if cfg.batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size={cfg.batch_size} is not divisible by the {jax.process_count()} hosts")
  _check_packing(cfg)
  if cfg.total_steps <= 0:
    raise ConfigError(f"config.total_steps={cfg.total_steps} must be positive")
  if cfg.grad_accum_steps < 1:
    raise ConfigError(f"config.grad_accum_steps={cfg.grad_accum_steps} must be >= 1")
  _check_contrastive_accum(cfg, shards)
  for field in ("log_every", "checkpoint_every", "eval_every"):
    if cfg[field] < 0:
      raise ConfigError(f"config.{field}={cfg[field]} must be >= 0 (0 = only at the end)")
  for split in ("train", "eval"):
    src = cfg.data[split].source
    if src not in ("demo", "jsonl", "internvl", "tfds", "wds", ""):
      raise ConfigError(f"config.data.{split}.source={src!r} is not one of demo, jsonl, internvl, tfds, wds")
    if src == "wds" and split == "eval":
      raise ConfigError("config.data.eval.source=wds: evaluation reads a random-access split in order; use jsonl, "
                        "tfds or demo for data.eval (wds is for data.train and data.sources)")
    if src == "internvl" and cfg.task != "instruct":
      raise ConfigError(f"config.data.{split}.source=internvl (conversations) is for the instruct stage, not "
                        f"{cfg.task}; use jsonl or tfds")


def _check_contrastive_accum(cfg: ml_collections.ConfigDict, shards: int) -> None:
  from internvl_jax.train import contrastive_accum  # local: keeps this module light
  k = cfg.get("contrastive_accum_steps", 1)
  if k == 1:
    return
  if cfg.task not in contrastive_accum.TASKS:
    raise ConfigError(f"config.contrastive_accum_steps={k} chunks a contrastive batch; the {cfg.task} stage has no "
                      "contrastive loss, use grad_accum_steps")
  if not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.contrastive_accum_steps={k} must be an integer >= 1 (1 = off)")
  try:
    contrastive_accum.check_chunks(cfg.batch_size, k, shards)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _finetune_fields(cfg: ml_collections.ConfigDict) -> None:
  from internvl_jax import losses  # local: only instruct runs need it
  reduction = cfg.get("loss_reduction", "token")
  if reduction not in losses.LM_REDUCTIONS:
    raise ConfigError(f"config.loss_reduction={reduction!r} is not one of {', '.join(losses.LM_REDUCTIONS)}")
  layers = cfg.model.vision.num_layers
  n = int(cfg.get("unfreeze_vit_layers", 0) or 0)
  if not -layers <= n < layers:
    raise ConfigError(f"config.unfreeze_vit_layers={n} is outside the vision tower's {layers} layers; use a slice "
                      f"start in [-{layers}, {layers}) (e.g. -4 for the last 4)")
  for field in ("use_llm_lora", "use_backbone_lora"):
    if int(cfg.get(field, 0) or 0) < 0:
      raise ConfigError(f"config.{field}={cfg[field]} must be a LoRA rank >= 0 (0 = off)")
  if float(cfg.get("lora_alpha", 0) or 0) < 0:
    raise ConfigError(f"config.lora_alpha={cfg.lora_alpha} must be >= 0 (0 = 2 * rank)")
  base = str(cfg.get("lora_base_dtype", "float32") or "float32")
  if base not in freezing.BASE_DTYPES:
    raise ConfigError(f"config.lora_base_dtype={base!r} must be one of {', '.join(freezing.BASE_DTYPES)}")
  if base != "float32" and not freezing.uses_lora(cfg):
    raise ConfigError(f"config.lora_base_dtype={base!r} holds a LoRA base: set use_llm_lora or use_backbone_lora")
  if not 0.0 <= float(cfg.get("lora_dropout", 0) or 0) < 1.0:
    raise ConfigError(f"config.lora_dropout={cfg.lora_dropout} must be in [0, 1) (the official recipe uses 0.05)")


def _image_text_fields(cfg: ml_collections.ConfigDict) -> None:
  loss = cfg.get("loss", "softmax")
  if loss not in ("softmax", "sigmoid"):
    raise ConfigError(f"config.loss={loss!r} is not 'softmax' (InfoNCE) or 'sigmoid' (SigLIP)")
  n = int(cfg.get("unlock_last_n", 0) or 0)
  locked = [t for t in ("vision", "text") if cfg.get(f"lock_{t}", False)]
  if n < 0 or (n and not locked):
    raise ConfigError(f"config.unlock_last_n={n} must be >= 0 and unlocks layers of a locked tower; set "
                      "config.lock_vision or config.lock_text, or leave it 0")
  for tower in locked:
    layers = cfg.model[tower].num_layers
    if n > layers:
      raise ConfigError(f"config.unlock_last_n={n} is more than the {tower} tower's {layers} layers; use at most "
                        f"{layers}")
