"""Checkpoint conversion: official InternVL / InternViT / LLaMA / Qwen2 / InternLM2 / InternLM3 / Phi-3 weights <->
our models.

  from internvl_jax import convert
  model = convert.load_pretrained(path, dtype=jnp.float32, mesh=None)  # config.json + *.safetensors folder
  convert.save_pretrained(model, out_dir, dtype=None)                  # a transformers-native folder

Reads (detected from config.json, see families.py): transformers InternVLVisionModel / InternVLForConditional-
Generation (Qwen2, Qwen3, Qwen3-MoE, LLaMA, Phi-3 or InternLM3 text), LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Qwen3MoeForCausalLM, Phi3ForCausalLM, InternLM3 (transformers or remote code); OpenGVLab
InternVisionModel, InternVLChatModel (Qwen2 / Qwen3 / Qwen3-MoE / LLaMA / InternLM2 / InternLM3 / Phi-3),
InternLM2ForCausalLM, InternVL-14B (C/G, `variant=`); and our own internvl_jax layout. Writes transformers-native
folders (vision, LMs, chat), the InternVL-14B layout for C/G
models, our layout otherwise. Pickled weights are never read.

CLI: python -m internvl_jax.convert {import,export} (see __main__.py; checkpoint layout in orbax_io.py).
Files: configs.py (config.json <-> ConfigDict), transforms.py (layout changes), keymaps.py (names per family),
families.py (detection), files.py (safetensors I/O), loader.py, saver.py, orbax_io.py, __main__.py.
"""

from internvl_jax.convert.configs import ConversionError
from internvl_jax.convert.loader import load_pretrained, model_config
from internvl_jax.convert.saver import save_pretrained

__all__ = ["ConversionError", "load_pretrained", "model_config", "save_pretrained"]
