"""config.init.path may name a Hugging Face folder: its tensors are read by convert.load_pretrained and land on
the same paths as the train state's variables."""

import jax
import numpy as np
from flax import nnx

from internvl_jax import convert
from internvl_jax.models import internvl, presets
from internvl_jax.train import init_from


def test_hf_folder_initialises_every_variable_of_the_same_model(tmp_path):
  cfg = presets.chat("tiny")
  cfg.language.vocab_size = 160  # above the tiny image-token id
  source = internvl.InternVLChat(cfg, rngs=nnx.Rngs(1))
  convert.save_pretrained(source, str(tmp_path / "hf"))
  loaded = init_from.load_source(str(tmp_path / "hf"))
  fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(internvl.InternVLChat(cfg, rngs=nnx.Rngs(2)))))
  merged, rows = init_from.merge_into(fresh, loaded, partial=False)
  assert rows and all(status == "copied" for _, status, _ in rows), [r for r in rows if r[1] != "copied"][:3]
  want = nnx.to_pure_dict(nnx.state(source))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, np.asarray(b, np.float32), atol=0)
  # the fresh model (another seed) really was overwritten
  assert not np.allclose(fresh["vision"]["blocks"]["attn"]["qkv"]["kernel"],
                         merged["vision"]["blocks"]["attn"]["qkv"]["kernel"])
