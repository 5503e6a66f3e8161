"""config.contrastive_accum_steps (train/contrastive_accum.py): a batch's gradient computed in K chunks against one
contrastive loss over the whole batch equals one step on the whole batch (loss, metrics, gradients, parameters
after the update), unlike averaging per-chunk losses (what grad_accum_steps does); the same on 8 fake devices with
remat (tests/contrastive_accum_on_mesh.py), for stage 2 and in bfloat16; drop-path uses the same keys in the
forward and the backward pass; one-line config errors; train.py trains with it.

Tolerances (float32, matmul precision 'highest' from conftest): the chunked and whole-batch steps sum the same
terms in another order, so they agree to float32 rounding. Measured on the tiny model, batch 16, 4 chunks: loss
|diff| 2.4e-7 (loss 3.41), gradients max |diff| 2.4e-6 on a leaf of max |g| 6.9 (relative <= 4e-7); checked at
relative 1e-5 of each leaf's largest entry + 1e-6. Parameters after one AdamW update with eps 1e-3 (with the
default 1e-6, Adam's first update g / (|g| + eps) magnifies rounding of near-zero gradients): checked at 1e-6
against updates of 1e-3. On 8 devices (batch 32, 4 chunks of 8, full remat): loss |diff| 9.5e-7 (loss 6.81),
gradient max |diff| 2.7e-5 on a leaf of max |g| 11.5, parameters 6.5e-7. The gradients come from the train step
itself: Adam's first moment after one update is (1 - b1) g.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internvl_jax.train import config_checks, contrastive_accum, state as state_lib, steps

from conftest import demo_batch, demo_state_setup, run_train_cli, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
B, K = 16, 4


def first_gradient(opt_state, b1: float):
  """The gradient of the first step, read back from Adam's first moment (mu = (1 - b1) g after one update)."""
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  return jax.tree.map(lambda m: np.asarray(m) / (1 - b1), adam[0].mu)


def assert_grads_close(ref, out, rel=1e-5, abs_=1e-6):
  """Leaf by leaf: |out - ref| <= rel * max |ref leaf| + abs_; returns the largest relative difference."""
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(out)):
    a, b = np.asarray(a), np.asarray(b)
    d, m = float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))
    assert d <= rel * m + abs_, (jax.tree_util.keystr(path), d, m)
    worst = max(worst, d / max(m, 1e-12))
  return worst


@pytest.fixture(scope="module")
def tiny_steps():
  """One train step of the tiny contrastive model on a batch of 16, whole (K=1) and in K=4 chunks."""
  out = {}
  for k in (1, K):
    cfg = tiny_config("contrastive", batch_size=B, contrastive_accum_steps=k, warmup_steps=0, grad_clip=0.0,
                      eps=1e-3)
    setup, tok = demo_state_setup(cfg)
    state = setup.create()
    params0 = jax.tree.map(np.asarray, state["params"])
    model0 = state_lib.merge_model(setup.graphdef, state)
    batch = demo_batch(cfg, tok, 0, B)
    embeddings = [np.asarray(e) for e in steps.contrastive_towers(model0, batch, None)]
    scale = float(jnp.exp(model0.logit_scale[...]))
    state, m = steps.make_train_step(setup, cfg)(state, batch)
    out[k] = dict(metrics={n: float(v) for n, v in m.items()}, grads=first_gradient(state["opt_state"], cfg.b1),
                  params=jax.tree.map(np.asarray, state["params"]), params0=params0, embeddings=embeddings,
                  scale=scale)
  return out


def test_chunked_step_equals_the_whole_batch_step(tiny_steps):
  whole, chunked = tiny_steps[1], tiny_steps[K]
  assert set(chunked["metrics"]) == set(whole["metrics"])
  for name, v in whole["metrics"].items():
    np.testing.assert_allclose(chunked["metrics"][name], v, rtol=1e-5, atol=1e-6, err_msg=name)
  assert assert_grads_close(whole["grads"], chunked["grads"]) < 1e-5
  assert abs(float(chunked["grads"]["logit_scale"])) > 1e-3  # the loss's own parameter gets its gradient
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(whole["params"]),
                                                            jax.tree.leaves(whole["params0"])))
  assert moved > 5e-4
  for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(chunked["params"])):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def _info_nce(img, txt, scale):
  """numpy symmetric InfoNCE (CLIP), targets on the diagonal."""
  logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
  lse = lambda x: np.log(np.sum(np.exp(x - x.max(1, keepdims=True)), 1)) + x.max(1)
  return 0.5 * (np.mean(lse(logits) - np.diag(logits)) + np.mean(lse(logits.T) - np.diag(logits)))


