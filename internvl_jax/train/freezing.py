"""Which parameters stage 3 trains: the official InternVL fine-tuning switches (internvl_chat_finetune.py), on
the run config with the official names.

  freeze_backbone      the vision tower (InternViT) frozen; None = follow model.freeze_vision (stage default True)
  unfreeze_vit_layers  n != 0: on a frozen tower, the vision layers blocks[n:] train again. A Python slice, as the
                       official `vision_model.encoder.layers[n:]`: n = -4 trains the last 4 layers, n = 4 all but
                       the first 4
  freeze_mlp           the projector (official mlp1) frozen
  freeze_llm           the whole language model frozen (embeddings, layers, final norm, lm_head)
  unfreeze_lm_head     the lm_head trains even when the language model is frozen (or under LoRA); with tied
                       embeddings the head is the embedding table, which then trains
  use_llm_lora         LoRA rank on the language model (0 = off): its base weights frozen, the adapters train
  use_backbone_lora    LoRA rank on the vision tower (0 = off): likewise (models/lora.py)
  lora_alpha           adapter scale alpha / r (0 = the official 2 * rank)
  lora_dropout         dropout on the adapters' input in training (peft's; official recipe 0.05)
  lora_base_dtype      'float32' | 'bfloat16': the dtype the state holds a LoRA run's frozen variables in (the
                       base model; a bfloat16 base halves their memory, the trained ones stay float32)

The image-text stages (contrastive, alignment) have LiT's locked towers (Zhai et al. 2022) instead:

  lock_vision          the image tower (`vision`: InternViT with its pooling) locked
  lock_text            the text tower (`text`: the decoder or QLLaMA with its query tokens) locked
  unlock_last_n        N > 0: the last N layers of each locked tower train again (for QLLaMA also the cross-attention
                       layers among them); embeddings, final norms and pooling stay locked

The projections into the shared space, the logit scale / bias (and stage 2's caption decoder) always train. A
locked tower runs without drop-path or dropout (model_config sets its rates to 0).

Frozen parameters sit in the state's `frozen` (no gradient, no optimizer state). unfreeze_vit_layers and
unlock_last_n cut through a stacked parameter ([L, ...] with a leading 'layers' axis): those leaves stay in `params`
and a per-layer 0/1 mask zeroes their gradient before the optimizer and their update after it (AdamW's decoupled
weight decay would move a frozen layer otherwise), so the frozen layers stay bit-identical; their Adam moments exist
but stay zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

ADAPTER_LEAVES = ("lora_a", "lora_b")
GROUPS = ("vision", "text", "projector", "language", "lm_head", "adapters")
IMAGE_TEXT_TASKS = ("contrastive", "alignment")


@dataclasses.dataclass(frozen=True)
class Freezing:
  vision_base: bool  # vision tower base weights frozen
  vit_layers: int  # unfreeze_vit_layers (slice start over the vision 'layers' axis), 0 = none
  projector: bool
  language_base: bool
  lm_head: bool
  tied_head: bool  # the language model's head is its embedding table


def _freeze_backbone(cfg: ml_collections.ConfigDict) -> bool:
  backbone = cfg.get("freeze_backbone", None)
  return bool(cfg.model.get("freeze_vision", False)) if backbone is None else bool(backbone)


def resolve(cfg: ml_collections.ConfigDict) -> Freezing:
  """The effective switches of a run config (see the module doc)."""
  m = cfg.model
  backbone = _freeze_backbone(cfg)
  llm_lora, vit_lora = int(cfg.get("use_llm_lora", 0) or 0), int(cfg.get("use_backbone_lora", 0) or 0)
  language = bool(cfg.get("freeze_llm", False)) or llm_lora > 0
  lang = m.language
  return Freezing(vision_base=backbone or vit_lora > 0, vit_layers=int(cfg.get("unfreeze_vit_layers", 0) or 0),
                  projector=bool(cfg.get("freeze_mlp", False)), language_base=language,
                  lm_head=language and not cfg.get("unfreeze_lm_head", False),
                  tied_head=not (lang.get("lm_head", True) and not lang.get("tie_embeddings", False)))


@dataclasses.dataclass(frozen=True)
class Locks:
  """LiT switches of an image-text stage."""
  vision: bool
  text: bool
  unlock_last_n: int


def resolve_locks(cfg: ml_collections.ConfigDict) -> Locks:
  """config.lock_vision / lock_text / unlock_last_n of an image-text run (all off when absent)."""
  return Locks(vision=bool(cfg.get("lock_vision", False)), text=bool(cfg.get("lock_text", False)),
               unlock_last_n=int(cfg.get("unlock_last_n", 0) or 0))


def any_lock(cfg: ml_collections.ConfigDict) -> bool:
  return cfg.task in IMAGE_TEXT_TASKS and (resolve_locks(cfg).vision or resolve_locks(cfg).text)


def tower_layer_ids(model_cfg: ml_collections.ConfigDict, keys: tuple[str, ...]) -> tuple[str, list[int]] | None:
  """For a parameter of a contrastive model's layer stack: (tower, the tower layer index of each entry of its
  leading axis); None for any other parameter. Stacks: vision/blocks; text/layers (text/dense_layers when dense
  and MoE layers are mixed); QLLaMA text/decoder/layers and text/cross_attention (in layers 0, f, 2f, ...)."""
  from internvl_jax.models import moe  # local: the models are imported lazily here

  if keys[:2] == ("vision", "blocks"):
    return "vision", list(range(model_cfg.vision.num_layers))
  if keys[0] != "text":
    return None
  text = model_cfg.text
  if keys[1:2] == ("cross_attention",):
    return "text", list(range(0, text.num_layers, text.cross_attention_frequency))
  rest = keys[2:] if keys[1:2] == ("decoder",) else keys[1:]
  sparse = moe.moe_layer_ids(text)
  mixed = 0 < len(sparse) < text.num_layers
  if rest[:1] == ("layers",):
    return "text", list(sparse) if mixed else list(range(text.num_layers))
  if rest[:1] == ("dense_layers",):
    return "text", [i for i in range(text.num_layers) if i not in sparse]
  return None


def _lit_trainable(locks: Locks, model_cfg: ml_collections.ConfigDict, keys: tuple[str, ...]) -> bool:
  tower = {"vision": locks.vision, "text": locks.text}
  if not tower.get(keys[0], False):
    return True
  return locks.unlock_last_n > 0 and tower_layer_ids(model_cfg, keys) is not None


BASE_DTYPES = ("float32", "bfloat16")


def uses_lora(cfg: ml_collections.ConfigDict) -> bool:
  return cfg.task == "instruct" and bool(cfg.get("use_llm_lora", 0) or cfg.get("use_backbone_lora", 0))


def frozen_dtype(cfg: ml_collections.ConfigDict):
  """The dtype a run stores its frozen floating-point variables in: config.lora_base_dtype for a LoRA run, else
  None (as built, float32)."""
  name = str(cfg.get("lora_base_dtype", "float32") or "float32")
  return jnp.dtype(name) if uses_lora(cfg) and name != "float32" else None


def cast_frozen(frozen: dict, dtype) -> dict:
  """The frozen variables with every floating-point leaf cast to dtype (None: unchanged)."""
  if dtype is None:
    return frozen
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def lora_alpha(cfg: ml_collections.ConfigDict, rank: int) -> float:
  """config.lora_alpha, or the official 2 * rank when 0."""
  return float(cfg.get("lora_alpha", 0) or 2 * rank)


def model_config(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the model config carrying what the model itself must know: for a chat model LoRA (rank, alpha) per
  tower, and freeze_vision = no gradient needed through the vision tower at all (it is then cut by stop_gradient);
  for an image-text model with a locked vision tower, no drop-path or dropout in it."""
  out = ml_collections.ConfigDict(model_cfg.to_dict())
  if cfg.task in IMAGE_TEXT_TASKS and resolve_locks(cfg).vision:
    out.vision.drop_path_rate, out.vision.dropout = 0.0, 0.0  # a locked tower runs deterministically
  if cfg.task != "instruct":
    return out
  f = resolve(cfg)
  for tower, field in (("language", "use_llm_lora"), ("vision", "use_backbone_lora")):
    rank = int(cfg.get(field, 0) or 0)
    out[tower].lora_rank = rank
    out[tower].lora_alpha = lora_alpha(cfg, rank) if rank else 0.0
    out[tower].lora_dropout = float(cfg.get("lora_dropout", 0) or 0) if rank else 0.0
  out.freeze_vision = f.vision_base and f.vit_layers == 0 and not out.vision.lora_rank
  return out


