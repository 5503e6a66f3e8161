"""Evaluating on a mesh and in bfloat16 (eval.py --mesh / --dtype) on 8 fake CPU devices: embeddings and greedy
tokens equal the single-device float32 run (whose parity with transformers / the official modules is tested in
test_convert_*), and the parameter bytes per device are what the sharding rules give. The 8-device work runs in
subprocesses (tests/eval_on_mesh.py; eval.py), since the device count is fixed when JAX starts."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from internvl_jax.evaluate import placement, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_TOL = 1e-5  # max abs error of unit-norm embeddings, sharded vs one device (measured <= 1e-6)
BF16_TOL = 0.04  # the same, bfloat16 vs float32 (measured <= 9e-3 on the tiny models)
BF16_LOGITS_REL = 0.05  # max |bf16 - f32| / max |f32| of chat logits (measured 0.010)


def _env():
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))


def _on_mesh(tmp_path, kind: str, *runs: str) -> dict:
  out = str(tmp_path / f"{kind}.json")
  res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "eval_on_mesh.py"), kind, out, *runs],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def _check_bytes(b: dict, mesh: str | None) -> None:
  # what placement reports is what device 0 really holds, and what the abstract count (README figures) predicts
  assert b["reported"]["per_device"] == b["device0"] == b["describe"]["param_bytes_per_device"]
  assert b["abstract"] == b["reported"]
  leaves = b["leaves"]
  if mesh is None:
    assert b["device0"] == b["reported"]["total"]
    return
  # fsdp=8 and fsdp=4,tensor=2: attention / MLP kernels have an 'embed' and a 'heads' / 'mlp' axis, split 8 ways
  kernels = {n: v for n, v in leaves.items() if re.search(r"(attn|mlp|attention)/[^/]+/kernel$", n)}
  assert len(kernels) >= 4 and all(total == 8 * dev0 for total, dev0 in kernels.values()), kernels
  norms = {n: v for n, v in leaves.items() if re.search(r"norm[^/]*/scale$", n)}  # replicated by the rules
  assert norms and all(total == dev0 for total, dev0 in norms.values())


def _check_contrastive(out: dict) -> None:
  _check_bytes(out["single"], None)
  for run, r in out.items():
    if run == "single":
      continue
    dtype, mesh = run.split(" ")
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    print(f"{run}: images max abs {r['images']['abs']:.2e}, texts {r['texts']['abs']:.2e}, probe features max "
          f"rel {r['probe']['rel']:.2e}; {r['bytes']['device0']} of {r['bytes']['reported']['total']} bytes per device")
    assert r["images"]["abs"] < tol and r["texts"]["abs"] < tol
    assert r["probe"]["rel"] < tol  # eval.py --task linear_probe's features (relative: they are not unit-norm)
    _check_bytes(r["bytes"], mesh)
    assert r["bytes"]["describe"]["dtype"] == dtype
    assert r["bytes"]["describe"]["mesh"] == placement.parse_mesh(mesh)
  f32, bf16 = out.get("float32 fsdp=4,tensor=2"), out.get("bfloat16 fsdp=4,tensor=2")
  if f32 and bf16:
    assert 2 * bf16["bytes"]["device0"] == f32["bytes"]["device0"]


def test_internvl14b_layout_folder_embeds_equally_on_meshes(tmp_path):
  """InternVL-G (InternViT-6B-style tower, QLLaMA text tower, attention pooling) from an InternVL-14B-layout
  folder: --hf with --mesh fsdp=8 / fsdp=4,tensor=2, and bfloat16."""
  _check_contrastive(_on_mesh(tmp_path, "contrastive", "float32@fsdp=8", "float32@fsdp=4,tensor=2",
                              "bfloat16@fsdp=4,tensor=2"))


def test_workdir_checkpoint_is_read_onto_the_mesh(tmp_path):
  """A train.py workdir: the Orbax checkpoint is read straight into the mesh's shardings (and cast)."""
  _check_contrastive(_on_mesh(tmp_path, "workdir", "float32@fsdp=8", "bfloat16@fsdp=4,tensor=2"))


def _check_chat(out: dict) -> None:
  _check_bytes(out["single"], None)
  for run, r in out.items():
    if run == "single":
      continue
    dtype, mesh = run.split(" ")
    print(f"{run}: logits max rel {r['logits']['rel']:.2e}; tokens agree {r['tokens3']['agree']:.3f} / "
          f"{r['tokens8']['agree']:.3f}; {r['bytes']['device0']} of {r['bytes']['reported']['total']} bytes")
    _check_bytes(r["bytes"], mesh)
    if dtype == "float32":
      assert r["logits"]["rel"] < F32_TOL
      assert r["tokens3"]["equal"] and r["tokens8"]["equal"] and r["answers_equal"]
    else:  # a random model has near-ties: bf16 may flip a rare greedy choice
      assert r["logits"]["rel"] < BF16_LOGITS_REL
      assert min(r["tokens3"]["agree"], r["tokens8"]["agree"]) >= 0.9


def test_chat_generates_equally_on_a_mesh(tmp_path):
  """A transformers-native chat folder (Qwen2): greedy tokens from generate() (3 rows: replicated; 8: split) and
  EvalModel.generate (rows padded to split) equal the single-device run on fsdp=4,tensor=2."""
  _check_chat(_on_mesh(tmp_path, "chat", "float32@fsdp=4,tensor=2"))


