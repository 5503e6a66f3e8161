"""LoRA runs out: merged into plain weights, or as a `peft` adapter folder for the transformers-native model.

  merged(model)                 the same chat model without adapters, each merged into its kernel
                                (W + alpha / r * A B), which save_pretrained / write_release write as usual
  write_adapter(model, out)     adapter_model.safetensors + adapter_config.json that
                                `PeftModel.from_pretrained(InternVLForConditionalGeneration.from_pretrained(BASE), out)`
                                loads: lora_A [r, in] / lora_B [out, r] per adapted torch module, named by the module
                                paths of transformers' InternVL; groups the run trained in full (the projector, the
                                lm_head, a vision tower) go in as peft `modules_to_save`

Our adapters sit on our kernels; a torch module's adapter is found through the export key map: the kernel's
transformers tensor name (e.g. `language_model.model.layers.{i}.self_attn.q_proj.weight`) names the module
(`model.language_model.layers.{i}.self_attn.q_proj` in transformers' module tree). The vision tower's fused qkv
adapter becomes three: the same A for q_proj, k_proj and v_proj, B split by columns, which is exact.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from internvl_jax.convert import saver, transforms
from internvl_jax.convert.configs import ConversionError
from internvl_jax.models import internvl, lora

# on-disk tensor-name prefixes of transformers' InternVL -> the module paths of its model tree (transformers >= 4.52)
_MODULE_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                    ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def has_lora(model: nnx.Module) -> bool:
  return any(str(p[-1]) in ("lora_a", "lora_b") for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _plain(cfg, tree: dict) -> nnx.Module:
  """The plain chat model of config `cfg` (no LoRA) holding the variables `tree`."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graphdef, state)


def merged(model: nnx.Module) -> nnx.Module:
  """The model with every LoRA adapter merged into its base kernel (a plain model of the same architecture)."""
  if not has_lora(model):
    return model
  tree, cfg = lora.merge_chat_params(nnx.to_pure_dict(nnx.state(model)), model.config)
  return _plain(cfg, tree)


def without_adapters(model: nnx.Module) -> nnx.Module:
  """The base model the adapters were trained on (adapters dropped, not merged)."""
  if not has_lora(model):
    return model
  return _plain(lora.without_lora(model.config), _drop_adapters(nnx.to_pure_dict(nnx.state(model))))


def _drop_adapters(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _drop_adapters(v) for k, v in tree.items() if k != "lora"}


def module_name(disk_name: str) -> str:
  """transformers InternVL tensor name on disk (without .weight / .bias) -> the module path in its model."""
  for disk, module in _MODULE_PREFIXES:
    if disk_name.startswith(disk):
      return module + disk_name[len(disk):]
  raise ConversionError(f"no transformers module for tensor {disk_name!r}")


