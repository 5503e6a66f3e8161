"""Tiny transformers reference models with random weights, saved to temp folders, for the parity tests.

Every parameter gets noise on top of transformers' init (which zeroes position embeddings and sets norms to 1),
so a swapped, transposed or skipped tensor shows up in the outputs."""

from __future__ import annotations

import numpy as np
import torch

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
              patch_size=14, layer_scale_init_value=0.5)
VISION_VARIANTS = {
    "layer_norm": dict(VISION, norm_type="layer_norm", attention_bias=True, use_qk_norm=False),  # 300M-style
    "rms_qk_norm": dict(VISION, norm_type="rms_norm", attention_bias=False, use_qk_norm=True),  # 6B-style
}
QWEN2 = dict(model_type="qwen2", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0}, head_dim=16)

# Qwen3: head_dim 16 given explicitly (hidden / heads would be 8), per-head q/k RMSNorm.
QWEN3 = dict(model_type="qwen3", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# Qwen3-MoE: 4 experts, top-2, layer 0 dense through mlp_only_layers, layers 1 and 2 routed.
QWEN3_MOE = dict(QWEN3, model_type="qwen3_moe", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
                 router_aux_loss_coef=0.01)

# GPT-OSS: 4 layers alternating 4-token windows and full attention, sinks, q/k/v/o biases, head_dim 16 given
# (4 x 16 = 64 = hidden), YaRN x4 over 64 original positions with betas putting the ramp at frequencies 2.1-4.8
# of 8 (untruncated), 4 biased experts top-2 with a small swiglu_limit so that the clamps bite.
GPT_OSS = dict(model_type="gpt_oss", vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=4, swiglu_limit=0.5, rms_norm_eps=1e-5, tie_word_embeddings=False,
               router_aux_loss_coef=0.02, max_position_embeddings=256,
               rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 2.0,
                                "beta_slow": 0.25, "truncate": False, "original_max_position_embeddings": 64})


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
  """Adds N(0, scale) noise to every parameter (deterministic)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(model.named_parameters()):
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def errors(ours, ref) -> tuple[float, float]:
  """(max abs error, max abs error / max |ref|) in float64."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = float(np.max(np.abs(ours - ref)))
  return err, err / float(np.max(np.abs(ref)))


def vision_model(variant: str, folder: str, seed: int = 0):
  from transformers import InternVLVisionConfig, InternVLVisionModel
  torch.manual_seed(seed)
  model = randomize(InternVLVisionModel(InternVLVisionConfig(**VISION_VARIANTS[variant])), seed)
  model.save_pretrained(folder)
  return model


def causal_lm(text: dict, folder: str, seed: int = 0):
  from transformers import AutoConfig, AutoModelForCausalLM
  torch.manual_seed(seed)
  cfg = AutoConfig.for_model(**text)
  cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
  model = randomize(AutoModelForCausalLM.from_config(cfg), seed, scale=0.1)
  model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
  model.save_pretrained(folder)
  return model


def chat_model(text: dict, folder: str, seed: int = 0, image_token_id: int = 95, vision_variant: str = "layer_norm",
               **extra):
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  torch.manual_seed(seed)
  text = dict(text, tie_word_embeddings=extra.pop("tie_word_embeddings", False))
  cfg = InternVLConfig(vision_config=VISION_VARIANTS[vision_variant], text_config=text, image_token_id=image_token_id,
                       tie_word_embeddings=text["tie_word_embeddings"], **extra)
  model = randomize(InternVLForConditionalGeneration(cfg), seed, scale=0.1)
  model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
  model.save_pretrained(folder)
  return model


def prompts(pad: bool, length: int = 7, seed: int = 2, high: int = 95) -> tuple[np.ndarray, np.ndarray]:
  """Two random prompts int64 [2, length] and their mask; row 1 left-padded by 3 when pad."""
  ids = np.random.default_rng(seed).integers(0, high, (2, length)).astype(np.int64)
  mask = np.ones_like(ids)
  if pad:
    ids[1, :3], mask[1, :3] = 0, 0
  return ids, mask


def check_logits_and_router_loss(ref, ours, ids, mask, name: str, rel_tol: float) -> None:
  """A transformers MoE causal LM (output_router_logits) against ours on the same ids / mask: the logits of real
  tokens to rel_tol and the router load-balancing loss to 1e-6 relative; prints the errors."""
  import jax.numpy as jnp
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_router_logits=True)
  out = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  abs_err, rel_err = errors(np.asarray(out.logits)[real], want.logits.numpy()[real])
  aux_err = abs(float(out.aux_loss) - float(want.aux_loss))
  print(f"{name} logits: max abs {abs_err:.2e}, max rel {rel_err:.2e}; aux loss {float(out.aux_loss):.6f} vs "
        f"{float(want.aux_loss):.6f} (abs {aux_err:.1e})")
  assert rel_err < rel_tol
  assert aux_err < 1e-6 * max(1.0, float(want.aux_loss))


def torch_logits(ref, ids, mask) -> np.ndarray:
  """A transformers causal LM's logits float32 [B, T, V] for int ids / mask arrays."""
  with torch.no_grad():
    return ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def chat_prompts(pad: bool, image_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Two prompts int64 [2, 11] with one 56x56 tile each (4 image tokens after pixel shuffle), their mask (row 1
  left-padded by 3 if pad) and the tiles float32 [2, 56, 56, 3]."""
  rng = np.random.default_rng(4)
  ids = rng.integers(0, image_token_id, (2, 11)).astype(np.int64)
  ids[0, 2:6] = image_token_id
  ids[1, 5:9] = image_token_id
  mask = np.ones_like(ids)
  if pad:
    ids[1, :3], mask[1, :3] = 0, 0
  return ids, mask, rng.standard_normal((2, 56, 56, 3)).astype(np.float32)


def torch_chat_inputs(ids, mask, pixels) -> dict:
  """chat_prompts' arrays as the keyword arguments of a transformers InternVL model (NCHW pixels)."""
  return dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
