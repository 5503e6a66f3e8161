"""Checkpoint conversion: official InternVL / InternViT / LLaMA / Qwen2 / InternLM2 weights <-> our models.

  from internvl_jax import convert
  model = convert.load_pretrained(path, dtype=jnp.float32, mesh=None)  # config.json + *.safetensors folder
  convert.save_pretrained(model, out_dir, dtype=None)                  # a transformers-native folder

Files: configs.py (config.json <-> ConfigDict), transforms.py (layout changes), keymaps.py (names per family),
families.py (detection), files.py (safetensors I/O), loader.py, saver.py, orbax_io.py, __main__.py (CLI).
"""

from internvl_jax.convert.configs import ConversionError
from internvl_jax.convert.loader import load_pretrained
from internvl_jax.convert.saver import save_pretrained

__all__ = ["ConversionError", "load_pretrained", "save_pretrained"]