def test_loss_is_over_the_whole_batch_not_the_mean_of_chunk_losses(tiny_steps):
  # grad_accum_steps averages the chunks' own InfoNCE losses (each chunk's negatives: its 4 examples); the chunked
  # step's loss is the whole batch's (negatives: all 16), as a numpy InfoNCE on the towers' embeddings says
  img, txt = tiny_steps[K]["embeddings"]
  scale = tiny_steps[K]["scale"]
  whole = _info_nce(img, txt, scale)
  micro = np.mean([_info_nce(img[c::K], txt[c::K], scale) for c in range(K)])
  np.testing.assert_allclose(tiny_steps[K]["metrics"]["loss"], whole, rtol=1e-5)
  assert abs(micro - whole) > 0.3  # about log(16) vs log(4) at the near-random init


def test_config_errors_are_one_line():
  cases = [(dict(task="instruct", contrastive_accum_steps=2), "no contrastive loss"),
           (dict(batch_size=12, contrastive_accum_steps=8), "multiple of 8"),
           (dict(contrastive_accum_steps=0), "integer >= 1")]
  for overrides, text in cases:
    task = overrides.pop("task", "contrastive")
    cfg = tiny_config(task)
    with cfg.unlocked():
      for n, v in overrides.items():
        cfg[n] = v
    with pytest.raises(config_checks.ConfigError, match=text) as e:
      config_checks.validate(cfg, None)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="multiple of 64"):  # the step's own check: chunks of 2 rows over 8 shards
    contrastive_accum.check_chunks(16, 8, 8)


def _value_and_grad_both_ways(cfg, k, key=None, reference=None, chunked_too=True):
  """Jitted ((loss, metrics), grads): the whole-batch loss (or `reference(model, batch)`) and the k-chunk one."""
  setup, tok = demo_state_setup(cfg)
  state = setup.create()
  batch = demo_batch(cfg, tok, 0, cfg.batch_size)
  loss_fn = steps.LOSS_FNS[cfg.task]

  def whole(params, frozen):
    model = state_lib.merge_model(setup.graphdef, {"params": params, "frozen": frozen})
    return reference(model, batch) if reference else loss_fn(model, batch, key, cfg, setup.mesh)

  def chunked(params, frozen):
    return contrastive_accum.value_and_grad(setup.graphdef, params, frozen, batch, key, cfg, setup.mesh, k)

  with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
    ref = jax.jit(jax.value_and_grad(whole, has_aux=True))(state["params"], state["frozen"])
    out = jax.jit(chunked)(state["params"], state["frozen"]) if chunked_too else None
  return ref, out


@pytest.mark.slow
def test_alignment_chunked_equals_whole_batch():
  cfg = tiny_config("alignment", batch_size=8, caption_weight=0.7)
  ref, out = _value_and_grad_both_ways(cfg, 2)
  (l_ref, m_ref), g_ref = ref
  (l_out, m_out), g_out = out
  np.testing.assert_allclose(float(l_out), float(l_ref), rtol=1e-5)
  assert set(m_out) == set(m_ref) and float(m_ref["loss_caption"]) > 1.0
  for name in m_ref:
    np.testing.assert_allclose(float(m_out[name]), float(m_ref[name]), rtol=1e-5, atol=1e-6, err_msg=name)
  assert_grads_close(g_ref, g_out)


@pytest.mark.slow
def test_drop_path_keys_are_the_same_in_both_passes():
  # With drop-path on, the chunked gradient must be the exact gradient of the chunked forward (chunk c: rows c, c+K,
  # ..., key fold_in(key, c)): a backward pass with other masks than the forward pass would not be.
  cfg = tiny_config("contrastive", batch_size=8)
  cfg.model.vision.drop_path_rate = 0.5
  key = jax.random.key(3)
  k = 2

  def reference(model, batch):
    parts = [steps.contrastive_towers(model, {n: v[c::k] for n, v in batch.items()}, jax.random.fold_in(key, c))
             for c in range(k)]
    interleave = lambda xs: jnp.stack(xs, 1).reshape((-1,) + xs[0].shape[1:])  # back to rows 0, 1, 2, ...
    return steps.contrastive_head(model, interleave([p[0] for p in parts]), interleave([p[1] for p in parts]), cfg)

  ref, out = _value_and_grad_both_ways(cfg, k, key, reference)
  np.testing.assert_allclose(float(out[0][0]), float(ref[0][0]), rtol=1e-5)
  assert_grads_close(ref[1], out[1])
  no_drop, _ = _value_and_grad_both_ways(cfg, k, None)  # the masks matter: the loss without them differs
  assert abs(float(no_drop[0][0]) - float(ref[0][0])) > 1e-3


