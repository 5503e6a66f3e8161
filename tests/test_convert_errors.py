"""User mistakes fail with one clear message; on-disk name variants, bfloat16 files and meshes load."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import hf_refs
from internvl_jax import convert
from internvl_jax.convert import orbax_io


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("vision"))
  hf_refs.vision_model("layer_norm", folder)
  return folder


def rewrite(src: str, dst: str, edit_tensors=None, edit_config=None) -> str:
  """Copies a single-file checkpoint folder with its tensors dict and/or config dict edited."""
  os.makedirs(dst, exist_ok=True)
  with safe_open(os.path.join(src, "model.safetensors"), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  tensors = edit_tensors(tensors) if edit_tensors else tensors
  config = edit_config(config) if edit_config else config
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return dst


def params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(convert.ConversionError, match="does not exist"):
    convert.load_pretrained(str(tmp_path / "nope"))
  with pytest.raises(convert.ConversionError, match="no config.json"):
    convert.load_pretrained(str(tmp_path))


def test_unknown_model_type(tmp_path, vision_dir):
  bad = rewrite(vision_dir, str(tmp_path / "bad"), edit_config=lambda c: dict(c, model_type="bert"))
  with pytest.raises(convert.ConversionError, match="unknown model_type 'bert'"):
    convert.load_pretrained(bad)


def test_internvl_14b_is_told_apart_from_transformers_internvl():
  from internvl_jax.convert import families
  assert families.detect({"model_type": "internvl", "architectures": ["InternVLModel"], "qllama_config": {}}) == \
      "internvl_14b"
  assert families.detect({"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
                          "text_config": {}}) == "internvl"
  assert families.detect({"model_type": "internvl", "architectures": ["InternVLModel"], "text_config": {}}) == \
      "internvl"


def test_pickles_are_refused_without_unpickling(tmp_path, vision_dir):
  folder = tmp_path / "pickled"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(vision_dir, "config.json")).read())
  (folder / "pytorch_model.bin").write_bytes(b"this would be unpickled")
  with pytest.raises(convert.ConversionError, match="unpickling runs code") as err:
    convert.load_pretrained(str(folder))
  assert "save_pretrained" in str(err.value) and "pytorch_model.bin" in str(err.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path, vision_dir):
  drop = "encoder.layer.1.mlp.fc2.bias"
  bad = rewrite(vision_dir, str(tmp_path / "missing"), lambda t: {k: v for k, v in t.items() if k != drop})
  with pytest.raises(convert.ConversionError, match=r"missing 1 tensor\(s\).*" + drop.replace(".", r"\.")):
    convert.load_pretrained(bad)
  extra = rewrite(vision_dir, str(tmp_path / "extra"), lambda t: dict(t, **{"head.weight": np.zeros((2, 2))}))
  with pytest.raises(convert.ConversionError, match=r"1 unexpected tensor\(s\).*head\.weight"):
    convert.load_pretrained(extra)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, vision_dir):
  bad = rewrite(vision_dir, str(tmp_path / "shape"), edit_config=lambda c: dict(c, intermediate_size=48))
  with pytest.raises(convert.ConversionError,
                     match=r"tensor 'encoder\.layer\.0\.mlp\.fc1\.bias' has shape \(64,\), expected \(48,\)"):
    convert.load_pretrained(bad)


def test_bfloat16_file_and_prefixed_names_load(tmp_path, vision_dir):
  import ml_dtypes
  ref = params(convert.load_pretrained(vision_dir))
  bf16 = rewrite(vision_dir, str(tmp_path / "bf16"),
                 lambda t: {"vision_tower." + k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  got = params(convert.load_pretrained(bf16))
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
  as_bf16 = convert.load_pretrained(bf16, dtype="bfloat16")
  assert as_bf16.config.dtype == "bfloat16"
  assert {v.dtype for v in params(as_bf16).values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_chat_in_memory_names_load(tmp_path):
  """transformers' in-memory names (model.vision_tower.*, model.language_model.*, lm_head.*) equal the on-disk
  legacy names."""
  native = str(tmp_path / "native")
  hf_refs.chat_model(hf_refs.QWEN2, native)

  def in_memory(t):
    out = {}
    for k, v in t.items():
      for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                       ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):
        if k.startswith(old):
          k = new + k[len(old):]
          break
      out[k] = v
    return out

  renamed = rewrite(native, str(tmp_path / "renamed"), in_memory)
  with safe_open(os.path.join(renamed, "model.safetensors"), "np") as f:
    assert "lm_head.weight" in f.keys() and "model.language_model.norm.weight" in f.keys()
  a, b = params(convert.load_pretrained(native)), params(convert.load_pretrained(renamed))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_mesh_of_four_cpu_devices(tmp_path):
  folder = str(tmp_path / "chat")
  hf_refs.chat_model(hf_refs.QWEN2, folder)
  script = textwrap.dedent(f"""
      import numpy as np
      import jax
      from jax.sharding import PartitionSpec as P
      from internvl_jax import convert, sharding
      assert jax.device_count() == 4
      mesh = sharding.make_mesh({{"fsdp": 2, "tensor": 2}})
      sharded = convert.load_pretrained({folder!r}, mesh=mesh)
      plain = convert.load_pretrained({folder!r})
      want = {{
          "language.layers.attn.q.kernel": P(None, "fsdp", "tensor"),
          "language.layers.mlp.down.kernel": P(None, "tensor", "fsdp"),
          "language.embed.embedding": P("tensor", "fsdp"),
          "vision.blocks.attn.qkv.kernel": P(None, "fsdp", "tensor"),
          "projector.linear_1.kernel": P("fsdp", "tensor"),
          "vision.blocks.norm1.scale": P(None, None),
      }}
      from flax import nnx
      flat = {{".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}}
      ref = {{".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}}
      for name, spec in want.items():
        assert flat[name].sharding.spec == spec, (name, flat[name].sharding.spec)
        assert flat[name].sharding.mesh.shape == mesh.shape
      for name in ref:
        np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(ref[name]), err_msg=name)
      print("ok", len(flat))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("ok")


def _convert_cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "internvl_jax.convert", *args], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_refuses_a_non_empty_out_dir_and_overwrite_replaces_it(tmp_path, vision_dir):
  other = str(tmp_path / "other")
  hf_refs.vision_model("layer_norm", other, seed=5)
  out = str(tmp_path / "out")
  assert _convert_cli("import", vision_dir, out).returncode == 0
  first = params(orbax_io.load_checkpoint(out))
  refused = _convert_cli("import", other, out)
  assert refused.returncode == 2
  lines = refused.stderr.strip().splitlines()
  assert len(lines) == 1 and "is not empty" in lines[0] and "--overwrite" in lines[0], refused.stderr
  kept = params(orbax_io.load_checkpoint(out))
  assert all(np.array_equal(first[k], kept[k]) for k in first)  # nothing of the second import landed
  assert _convert_cli("import", other, out, "--overwrite").returncode == 0
  replaced = params(orbax_io.load_checkpoint(out))
  expected = params(convert.load_pretrained(other))
  assert all(np.array_equal(expected[k], replaced[k]) for k in expected)
  assert not any(np.array_equal(first[k], replaced[k]) for k in first if first[k].size > 1)
  assert sorted(os.listdir(tmp_path)) == ["other", "out"]  # no temporary folders left behind


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, vision_dir):
  out = str(tmp_path / "out")
  assert _convert_cli("import", vision_dir, out).returncode == 0
  before = params(orbax_io.load_checkpoint(out))
  broken = rewrite(vision_dir, str(tmp_path / "broken"),
                   edit_tensors=lambda t: {k: v for k, v in t.items() if "patch_embedding" not in k})
  failed = _convert_cli("import", broken, out, "--overwrite")
  assert failed.returncode == 2 and "patch_embedding" in failed.stderr
  after = params(orbax_io.load_checkpoint(out))
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_non_finite_weights_are_named_and_refused_with_strict(tmp_path, vision_dir, caplog):
  def poison(tensors):
    name = sorted(k for k in tensors if k.endswith("fc1.weight"))[0]
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.nan
    return tensors
  bad = rewrite(vision_dir, str(tmp_path / "nan"), edit_tensors=poison)
  with caplog.at_level("WARNING"):
    convert.load_pretrained(bad)
  assert "1 tensors hold NaN or Inf" in caplog.text and "fc1.weight" in caplog.text
  with pytest.raises(convert.ConversionError, match="NaN or Inf"):
    convert.load_pretrained(bad, strict=True)
  refused = _convert_cli("import", bad, str(tmp_path / "out"), "--strict")
  assert refused.returncode == 2 and "fc1.weight" in refused.stderr
  assert not os.path.exists(tmp_path / "out")
  caplog.clear()
  with caplog.at_level("WARNING"):
    convert.load_pretrained(vision_dir)
  assert "NaN" not in caplog.text


@pytest.mark.parametrize("keep", [0.5, 20])  # cut in the data, cut in the header
def test_truncated_safetensors_names_the_file(tmp_path, vision_dir, keep):
  cut = rewrite(vision_dir, str(tmp_path / "cut"))
  path = os.path.join(cut, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep) if keep < 1 else keep)
  with pytest.raises(convert.ConversionError, match=r"model\.safetensors cannot be read .*truncated or corrupt"):
    convert.load_pretrained(cut)
