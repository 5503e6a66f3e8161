"""The PyTorch `transformers` program of each case, with random weights and the shapes of the JAX case.

Dtypes: float32 on CPU; on GPU, inference cases hold bfloat16 weights (`model.to(bfloat16)`), training cases keep
float32 parameters under `torch.autocast(bfloat16)`, mirroring jax_side.py. Attention is SDPA everywhere.
The moe_* cases copy the JAX decoder's weights into transformers' Qwen3MoeModel and check that the two agree
before anything is timed. Differences kept on purpose (small next to the ViT, noted in BENCHMARKS.md): the
contrastive text tower is `LlamaModel`, which is causal where ours is bidirectional; the tiny chat preset's
Qwen2 has qkv biases.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from internvl_jax.bench import cases, jax_side


@dataclasses.dataclass
class Program:
  """What timing.time_callable needs."""
  call: Callable[[], Any]
  sync: Callable[[], None]
  before_each: Callable[[], None] | None = None
  agree_rel_err: float | None = None  # moe_*: |PyTorch - JAX| / max |JAX| checked before timing (float32)


def device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync_fn() -> Callable[[], None]:
  return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def dtype_of(name: str) -> torch.dtype:
  return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def vision_config(v, image_size: int):
  """transformers InternVLVisionConfig with the shapes of our vision config `v`."""
  from transformers import InternVLVisionConfig
  return InternVLVisionConfig(
      hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
      intermediate_size=v.mlp_dim, attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm, norm_type=v.norm_type,
      layer_norm_eps=v.norm_eps, image_size=image_size, patch_size=v.patch_size,
      layer_scale_init_value=v.layer_scale_init, use_mean_pooling=True,  # True: no final norm, like InternViT
      hidden_act="gelu", attn_implementation="sdpa")


def text_config_dict(lm, model_type: str) -> dict:
  """A Qwen2 / LLaMA config dict with the shapes of our language config `lm`."""
  return dict(model_type=model_type, vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
              intermediate_size=lm.mlp_dim, num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
              num_key_value_heads=lm.num_kv_heads, rms_norm_eps=lm.norm_eps, tie_word_embeddings=lm.tie_embeddings,
              max_position_embeddings=4096, attn_implementation="sdpa")


def _on_device(make: Callable[[], nn.Module]) -> nn.Module:
  # Building under the target device initialises weights there (a 6B tower never round-trips through host RAM).
  with torch.device(device()):
    return make()


def pixels(spec: cases.Spec) -> torch.Tensor:
  """The JAX case's images in PyTorch's NCHW layout."""
  return torch.from_numpy(np.ascontiguousarray(jax_side.images(spec).transpose(0, 3, 1, 2))).to(device())


def autocast(spec_dtype: str):
  """Mixed precision for training cases on GPU (float32 parameters, bf16 compute), nothing on CPU/float32."""
  if device().type == "cuda" and spec_dtype != "float32":
    return torch.autocast("cuda", dtype=dtype_of(spec_dtype))
  return contextlib.nullcontext()


def build(spec: cases.Spec, compile_model: bool) -> Program:
  """The PyTorch program of a case; compile_model wraps the model in torch.compile (default mode)."""
  torch.manual_seed(0)
  return {"vit_fwd": _vit_fwd, "vit_train": _vit_train, "vit_fwdbwd": _vit_fwdbwd,
          "chat_prefill": _chat_prefill, "chat_decode": _chat_decode, "moe_fwd": _moe_fwd,
          "moe_fwdbwd": _moe_fwdbwd}[spec.kind](spec, compile_model)


def checkpointing(model: nn.Module) -> None:
  """Activation checkpointing per layer (renamed in transformers 5.2x; older 5.x only has the old name)."""
  enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
  enable()


def _maybe_compile(model: nn.Module, compile_model: bool) -> Callable:
  return torch.compile(model) if compile_model else model


def _vit_fwd(spec: cases.Spec, compile_model: bool) -> Program:
  from transformers import InternVLVisionModel
  model = _on_device(lambda: InternVLVisionModel(vision_config(spec.vision, spec.image_size)))
  model = model.to(dtype_of(spec.vision.dtype)).eval()
  run = _maybe_compile(model, compile_model)
  x = pixels(spec).to(dtype_of(spec.vision.dtype))

  def call():
    with torch.inference_mode():
      return run(pixel_values=x).last_hidden_state

  return Program(call, sync_fn())


def _vit_fwdbwd(spec: cases.Spec, compile_model: bool) -> Program:
  from transformers import InternVLVisionModel
  model = _on_device(lambda: InternVLVisionModel(vision_config(spec.vision, spec.image_size))).train()
  if spec.vision.remat != "none":
    checkpointing(model)  # the JAX side rematerialises too (policy in the config)
  run = _maybe_compile(model, compile_model)
  x = pixels(spec)

  def call():
    for p in model.parameters():
      p.grad = None  # JAX returns fresh gradients per call; do not accumulate
    with autocast(spec.vision.dtype):
      pooled = run(pixel_values=x).last_hidden_state[:, 0]
    loss = pooled.float().square().mean()
    loss.backward()
    return loss

  return Program(call, sync_fn())


class Contrastive(nn.Module):
  """PyTorch twin of the seed-style contrastive model: InternViT CLS -> Linear/GELU/Linear; text tower -> mean over
  real tokens -> Linear; unit-norm embeddings; learnable logit scale; symmetric InfoNCE in float32."""

  def __init__(self, spec: cases.Spec):
    super().__init__()
    from transformers import InternVLVisionModel, LlamaConfig, LlamaModel
    d, e, t = spec.vision.hidden_size, spec.embed_dim, spec.text
    self.vision = InternVLVisionModel(vision_config(spec.vision, spec.image_size))
    self.image_projection = nn.Sequential(nn.Linear(d, e), nn.GELU(), nn.Linear(e, e))
    cfg = text_config_dict(t, "llama")
    cfg.pop("model_type")
    self.text = LlamaModel(LlamaConfig(**cfg))
    self.text_projection = nn.Linear(t.hidden_size, e)
    self.logit_scale = nn.Parameter(torch.tensor(2.659260036932778))

  def forward(self, pixel_values, input_ids, attention_mask):
    image = self.image_projection(self.vision(pixel_values=pixel_values).last_hidden_state[:, 0])
    hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    w = attention_mask[..., None].to(hidden.dtype)
    text = self.text_projection((hidden * w).sum(1) / w.sum(1).clamp(min=1.0))
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = self.logit_scale.exp() * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _vit_train(spec: cases.Spec, compile_model: bool) -> Program:
  model = _on_device(lambda: Contrastive(spec)).train()
  if spec.vision.remat != "none":
    checkpointing(model.vision)
  run = _maybe_compile(model, compile_model)
  # Same hyper-parameters as train_step.optimizer(); fused kernels where PyTorch has them (its fastest AdamW).
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05,
                          fused=device().type == "cuda")
  x = pixels(spec)
  ids = torch.from_numpy(jax_side.text_ids(spec, spec.text.vocab_size, spec.text_len)).long().to(device())
  mask = torch.ones_like(ids)

  def call():
    opt.zero_grad(set_to_none=True)
    with autocast(spec.vision.dtype):
      loss = run(x, ids, mask)
    loss.backward()
    opt.step()
    return loss

  return Program(call, sync_fn())


def _chat_model(spec: cases.Spec):
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  chat = spec.chat
  cfg = InternVLConfig(vision_config=vision_config(chat.vision, spec.image_size).to_dict(),
                       text_config=text_config_dict(chat.language, "qwen2"), image_token_id=chat.image_token_id,
                       downsample_ratio=chat.downsample_ratio, vision_feature_layer=chat.select_layer,
                       attn_implementation="sdpa")
  model = _on_device(lambda: InternVLForConditionalGeneration(cfg))
  return model.to(dtype_of(chat.language.dtype)).eval()


def _chat_inputs(spec: cases.Spec):
  ids = torch.from_numpy(jax_side.chat_prompt(spec)).long().to(device())
  return ids, pixels(spec).to(dtype_of(spec.chat.vision.dtype))


def _chat_prefill(spec: cases.Spec, compile_model: bool) -> Program:
  model = _chat_model(spec)
  run = _maybe_compile(model, compile_model)
  ids, x = _chat_inputs(spec)

  def call():
    with torch.inference_mode():
      out = run(input_ids=ids, pixel_values=x, use_cache=True, logits_to_keep=1)
      return out.logits[:, -1].argmax(-1)

  return Program(call, sync_fn())


def _chat_decode(spec: cases.Spec, compile_model: bool) -> Program:
  """Untimed prefill into a DynamicCache, then `new_tokens` greedy steps per timed call; the cache is cropped
  back to the prompt (untimed) before each call so every call does the same work."""
  if compile_model:
    raise NotImplementedError("torch.compile of the decode loop needs a static cache; not benchmarked")
  model = _chat_model(spec)
  ids, x = _chat_inputs(spec)
  with torch.inference_mode():
    out = model(input_ids=ids, pixel_values=x, use_cache=True, logits_to_keep=1)
  cache, first = out.cache, out.logits[:, -1].argmax(-1)

  def rewind():
    extra = cache.get_seq_length() - spec.prompt_len
    if extra > 0:
      cache.crop(-extra)

  def call():
    tok = first
    with torch.inference_mode():
      for _ in range(spec.new_tokens):
        step = model(input_ids=tok[:, None], cache=cache, use_cache=True)
        tok = step.logits[:, -1].argmax(-1)
    return tok

  return Program(call, sync_fn(), before_each=rewind)


# Largest |PyTorch - JAX| / max |JAX| of the moe_* cases' float32 outputs before timing (same weights, same input).
MOE_AGREE_TOL = 1e-4


def moe_state_dict(decoder) -> dict:
  """Our Qwen3-MoE decoder (models/llm.py; stacked layers, every layer routed) -> transformers Qwen3MoeModel's
  state dict: linear kernels transposed, experts fused as transformers keeps them in memory (gate_up_proj
  [E, 2I, D] = gate then up; down_proj [E, D, I]), the router kernel [D, E] as mlp.gate.weight [E, D]."""
  from flax import nnx
  flat = {"/".join(map(str, k)): np.asarray(v.get_value(), np.float32) for k, v in nnx.to_flat_state(nnx.state(
      decoder, nnx.Param))}
  t = lambda a: torch.from_numpy(np.require(a, requirements=["C", "W"]))  # copies only what jax lends read-only
  sd = {"embed_tokens.weight": t(flat["embed/embedding"]), "norm.weight": t(flat["norm/scale"])}
  for i in range(flat["layers/input_norm/scale"].shape[0]):
    pre, get = f"layers.{i}.", lambda name: flat[f"layers/{name}"][i]
    for p in "qkvo":
      sd[pre + f"self_attn.{p}_proj.weight"] = t(get(f"attn/{p}/kernel").T)
    for p in "qk":
      sd[pre + f"self_attn.{p}_norm.weight"] = t(get(f"attn/{p}_norm/scale"))
    sd[pre + "input_layernorm.weight"] = t(get("input_norm/scale"))
    sd[pre + "post_attention_layernorm.weight"] = t(get("post_attention_norm/scale"))
    sd[pre + "mlp.gate.weight"] = t(get("mlp/router/kernel").T)
    sd[pre + "mlp.experts.gate_up_proj"] = t(np.concatenate([get("mlp/gate"), get("mlp/up")], axis=2)
                                             .transpose(0, 2, 1))
    sd[pre + "mlp.experts.down_proj"] = t(get("mlp/down").transpose(0, 2, 1))
  return sd


def _moe_model(spec: cases.Spec):
  """transformers' Qwen3MoeModel with our moe_* decoder's weights (float32, train mode off), after checking that
  both give the same hidden states on the case's first row (up to 16 tokens; transformers' eager per-expert loop,
  which runs float32 on every device, while the timed calls use its default experts implementation). Returns
  (model, relative error)."""
  import jax
  from flax import nnx
  from transformers import Qwen3MoeConfig, Qwen3MoeModel

  from internvl_jax.convert import configs
  lm = spec.text.copy_and_resolve_references()
  lm.lm_head = True  # language_to_hf exports causal LMs; the head itself is not built below (Qwen3MoeModel)
  hf = configs.language_to_hf(lm)
  for key in ("architectures", "model_type"):
    hf.pop(key)
  model = _on_device(lambda: Qwen3MoeModel(Qwen3MoeConfig(**hf, attn_implementation="sdpa"))).eval()
  ours = jax_side.moe_decoder(spec)
  model.load_state_dict(moe_state_dict(ours), strict=True)
  x = jax_side.moe_inputs(spec)[:1, :16]
  graphdef, state = nnx.split(ours)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(jax.jit(jax_side.moe_forward(graphdef))(state, x))
  del ours, state
  timed_impl = model.config._experts_implementation  # transformers' default (grouped_mm where torch has it)
  model.set_experts_implementation("eager")  # the check runs transformers' per-expert loop: float32 everywhere
  with torch.inference_mode():
    got = model(inputs_embeds=torch.from_numpy(x).to(device()), use_cache=False).last_hidden_state.cpu().numpy()
  model.set_experts_implementation(timed_impl)
  err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  if not err < MOE_AGREE_TOL:
    raise AssertionError(f"transformers' Qwen3-MoE and ours disagree before timing: relative error {err:.2e}")
  return model, err


def _moe_fwd(spec: cases.Spec, compile_model: bool) -> Program:
  model, err = _moe_model(spec)
  model = model.to(dtype_of(spec.text.dtype))
  run = _maybe_compile(model, compile_model)
  x = torch.from_numpy(jax_side.moe_inputs(spec)).to(device(), dtype_of(spec.text.dtype))

  def call():
    with torch.inference_mode():
      return run(inputs_embeds=x, use_cache=False).last_hidden_state

  return Program(call, sync_fn(), agree_rel_err=err)


def _moe_fwdbwd(spec: cases.Spec, compile_model: bool) -> Program:
  """Forward + backward, float32 parameters under autocast; loss as jax_side's: mean square of the output plus
  router_aux_loss_coef x transformers' load_balancing_loss_func."""
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
  model, err = _moe_model(spec)
  model.train()
  run = _maybe_compile(model, compile_model)
  x = torch.from_numpy(jax_side.moe_inputs(spec)).to(device())
  lm = spec.text

  def call():
    for p in model.parameters():
      p.grad = None
    with autocast(lm.dtype):
      out = run(inputs_embeds=x, use_cache=False, output_router_logits=True)
    aux = load_balancing_loss_func(out.router_logits, lm.num_experts, lm.num_experts_per_tok)
    loss = out.last_hidden_state.float().square().mean() + lm.router_aux_loss_coef * aux
    loss.backward()
    return loss

  return Program(call, sync_fn(), agree_rel_err=err)


def peak_memory() -> tuple[int | None, str]:
  """(bytes, label): CUDA max_memory_allocated since the last reset on GPU; process RSS peak on CPU."""
  if torch.cuda.is_available():
    return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
  from internvl_jax.bench import timing
  return timing.rss_peak_bytes(), "process RSS peak (getrusage, process lifetime)"


def reset_memory() -> None:
  """Frees cached blocks (so the JAX side gets them back) and resets the CUDA peak counter."""
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