@pytest.mark.slow
def test_bfloat16_compute_chunked_is_as_close_to_float32_as_unchunked():
  # bfloat16 activations round differently in a chunk of 4 rows than in the batch of 16 (a leaf can differ by ~5%),
  # so the check is against float32: the chunked gradient is no further from it than the unchunked one
  f32, _ = _value_and_grad_both_ways(tiny_config("contrastive", batch_size=B), K, chunked_too=False)
  cfg = tiny_config("contrastive", batch_size=B)
  cfg.model.vision.dtype = cfg.model.text.dtype = "bfloat16"
  whole, chunked = _value_and_grad_both_ways(cfg, K)
  norm = lambda t: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(t))))
  err = lambda g: norm(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), g, f32[1])) / norm(f32[1])
  e_whole, e_chunked = err(whole[1]), err(chunked[1])
  print(f"bfloat16 gradient error vs float32: whole batch {e_whole:.2e}, {K} chunks {e_chunked:.2e}")
  assert 0 < e_whole < 0.05 and e_chunked < 1.5 * e_whole + 1e-3, (e_whole, e_chunked)
  np.testing.assert_allclose(float(chunked[0][0]), float(whole[0][0]), rtol=1e-3)
  np.testing.assert_allclose(float(chunked[0][0]), float(f32[0][0]), rtol=1e-2)


@pytest.mark.slow
def test_on_eight_devices_with_remat():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "contrastive_accum_on_mesh.py")], capture_output=True,
                        text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["chunk_spec"] == [None, ["data", "fsdp"]] and r["device0_rows"]  # every chunk on all 8 devices
  for name, v in r["1"].items():
    np.testing.assert_allclose(r["4"][name], v, rtol=1e-5, atol=1e-6, err_msg=name)
  for d, m in r["grad_diffs"]:
    assert d <= 1e-5 * m + 1e-6, (d, m)
  assert r["param_update_max_abs"] > 5e-4 and r["param_max_abs_diff"] <= 1e-6


@pytest.mark.slow
def test_train_cli_with_chunks_learns(tmp_path):
  records = run_train_cli(["--config", "configs/contrastive.py:model=tiny", "--config.contrastive_accum_steps=2",
                           "--config.batch_size=16", "--config.total_steps=40", "--config.warmup_steps=5",
                           "--config.lr=3e-3", "--config.log_every=5", "--config.eval_every=0",
                           "--config.eval_limit=16", "--config.data.train.size=640", "--config.data.eval.size=16",
                           "--config.data.max_text_len=12", "--config.progress=False", "--config.checkpoint_every=0",
                           "--config.data.num_threads=1"], str(tmp_path / "run"))
  losses = [r["loss"] for r in records if "loss" in r]
  print("train.py losses, contrastive_accum_steps=2:", [round(x, 3) for x in losses])
  assert len(losses) >= 6
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses


@pytest.mark.slow
def test_composes_with_grad_accum_steps():
  # grad_accum_steps=2 averages two batches' gradients; with contrastive_accum_steps=2 each batch's gradient is
  # computed in chunks, so the parameters after the two batches are those of the unchunked run
  params = {}
  for k in (1, 2):
    cfg = tiny_config("contrastive", batch_size=8, contrastive_accum_steps=k, grad_accum_steps=2, warmup_steps=0,
                      grad_clip=0.0, eps=1e-3, total_steps=4)
    setup, tok = demo_state_setup(cfg)
    state = setup.create()
    p0 = jax.tree.map(np.asarray, state["params"])
    step = steps.make_train_step(setup, cfg)
    state, _ = step(state, demo_batch(cfg, tok, 0, 8))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state["params"])))
    state, _ = step(state, demo_batch(cfg, tok, 8, 8))  # the update, from the mean of both batches' gradients
    params[k] = jax.tree.map(np.asarray, state["params"])
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(p0))) > 5e-4
  for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[2])):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