@pytest.mark.slow  # ~1 min on a busy 2-core machine: two more model loads and generate compilations
def test_chat_generates_equally_on_fsdp8_and_in_bfloat16(tmp_path):
  _check_chat(_on_mesh(tmp_path, "chat", "float32@fsdp=8", "bfloat16@fsdp=4,tensor=2"))


def test_mesh_flag_errors_are_one_line():
  assert placement.parse_mesh(None) is None and placement.parse_mesh("none") is None
  assert placement.parse_mesh("fsdp=4,tensor=2") == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  assert placement.parse_mesh(" data=2 , fsdp=-1") == {"data": 2, "fsdp": -1, "expert": 1, "tensor": 1}
  for bad, message in (("fsdp", "is not axis=size"), ("model=2", "is not axis=size"), ("fsdp=0", "is not axis"),
                       ("fsdp=2,fsdp=2", "is not axis"), ("fsdp=00", "is not axis"), ("fsdp=x", "is not axis"), ("fsdp=-1,data=-1", "only one")):
    with pytest.raises(ValueError, match=message) as e:
      placement.parse_mesh(bad)
    assert "\n" not in str(e.value)
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"needs {2 * n} devices but JAX sees {n}"):
    placement.make_mesh(f"fsdp={2 * n}")
  assert placement.make_mesh(f"fsdp={n}").size == n


def test_internvl14b_figures_are_counted_abstractly():
  """The README's InternVL-14B figures: 13.8 B parameters (InternViT-6B + QLLaMA with its 49954-token
  vocabulary and LM head), split 8 ways except the small replicated rest."""
  build = placement._builder("internvl_14b")
  one = placement.abstract_param_bytes(build, None, "float32")
  assert 13.7e9 < one["total"] / 4 < 13.9e9 and one["per_device"] == one["total"]
  for mesh in ({"fsdp": 8}, {"fsdp": 4, "tensor": 2}):
    bf16 = placement.abstract_param_bytes(build, mesh, "bfloat16")
    assert bf16["total"] * 2 == one["total"]
    assert bf16["total"] / 8 <= bf16["per_device"] < bf16["total"] / 8 * 1.01
  # QLLaMA's 49954-token vocabulary does not split 4 ways: a one-line error names it (the loaders check too)
  with pytest.raises(ValueError, match=r"cannot split parameter text/decoder/embed/embedding of shape "
                     r"\(49954, 4096\) evenly \(tensor = 4 ways"):
    placement.abstract_param_bytes(build, {"tensor": 4}, "bfloat16")


def test_eval_cli_runs_sharded_in_bfloat16_and_records_it(tmp_path):
  import release_folders
  folder = release_folders.internvl_14b(str(tmp_path / "internvl_g"))[0]
  base = [sys.executable, os.path.join(ROOT, "eval.py"), "--progress=false", "--task", "retrieval", "--hf",
          str(folder), "--data", "demo:4", "--batch_size", "4", "--cache_dir", str(tmp_path / "cache")]
  res = subprocess.run(base + ["--mesh", "fsdp=3"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1] == ("error: --mesh 'fsdp=3' needs 3 devices but JAX sees 8; make the "
                                                 "sizes multiply to 8 (e.g. --mesh fsdp=8)")
  out = str(tmp_path / "retrieval.json")
  res = subprocess.run(base + ["--mesh", "fsdp=4,tensor=2", "--dtype", "bfloat16", "--out", out], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(out))
  report.validate_result(result)
  assert result["dtype"] == "bfloat16" and result["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  assert result["devices"] == 8 and result["param_bytes_per_device"] < result["param_bytes_total"] / 4
  assert re.search(r"loaded .*: bfloat16 parameters, .* GiB .* in all, .* per device \(8 device", res.stdout)


def test_splash_attention_on_a_mesh_takes_a_batch_that_does_not_split():
  """A short evaluation batch (3 rows on fsdp=4) runs the splash kernel replicated instead of failing in
  shard_map; the Pallas interpreter stands in for the TPU kernel."""
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from internvl_jax import sharding
from internvl_jax.models import attention
mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
rng = np.random.default_rng(0)
q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal((3, 8, 2, 64)), jnp.float32), NamedSharding(mesh, P()))
           for _ in range(3))
def f(q, k, v):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return attention.splash_attention(q, k, v, interpret=True)
err = jnp.max(jnp.abs(jax.jit(f)(q, k, v) - attention.dot_product_attention(q, k, v, impl="xla")))
print("max err", float(err))
"""
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert float(res.stdout.split()[-1]) < 1e-5


def test_result_placement_fields_are_validated():
  ok = report.vqa_result("d", 1, 50.0, [], dtype="bfloat16", mesh={"data": 1, "fsdp": 8, "tensor": 1}, devices=8,
                         param_bytes_total=800, param_bytes_per_device=100)
  report.validate_result(ok)
  for field, value, message in (("param_bytes_per_device", 900, "exceeds param_bytes_total"),
                                ("devices", 0, "devices must be a positive integer"),
                                ("mesh", {"fsdp": "8"}, "mesh must be null or a map")):
    with pytest.raises(ValueError, match=message):
      report.validate_result(dict(ok, **{field: value}))