def prepare(cfg: ml_collections.ConfigDict) -> None:
  """Pins the run config in place: freeze_backbone resolved (it may read model.freeze_vision, which model_config
  rewrites) and cfg.model = model_config(cfg, cfg.model). Idempotent."""
  backbone = _freeze_backbone(cfg)
  with cfg.unlocked():
    cfg.freeze_backbone = backbone
    cfg.model = model_config(cfg, cfg.model)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def group_of(path) -> str:
  """The table group of a parameter path (tuple of keys or 'a/b/c')."""
  keys = tuple(path.split("/")) if isinstance(path, str) else _keys(path)
  if keys[-1] in ADAPTER_LEAVES:
    return "adapters"
  if keys[0] == "language" and len(keys) > 1 and keys[1] == "lm_head":
    return "lm_head"
  return keys[0] if keys[0] in GROUPS else "other"


def _trainable(f: Freezing, keys: tuple[str, ...]) -> bool:
  group = group_of(keys)
  if group == "adapters":
    return True
  if group == "vision":
    return not f.vision_base or (f.vit_layers != 0 and len(keys) > 1 and keys[1] == "blocks")
  if group == "projector":
    return not f.projector
  if group == "lm_head":
    return not f.lm_head
  if group == "language":
    if f.tied_head and keys[1:2] == ("embed",):
      return not f.lm_head
    return not f.language_base
  return True


