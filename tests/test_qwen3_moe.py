"""Qwen3-MoE (InternVL3.5-30B-A3B / 241B-A28B language models): transformers' Qwen3MoeForCausalLM (4 experts, top-2,
layer 0 dense via mlp_only_layers) loads into our decoder and matches PyTorch: logits, the router load-balancing
loss, greedy generation with left padding, save_pretrained back; the same through an InternVL chat folder in both
layouts; and 8 fake devices with expert=4 (x data 2 or x fsdp 2) equal one device."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_refs
import opengvlab_layout
from internvl_jax import convert
from internvl_jax.generate import generate

jax.config.update("jax_default_matmul_precision", "highest")
HERE = os.path.dirname(os.path.abspath(__file__))
REL_TOL = 1e-5
IMG = 95
NEW = 8


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen3_moe"))
  ref = hf_refs.causal_lm(hf_refs.QWEN3_MOE, folder)
  return ref, convert.load_pretrained(folder), folder


def test_config_and_layer_stacks(lm):
  _, ours, _ = lm
  c = ours.config
  assert (c.num_experts, c.num_experts_per_tok, c.moe_mlp_dim, c.norm_topk_prob) == (4, 2, 24, True)
  assert list(c.mlp_only_layers) == [0] and c.router_aux_loss_coef == 0.01
  # layers 1, 2 routed (stacked experts [L, E, D, I]); layer 0 dense in its own stack
  assert ours.layers.mlp.gate.shape == (2, 4, 32, 24) and ours.layers.mlp.down.shape == (2, 4, 24, 32)
  assert ours.dense_layers.mlp.gate.kernel.shape == (1, 32, 64)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_and_router_loss_match_torch(lm, pad):
  ref, ours, _ = lm
  ids, mask = hf_refs.prompts(pad)
  hf_refs.check_logits_and_router_loss(ref, ours, ids, mask, f"qwen3_moe pad={pad}", REL_TOL)


def test_greedy_generate_with_left_padding_equals_torch(lm):
  ref, ours, _ = lm
  ids, mask = hf_refs.prompts(True)
  with torch.no_grad():
    want = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=NEW).numpy()
  np.testing.assert_array_equal(np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW)), want)


def test_experts_run_as_grouped_matmuls_not_a_dense_einsum(lm):
  _, ours, _ = lm
  text = str(jax.make_jaxpr(lambda ids: ours(ids).logits)(jnp.zeros((1, 5), jnp.int32)))
  assert text.count("ragged_dot") >= 3  # gate, up, down (inside the scan over the MoE layers)


def test_save_pretrained_writes_per_expert_tensors_transformers_loads(lm, tmp_path):
  from transformers import Qwen3MoeForCausalLM
  ref, ours, _ = lm
  convert.save_pretrained(ours, str(tmp_path))
  back = Qwen3MoeForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = hf_refs.prompts(True)
  with torch.no_grad():
    a = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    b = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  np.testing.assert_array_equal(a, b)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["mlp_only_layers"] == [0]


def test_decoder_sparse_step_interleaves_dense_and_moe_layers(tmp_path):
  """decoder_sparse_step 2 over 3 layers: dense, MoE, dense (three runs of scans, the KV cache in layer order)."""
  ref = hf_refs.causal_lm(dict(hf_refs.QWEN3_MOE, mlp_only_layers=[], decoder_sparse_step=2, norm_topk_prob=False),
                          str(tmp_path))
  ours = convert.load_pretrained(str(tmp_path))
  assert ours.layers.mlp.gate.shape[0] == 1 and ours.dense_layers.mlp.gate.kernel.shape[0] == 2
  ids, mask = hf_refs.prompts(True)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  assert hf_refs.errors(got[mask.astype(bool)], want[mask.astype(bool)])[1] < REL_TOL
  # KV-cache decoding through the three runs equals the full forward
  out = ours(jnp.asarray(ids[:, :5]), attention_mask=jnp.asarray(mask[:, :5]), cache=ours.init_cache(2, 7))
  steps = [np.asarray(out.logits)]
  for t in (5, 6):
    out = ours(jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.asarray(mask[:, t:t + 1]), cache=out.cache)
    steps.append(np.asarray(out.logits))
  assert hf_refs.errors(np.concatenate(steps, 1)[mask.astype(bool)], got[mask.astype(bool)])[1] < 1e-6


@pytest.mark.parametrize("layout", ["native", "opengvlab"])
def test_chat_folders_match_torch(tmp_path, layout):
  native = str(tmp_path / "native")
  ref = hf_refs.chat_model(hf_refs.QWEN3_MOE, native, image_token_id=IMG)
  folder = native
  if layout == "opengvlab":
    folder = str(tmp_path / "opengvlab")
    opengvlab_layout.chat_to_opengvlab(native, folder, "qwen3_moe")
  ours = convert.load_pretrained(folder)
  assert ours.config.language.num_experts == 4
  rng = np.random.default_rng(4)
  ids = rng.integers(0, IMG, (2, 11)).astype(np.int64)
  ids[0, 2:6], ids[1, 5:9] = IMG, IMG
  mask = np.ones_like(ids)
  ids[1, :3], mask[1, :3] = 0, 0
  pixels = rng.standard_normal((2, 56, 56, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(mask)).logits)
  abs_err, rel_err = hf_refs.errors(got[mask.astype(bool)], want[mask.astype(bool)])
  print(f"chat qwen3_moe {layout} logits: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


@pytest.mark.parametrize("mesh", ["fsdp=2,expert=4", pytest.param("data=2,expert=4", marks=pytest.mark.slow)])
def test_eight_devices_with_expert_4_equal_one_device(lm, mesh):
  _, _, folder = lm
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  slow = mesh.startswith("data")  # the slow variant also generates (greedy, KV cache) on the mesh
  proc = subprocess.run([sys.executable, os.path.join(HERE, "moe_on_mesh.py"), folder, mesh] + ["--generate"] * slow,
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"8 devices ({mesh}) vs 1: {r}")
  assert r.pop("devices") == 8 and set(r) == {f"{mesh}/rows8", f"{mesh}/rows2"}
  for name, c in r.items():
    assert c["expert_spec"][:2] == ["None", "expert"]  # [L, E, D, I]: experts split 4 ways
    assert c["shard_map"]  # each device runs its own experts
    assert c["logits_rel"] < 1e-5 and abs(c["aux"][0] - c["aux"][1]) < 1e-6, name
    assert c["expert_grad_max"] > 0 and c["grad_rel"] < 1e-5, name
    assert c.get("generate_equal", not slow), name  # tokens equal one device's, 8 rows (gather) and 3 (psum)
  # 8 rows: the batch (so attention too) split 8 ways, 'expert' included; tokens gathered to their experts over
  # 'expert' and the outputs reduce-scattered back
  c = r[f"{mesh}/rows8"]
  assert "expert" in c["logits_spec"] and c["all_gather"] and c["reduce_scatter"]
  # 2 rows cannot split 8 ways: split over data / fsdp only, the same tokens along 'expert', outputs psum-ed
  c = r[f"{mesh}/rows2"]
  assert c["logits_spec"] == f"P('{mesh.split('=')[0]}',)" and not c["reduce_scatter"]


def test_stage3_loss_adds_the_router_loss_with_the_config_coefficient():
  from flax import nnx

  from internvl_jax import losses
  from internvl_jax.models import internvl, presets
  from internvl_jax.train import steps
  cfg = presets.chat("tiny")
  cfg.language.update(qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_mlp_dim=16, router_aux_loss_coef=0.5)
  model = internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (2, 12)).astype(np.int32)
  ids[:, 1:5] = cfg.image_token_id
  batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=(np.arange(12) > 6)[None].repeat(2, 0),
               pixel_values=rng.standard_normal((2, 1, 56, 56, 3)).astype(np.float32))


  @nnx.jit
  def both(model, batch):
    loss, metrics = steps.instruct_loss_fn(model, batch, None, None)
    out = model(batch["input_ids"], batch["pixel_values"][:, 0], batch["attention_mask"])
    lm, _ = losses.lm_loss(out.logits, *losses.shift_for_next_token(batch["input_ids"], batch["loss_mask"]))
    return loss, metrics["router_aux_loss"], lm, out.aux_loss

  loss, metric, lm, aux = map(float, both(model, batch))
  assert aux > 0
  np.testing.assert_allclose(loss, lm + 0.5 * aux, rtol=1e-6)
  np.testing.assert_allclose(metric, aux, rtol=1e-6)


def test_30b_a3b_preset_counts_what_transformers_does_and_its_active_parameters():
  from flax import nnx
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

  from internvl_jax.bench import flops
  from internvl_jax.models import llm, presets
  cfg = presets.language("qwen3_30b_a3b")
  ours = nnx.eval_shape(lambda: llm.Decoder(cfg, rngs=nnx.Rngs(0)))
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  with torch.device("meta"):
    theirs = Qwen3MoeForCausalLM(Qwen3MoeConfig(**convert.configs.language_to_hf(cfg)))
  assert n_ours == sum(p.numel() for p in theirs.parameters()) == 30_532_122_624
  # per token: attention + router + 8 of 128 experts per layer, and the LM head (Qwen's "A3B": 3.3 B with embeddings)
  d, hd = 2048, 128
  attn = 2 * d * 32 * hd + 2 * d * 4 * hd
  assert flops.decoder_matmul_params(cfg) == 48 * (attn + d * 128 + 8 * 3 * d * 768) + d * 151936


def test_chat_save_pretrained_round_trips_through_transformers(tmp_path):
  from transformers import InternVLForConditionalGeneration
  native = str(tmp_path / "native")
  ref = hf_refs.chat_model(hf_refs.QWEN3_MOE, native, image_token_id=IMG)
  convert.save_pretrained(convert.load_pretrained(native), str(tmp_path / "out"))
  back = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
  assert back.config.text_config.model_type == "qwen3_moe"
  ids = np.random.default_rng(5).integers(0, IMG, (1, 9)).astype(np.int64)
  ids[0, 2:6] = IMG
  px = torch.from_numpy(np.random.default_rng(6).standard_normal((1, 3, 56, 56)).astype(np.float32))
  with torch.no_grad():
    np.testing.assert_array_equal(ref(input_ids=torch.from_numpy(ids), pixel_values=px).logits.numpy(),
                                  back(input_ids=torch.from_numpy(ids), pixel_values=px).logits.numpy())