def _adapters(model: internvl.InternVLChat) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{torch module path: (lora_A [r, in], lora_B [out, r])} of every adapter of the model."""
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # the export key map of the plain model: a function of its config only (an abstract model, nothing copied)
  _, rules = saver.export_plan(nnx.eval_shape(
      lambda: internvl.InternVLChat(lora.without_lora(model.config), rngs=nnx.Rngs(0))))
  by_target = {r.target: r for r in rules}
  out = {}
  for path in sorted(p for p in flat if p.endswith(".lora.lora_a")):
    base = path[:-len(".lora.lora_a")]
    a, b = flat[path], flat[base + ".lora.lora_b"]
    rule = by_target[base + ".kernel"]
    parts = 1
    if isinstance(rule.transform, transforms.FuseLinear):
      parts = len(rule.sources)
    elif not isinstance(rule.transform, transforms.Linear):
      raise ConversionError(f"the adapter of {base} sits on a fused tensor ({type(rule.transform).__name__}) that has "
                            "no peft form; export the merged weights instead (without --adapter_only)")
    layers = range(a.shape[0]) if rule.stacked else [None]
    for i in layers:
      names = rule.names(i) if i is not None else rule.sources
      ai, bi = (a[i], b[i]) if i is not None else (a, b)
      width = bi.shape[-1] // parts
      for j, name in enumerate(names):
        out[module_name(name.removesuffix(".weight"))] = (np.ascontiguousarray(ai.T),
                                                          np.ascontiguousarray(bi[:, j * width:(j + 1) * width].T))
  return out


def write_adapter(model: internvl.InternVLChat, out_dir: str, *, full_groups: tuple[str, ...] = (),
                  base_model: str | None = None, dtype=None) -> list[str]:
  """Writes the peft adapter folder of a LoRA chat model (see the module doc). full_groups: torch module prefixes
  trained in full ('model.multi_modal_projector', 'lm_head', 'model.vision_tower'), saved whole as peft
  modules_to_save; base_model: recorded as base_model_name_or_path. Returns the files written."""
  if not isinstance(model, internvl.InternVLChat) or not has_lora(model):
    raise ConversionError("--adapter_only needs a chat model trained with LoRA (use_llm_lora / use_backbone_lora)")
  cfg = model.config
  adapters = _adapters(model)
  cast = (lambda x: x) if dtype is None else (lambda x: x.astype(np.dtype(dtype)))
  tensors = {}
  for name, (a, b) in adapters.items():
    tensors[f"base_model.model.{name}.lora_A.weight"] = cast(a)
    tensors[f"base_model.model.{name}.lora_B.weight"] = cast(b)
  if full_groups:
    plain = merged(model)  # the full groups hold no adapters: merged == trained values
    hf, rules = saver.export_plan(plain)
    params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    for rule in rules:
      for index, names, _ in rule.pieces(np.shape(params[rule.target])):
        modules = [module_name(n) for n in names]
        if not any(m.startswith(g + ".") or m == g for m in modules for g in full_groups):
          continue
        if isinstance(rule.transform, transforms.FUSED):
          raise ConversionError(f"{rule.target} is stored fused; save the merged model instead")
        value = np.asarray(params[rule.target][index] if index else params[rule.target])
        for module, x in zip(modules, rule.transform.save(value)):
          tensors[f"base_model.model.{module}"] = cast(np.asarray(x))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_FILES[0]), metadata={"format": "pt"})
  ranks = {t: (int(cfg[t].get("lora_rank", 0) or 0), float(cfg[t].get("lora_alpha", 0) or 0))
           for t in ("language", "vision")}
  main = "language" if ranks["language"][0] else "vision"
  r, alpha = ranks[main]
  rank_pattern, alpha_pattern = {}, {}
  if ranks["language"][0] and ranks["vision"][0] and ranks["vision"] != ranks["language"]:
    rank_pattern[r"model\.vision_tower\..*"] = ranks["vision"][0]
    alpha_pattern[r"model\.vision_tower\..*"] = ranks["vision"][1]
  config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(adapters), "modules_to_save": list(full_groups) or None,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "task_type": None,
            "base_model_name_or_path": base_model, "inference_mode": True,
            "auto_mapping": {"base_model_class": "InternVLForConditionalGeneration",
                             "parent_library": "transformers.models.internvl.modeling_internvl"}}
  with open(os.path.join(out_dir, ADAPTER_FILES[1]), "w") as f:
    json.dump(config, f, indent=2)
  return list(ADAPTER_FILES)


def full_groups_of(freezing) -> tuple[str, ...]:
  """The torch module groups a run with these switches (train/freezing.Freezing) trained in full next to its
  adapters, for modules_to_save. A language model trained in full has no adapter form."""
  if not freezing.language_base:
    raise ConversionError("this run trained the whole language model; export the merged weights instead of an "
                          "adapter (drop --adapter_only)")
  groups = []
  if not freezing.vision_base or freezing.vit_layers:
    groups.append("model.vision_tower")
  if not freezing.projector:
    groups.append("model.multi_modal_projector")
  if not freezing.lm_head:
    if freezing.tied_head:
      raise ConversionError("this run trained a tied embedding table (unfreeze_lm_head); export the merged weights")
    groups.append("lm_head")
  return tuple(groups)
