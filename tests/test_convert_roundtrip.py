"""Export: our models -> transformers-native folders that transformers loads with no missing / unexpected keys and
the same outputs; load -> save -> load is bit-identical; sharded output with an index; the CLI round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import hf_refs
from internvl_jax import convert
from internvl_jax.convert import __main__ as cli
from internvl_jax.convert import orbax_io

jax.config.update("jax_default_matmul_precision", "highest")
IMG = 95


def params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def chat_inputs():
  rng = np.random.default_rng(5)
  ids = rng.integers(0, IMG, (2, 9))
  ids[:, 2:6] = IMG
  pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
  return ids, pixels


def torch_chat_logits(model, ids, pixels):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("chat_ref"))
  ref = hf_refs.chat_model(hf_refs.QWEN2, folder, image_token_id=IMG, tie_word_embeddings=True)
  return ref, convert.load_pretrained(folder)


def from_pretrained(cls, folder, **kw):
  model, info = cls.from_pretrained(folder, output_loading_info=True, **kw)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def test_chat_export_loads_in_transformers_with_same_logits(chat, tmp_path):
  from transformers import InternVLForConditionalGeneration
  ref, ours = chat
  out = str(tmp_path / "export")
  convert.save_pretrained(ours, out)
  back = from_pretrained(InternVLForConditionalGeneration, out)
  ids, pixels = chat_inputs()
  np.testing.assert_array_equal(torch_chat_logits(back, ids, pixels).numpy(),
                                torch_chat_logits(ref, ids, pixels).numpy())
  assert_same_params(convert.load_pretrained(out), ours)  # load -> save -> load is bit-identical


def test_bfloat16_export_and_sharded_index(chat, tmp_path):
  from transformers import InternVLForConditionalGeneration
  ref, ours = chat
  out = str(tmp_path / "bf16")
  written = convert.save_pretrained(ours, out, dtype="bfloat16", max_shard_bytes=20_000)
  assert len(written) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  with safe_open(written[0], "np") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  back = from_pretrained(InternVLForConditionalGeneration, out, dtype=torch.bfloat16)
  ids, pixels = chat_inputs()
  want = torch_chat_logits(ref, ids, pixels).numpy()
  got = torch_chat_logits(back, ids, pixels).float().numpy()
  assert hf_refs.errors(got, want)[1] < 0.05  # bfloat16 weights and activations
  reloaded = convert.load_pretrained(out)  # reads the index
  for k, v in params(reloaded).items():
    np.testing.assert_array_equal(v, params(ours)[k].astype(jnp.bfloat16).astype(np.float32), err_msg=k)


def test_vision_and_lm_export(tmp_path):
  from transformers import AutoModelForCausalLM, InternVLVisionModel
  vref = hf_refs.vision_model("rms_qk_norm", str(tmp_path / "v"))
  ours = convert.load_pretrained(str(tmp_path / "v"))
  convert.save_pretrained(ours, str(tmp_path / "v_out"))
  back = from_pretrained(InternVLVisionModel, str(tmp_path / "v_out"))
  x = torch.randn(1, 3, 56, 56)
  with torch.no_grad():
    np.testing.assert_array_equal(back(x).last_hidden_state.numpy(), vref(x).last_hidden_state.numpy())
  for text in (hf_refs.LLAMA, hf_refs.QWEN2):
    src, out = str(tmp_path / text["model_type"]), str(tmp_path / (text["model_type"] + "_out"))
    lref = hf_refs.causal_lm(text, src)
    convert.save_pretrained(convert.load_pretrained(src), out)
    back = from_pretrained(AutoModelForCausalLM, out)
    assert type(back) is type(lref)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
      np.testing.assert_array_equal(back(ids).logits.numpy(), lref(ids).logits.numpy())


def test_cli_import_then_export(chat, tmp_path, capsys):
  from transformers import InternVLForConditionalGeneration
  ref, ours = chat
  hf_dir = str(tmp_path / "hf")
  convert.save_pretrained(ours, hf_dir)
  ckpt = str(tmp_path / "ours")
  assert cli.main(["import", hf_dir, ckpt]) == 0
  assert os.path.isdir(os.path.join(ckpt, "checkpoints", "0", "state"))
  with open(os.path.join(ckpt, "model_config.json")) as f:
    assert json.load(f)["kind"] == "chat"
  restored = orbax_io.load_checkpoint(ckpt)
  assert_same_params(restored, ours)
  assert restored.config.to_dict() == ours.config.to_dict()
  out = str(tmp_path / "exported")
  assert cli.main(["export", ckpt, out]) == 0
  back = from_pretrained(InternVLForConditionalGeneration, out)
  ids, pixels = chat_inputs()
  np.testing.assert_array_equal(torch_chat_logits(back, ids, pixels).numpy(),
                                torch_chat_logits(ref, ids, pixels).numpy())
  assert cli.main(["import", str(tmp_path / "nowhere"), ckpt]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_seed_contrastive_exports_with_pytorch_code_that_computes_the_same(tmp_path):
  # no PyTorch library defines the seed design: the export carries its own modeling file, loaded by transformers'
  # trust_remote_code; its embeddings must equal ours (a bidirectional, mean-pooled text tower, left padding)
  from transformers import AutoModel
  from internvl_jax.models import internvl, presets
  cfg = presets.contrastive("tiny")
  cfg.text.qkv_bias = True
  model = internvl.InternVLContrastive(cfg, rngs=nnx.Rngs(3))
  out = str(tmp_path / "seed")
  convert.save_pretrained(model, out)
  with open(os.path.join(out, "config.json")) as f:
    meta = json.load(f)
  assert meta["model_type"] == "internvl_seed" and os.path.exists(os.path.join(out, "modeling_internvl_seed.py"))
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:  # transformers' InternViT names, [out, in]
    assert f.get_slice("vision_model.encoder.layer.1.attention.q_proj.weight").get_shape() == [32, 32]
  again = convert.load_pretrained(out)
  assert type(again) is internvl.InternVLContrastive
  assert_same_params(again, model)
  torch_model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
  ids = rng.integers(1, 128, (3, 7))
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  mask[2, 5:] = 0  # right padding
  img, txt, scale = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    t_img, t_txt, logits = torch_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                       input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  np.testing.assert_allclose(t_img.numpy(), np.asarray(img), atol=2e-5)
  np.testing.assert_allclose(t_txt.numpy(), np.asarray(txt), atol=2e-5)
  np.testing.assert_allclose(logits.numpy(), float(scale) * np.asarray(img) @ np.asarray(txt).T, rtol=1e-4)