def trainable_filter(cfg: ml_collections.ConfigDict):
  """The nnx filter of the parameters to differentiate and optimise: stage 3's switches on a chat model, the LiT
  locks on an image-text model."""
  is_param = nnx.filterlib.to_predicate(nnx.Param)
  if cfg.task in IMAGE_TEXT_TASKS:
    locks = resolve_locks(cfg)
    return lambda path, x: is_param(path, x) and _lit_trainable(locks, cfg.model, _keys(path))
  f = resolve(cfg)
  return lambda path, x: is_param(path, x) and _trainable(f, _keys(path))


def layer_masks(cfg: ml_collections.ConfigDict, params) -> dict[str, np.ndarray]:
  """'path' -> bool [L] for every trainable leaf only some of whose layers train (unfreeze_vit_layers on a frozen
  tower: the vision blocks' base weights; unlock_last_n on a locked image-text tower: its layer stacks). params: the
  trainable tree (arrays or ShapeDtypeStructs)."""
  if cfg.task in IMAGE_TEXT_TASKS:
    return _lit_layer_masks(cfg, params)
  f = resolve(cfg) if cfg.task == "instruct" else None
  if f is None or not f.vision_base or f.vit_layers == 0:
    return {}
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    keys = _keys(path)
    if keys[:2] == ("vision", "blocks") and keys[-1] not in ADAPTER_LEAVES:
      layers = np.zeros((x.shape[0],), bool)
      layers[f.vit_layers:] = True
      out["/".join(keys)] = layers
  return out


def _lit_layer_masks(cfg: ml_collections.ConfigDict, params) -> dict[str, np.ndarray]:
  locks = resolve_locks(cfg)
  if locks.unlock_last_n <= 0:
    return {}
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    keys = _keys(path)
    found = tower_layer_ids(cfg.model, keys)
    if found is None or not {"vision": locks.vision, "text": locks.text}[found[0]]:
      continue
    total = (cfg.model.vision if found[0] == "vision" else cfg.model.text).num_layers
    out["/".join(keys)] = np.asarray([i >= total - locks.unlock_last_n for i in found[1]], bool)
  return out


def apply_layer_masks(tree, masks: dict[str, np.ndarray]):
  """Zeroes the frozen layers of the masked leaves of `tree` (gradients or updates shaped like params)."""
  if not masks:
    return tree

  def apply(path, x):
    m = masks.get("/".join(_keys(path)))
    if m is None:
      return x
    return jnp.where(jnp.asarray(m).reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

  return jax.tree_util.tree_map_with_path(apply, tree)


def parameter_table(params, frozen, masks: dict[str, np.ndarray] | None = None) -> str:
  """Per group (vision, text, projector, language, lm_head, adapters, other): trainable and frozen parameter counts
  and bytes. params / frozen: the state's trees (arrays or ShapeDtypeStructs)."""
  masks = masks or {}
  rows = {g: [0, 0, 0, 0] for g in GROUPS + ("other",)}  # trainable n, bytes; frozen n, bytes
  for tree, is_params in ((params, True), (frozen, False)):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      keys = _keys(path)
      n, item = int(np.prod(x.shape)), jnp.dtype(x.dtype).itemsize
      share = float(np.mean(masks["/".join(keys)])) if is_params and "/".join(keys) in masks else 1.0
      trained = round(n * share) if is_params else 0
      r = rows[group_of(keys)]
      r[0] += trained
      r[1] += trained * item
      r[2] += n - trained
      r[3] += (n - trained) * item
  lines = [f"{'group':<10} {'trainable':>14} {'MiB':>10} {'frozen':>14} {'MiB':>10}"]
  total = [0, 0, 0, 0]
  for g, r in rows.items():
    if any(r):
      lines.append(f"{g:<10} {r[0]:>14,} {r[1] / 2**20:>10.2f} {r[2]:>14,} {r[3] / 2**20:>10.2f}")
      total = [a + b for a, b in zip(total, r)]
  lines.append(f"{'total':<10} {total[0]:>14,} {total[1] / 2**20:>10.2f} {total[2]:>14,} {total[3] / 2**20:>10.2f}")
  return "\n".join(lines)
