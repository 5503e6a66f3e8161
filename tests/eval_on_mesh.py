"""Helper for test_eval_mesh (run in a subprocess with 8 fake CPU devices): loads one tiny checkpoint on one
device in float32 (the reference: its single-device parity with transformers / the official modules is tested
elsewhere) and again on meshes and in bfloat16, and writes what the test compares to the JSON named on the
command line.

  python tests/eval_on_mesh.py contrastive|chat|workdir OUT.json DTYPE@MESH ...   (e.g. bfloat16@fsdp=4,tensor=2)
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

jax.config.update("jax_default_matmul_precision", "highest")

from flax import nnx  # noqa: E402

from internvl_jax import sharding  # noqa: E402
from internvl_jax.evaluate import models, placement  # noqa: E402
from internvl_jax.generate import generate  # noqa: E402



def errors(ours, ref) -> dict:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = float(np.max(np.abs(ours - ref)))
  return {"abs": err, "rel": err / float(np.max(np.abs(ref)))}


def bytes_check(m: models.EvalModel) -> dict:
  """Per-device parameter bytes as placement reports them, as device 0 really holds them (its shards' buffers),
  and as counted abstractly from the config and the sharding rules; per leaf: [total bytes, bytes on device 0]."""
  dev0 = jax.devices()[0]
  leaves = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(m.model))}
  on_dev0 = {k: int(sum(s.data.nbytes for s in a.addressable_shards if s.device == dev0)) for k, a in leaves.items()}
  cls, cfg = type(m.model), m.model.config
  dtype = str(next(iter(leaves.values())).dtype)
  shape = None if m.mesh is None else dict(m.mesh.shape)
  return {"reported": placement.param_bytes(m.model), "device0": sum(on_dev0.values()),
          "abstract": placement.abstract_param_bytes(lambda: cls(cfg, rngs=nnx.Rngs(0)), shape, dtype),
          "leaves": {k: [int(a.nbytes), on_dev0[k]] for k, a in leaves.items()},
          "describe": placement.describe(m.model, m.mesh)}


def contrastive_folder(root: str) -> str:
  """A tiny folder laid out like InternVL-14B (InternVL-G, LLaMA sentencepiece tokenizer): release_folders."""
  import release_folders
  return release_folders.internvl_14b(os.path.join(root, "internvl_g"))[0]


def chat_folder(root: str) -> str:
  """A tiny folder laid out like InternVL3-1B-hf (transformers-native, Qwen2 tokenizer, Jinja template)."""
  import release_folders
  return release_folders.internvl3_hf(os.path.join(root, "chat"))[0]


def contrastive_workdir(root: str) -> str:
  """A train.py-style workdir (config.json, tokenizer.json, an Orbax checkpoint) of a freshly initialised tiny
  contrastive model, written on one device without training."""
  from conftest import tiny_config
  from internvl_jax.data import demo, tokenizer
  from internvl_jax.train import checkpoint, config_checks, state as state_lib
  workdir = os.path.join(root, "workdir")
  os.makedirs(workdir)
  cfg = tiny_config("contrastive")  # the seed-style tiny model: a decoder text tower (the folder test has QLLaMA)
  tok = tokenizer.build_word_level(demo.DemoWorld("train", 64, 56).texts())
  config_checks.adapt_model_to_tokenizer(cfg, tok, built=True)
  tok.save(os.path.join(workdir, "tokenizer.json"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  setup = state_lib.setup_state(cfg, cfg.model, sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]))
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(0, setup.create(), {}, force=True)
  ckpt.close()
  return workdir


def embeddings(m: models.EvalModel, texts) -> dict:
  pixels = np.random.default_rng(1).standard_normal((6, m.image_size, m.image_size, 3)).astype(np.float32)
  return {"images": m.embed_images(pixels), "texts": m.embed_texts(texts),
          "probe": m.probe_features(pixels)}  # the linear probe's features: the tower's raw last block


def run_contrastive(load, texts, runs) -> dict:
  ref = load("float32", None)
  want = embeddings(ref, texts)
  out = {"single": bytes_check(ref)}
  for dtype, mesh in runs:  # every run is compared to the single-device float32 one (bf16 too)
    m = load(dtype, placement.make_mesh(mesh))
    got = embeddings(m, texts)
    out[f"{dtype} {mesh}"] = {"images": errors(got["images"], want["images"]),
                             "texts": errors(got["texts"], want["texts"]), "probe": errors(got["probe"], want["probe"]),
                             "bytes": bytes_check(m)}
  return out


def chat_inputs(m: models.EvalModel, rows: int):
  rng = np.random.default_rng(3)
  n = m.chat.tokens_per_tile
  ids = rng.integers(4, 90, (rows, 6 + n)).astype(np.int32)
  ids[:, 2:2 + n] = m.model.config.image_token_id
  mask = np.ones_like(ids)
  ids[1, :2], mask[1, :2] = 0, 0  # left padding
  pixels = rng.standard_normal((rows, m.image_size, m.image_size, 3)).astype(np.float32)
  return ids, mask, pixels


def chat_outputs(m: models.EvalModel) -> dict:
  out = {}
  for rows in (3, 8):  # 3 rows: generate() replicates them; 8: split over data x fsdp
    ids, mask, pixels = chat_inputs(m, rows)
    out[f"tokens{rows}"] = np.asarray(generate(m.model, ids, pixels, mask, max_new_tokens=6, eos_token_id=[7, 9],
                                               min_new_tokens=1))[:, ids.shape[1]:]  # the new tokens
  ids, mask, pixels = chat_inputs(m, 3)
  graphdef, state = nnx.split(m.model)

  def logits(s, i, p, k):
    with placement.mesh_context(m.mesh):
      return nnx.merge(graphdef, s)(i, p, k).logits

  out["logits"] = np.asarray(jax.jit(logits)(state, ids, pixels, mask))[mask.astype(bool)]
  prompts = [[int(x) for x, k in zip(r, mr) if k] for r, mr in zip(ids, mask)]
  out["answers"] = m.generate(pixels, prompts, 6)  # EvalModel pads the 3 rows to split them
  return out


def run_chat(folder: str, runs) -> dict:
  ref = models.load_hf(folder)
  want = chat_outputs(ref)
  out = {"single": bytes_check(ref)}
  for dtype, mesh in runs:
    m = models.load_hf(folder, dtype=dtype, mesh=placement.make_mesh(mesh))
    got = chat_outputs(m)
    out[f"{dtype} {mesh}"] = {
        "logits": errors(got["logits"], want["logits"]), "bytes": bytes_check(m),
        **{k: {"equal": bool(np.array_equal(got[k], want[k])), "agree": float(np.mean(got[k] == want[k]))}
           for k in ("tokens3", "tokens8")},
        "answers_equal": got["answers"] == want["answers"]}
  return out


def main(kind: str, path: str, *runs: str) -> None:
  assert jax.device_count() == 8, jax.device_count()
  runs = [tuple(r.split("@")) for r in runs]
  root = tempfile.mkdtemp()
  texts = ["a red circle", "the blue square", "one green image", "a"]
  if kind == "contrastive":
    folder = contrastive_folder(root)
    out = run_contrastive(lambda dtype, mesh: models.load_hf(folder, dtype=dtype, mesh=mesh), texts, runs)
  elif kind == "workdir":
    workdir = contrastive_workdir(root)
    out = run_contrastive(lambda dtype, mesh: models.load_workdir(workdir, "retrieval", dtype=dtype, mesh=mesh),
                          texts, runs)
  else:
    out = run_chat(chat_folder(root), runs)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])
