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
adapter becomes three: the same A for q_proj, k_proj and v_proj, B split by columns, which is exact. The other
way round, where transformers fuses what we keep apart (Phi-3's qkv_proj = our q, k, v; gate_up_proj = our gate,
up), the k adapters of rank r become one of rank k r: A's stacked along the rank, B block-diagonal, and peft's
rank_pattern / alpha_pattern give those modules k r and k alpha, so alpha / r and the product are exactly ours.
InternLM2's fused wqkv needs nothing: we hold q, k, v apart (split at load) and the native export writes LLaMA's
q_proj / k_proj / v_proj in our head order. Adapters never sit on routed experts, so GPT-OSS's interleaved
gate_up_proj carries none.
"""

from __future__ import annotations

import json
import os
import re

import jax
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
  """The plain chat model of config `cfg` (no LoRA) holding the variables `tree`, each in the dtype the model
  declares (a run's bfloat16 base, config.lora_base_dtype, comes back float32: one dtype per exported folder)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))))
  declared = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype),
                                               tree, declared))
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


def _adapters(model: internvl.InternVLChat) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, int]]:
  """({torch module path: (lora_A [r', in], lora_B [out, r'])} of every adapter of the model, {regex of the fused
  torch modules: k}). r' = r except on a fused torch module whose k parts are our kernels (Phi-3's qkv_proj,
  gate_up_proj): there r' = k r (see _fused_adapter)."""
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # the export key map of the plain model: a function of its config only (an abstract model, nothing copied)
  _, rules = saver.export_plan(nnx.eval_shape(
      lambda: internvl.InternVLChat(lora.without_lora(model.config), rngs=nnx.Rngs(0))))
  by_target = {r.target: r for r in rules}
  out, fused = {}, {}
  for path in sorted(p for p in flat if p.endswith(".lora.lora_a")):
    base = path[:-len(".lora.lora_a")]
    a, b = flat[path], flat[base + ".lora.lora_b"]
    rule = by_target[base + ".kernel"]
    parts = 1
    if isinstance(rule.transform, transforms.Rows):  # one of the row blocks of a fused torch Linear
      fused.setdefault(rule.sources[0], []).append((rule, a, b))
      continue
    if isinstance(rule.transform, transforms.FuseLinear):
      parts = len(rule.sources)
    elif not isinstance(rule.transform, transforms.Linear):
      raise ConversionError(f"the adapter of {base} sits on a fused tensor ({type(rule.transform).__name__}) that has "
                            "no peft form; export the merged weights instead (without --adapter_only)")
    for i in (range(a.shape[0]) if rule.stacked else [None]):
      names = rule.names(i) if i is not None else rule.sources
      ai, bi = (a[i], b[i]) if i is not None else (a, b)
      width = bi.shape[-1] // parts
      for j, name in enumerate(names):
        out[module_name(name.removesuffix(".weight"))] = (np.ascontiguousarray(ai.T),
                                                          np.ascontiguousarray(bi[:, j * width:(j + 1) * width].T))
  patterns = {}
  for template, parts in fused.items():
    parts.sort(key=lambda p: p[0].transform.start)
    rule = parts[0][0]
    for i in (range(parts[0][1].shape[0]) if rule.stacked else [None]):
      name = rule.names(i)[0] if i is not None else rule.sources[0]
      pieces = [(r.transform, a[i] if i is not None else a, b[i] if i is not None else b) for r, a, b in parts]
      out[module_name(name.removesuffix(".weight"))] = _fused_adapter(template, pieces)
    # every layer's module of this template: peft reads the pattern as (.*\.)?(pattern)$
    patterns[re.escape(module_name(template.removesuffix(".weight"))).replace(r"\{i\}", r"\d+")] = len(parts)
  return out, patterns


def _fused_adapter(name: str, pieces: list) -> tuple[np.ndarray, np.ndarray]:
  """The adapter of a fused torch Linear (rows [start, stop) of its weight = our kernel j, j = 0..k-1) from our k
  adapters (Rows, A_j [in, r], B_j [r, stop - start]): lora_A [k r, in] = the A_j^T stacked along the rank,
  lora_B [total, k r] block-diagonal with B_j^T at (rows of part j, ranks of part j). B A = the B_j^T A_j^T stacked
  by rows, i.e. exactly our k deltas; with alpha scaled by k too the scaling alpha / r is unchanged."""
  total, ranks = pieces[0][0].total, {a.shape[-1] for _, a, _ in pieces}
  starts = [t.start for t, _, _ in pieces]
  if starts != [0] + [t.stop for t, _, _ in pieces[:-1]] or pieces[-1][0].stop != total or len(ranks) != 1:
    raise ConversionError(f"{name}: adapters on only some row blocks of a fused tensor (or of unequal ranks) have "
                          "no peft form; export the merged weights instead (without --adapter_only)")
  r = ranks.pop()
  lora_a = np.concatenate([np.asarray(a).T for _, a, _ in pieces], axis=0)
  lora_b = np.zeros((total, r * len(pieces)), np.asarray(pieces[0][2]).dtype)
  for j, (t, _, b) in enumerate(pieces):
    lora_b[t.start:t.stop, j * r:(j + 1) * r] = np.asarray(b).T
  return np.ascontiguousarray(lora_a), lora_b


def write_adapter(model: internvl.InternVLChat, out_dir: str, *, full_groups: tuple[str, ...] = (),
                  base_model: str | None = None, dtype=None) -> list[str]:
  """Writes the peft adapter folder of a LoRA chat model (see the module doc). full_groups: torch module prefixes
  trained in full ('model.multi_modal_projector', 'lm_head', 'model.vision_tower'), saved whole as peft
  modules_to_save; base_model: recorded as base_model_name_or_path. Returns the files written."""
  if not isinstance(model, internvl.InternVLChat) or not has_lora(model):
    raise ConversionError("--adapter_only needs a chat model trained with LoRA (use_llm_lora / use_backbone_lora)")
  cfg = model.config
  adapters, fused = _adapters(model)
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
        if isinstance(rule.transform, transforms.FUSED):  # not reached: fused tensors live in decoder layers only
          raise ConversionError(f"{rule.target} is stored fused; save the merged model instead")
        value = np.asarray(params[rule.target][index] if index else params[rule.target])
        for module, x in zip(modules, rule.transform.save(value)):
          tensors[f"base_model.model.{module}"] = cast(np.asarray(x))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_FILES[0]), metadata={"format": "pt"})
  ranks = {t: (lora.lora_args(cfg[t]) or (0, 0.0))[:2] for t in ("language", "vision")}
  main = "language" if ranks["language"][0] else "vision"
  r, alpha = ranks[main]
  rank_pattern, alpha_pattern = {}, {}
  if ranks["language"][0] and ranks["vision"][0] and ranks["vision"] != ranks["language"]:
    rank_pattern[r"model\.vision_tower\..*"] = ranks["vision"][0]
    alpha_pattern[r"model\.vision_tower\..*"] = ranks["vision"][1]
  for pattern, k in fused.items():  # only language modules are fused (Phi-3): k r ranks, k alpha keeps alpha / r
    rank_pattern[pattern], alpha_pattern[pattern] = k * ranks["language"][0], k * ranks["language"][1]
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
