"""Packed stage-3 batches (data/packing.py): isolation of examples in a row, the vision tower's tile budget, the
packing order and its resumption, the LM loss, and train.py with data.packing=True."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import run_train_cli

from internvl_jax import losses
from internvl_jax.data import demo, features, packing, pipeline, tokenizer
from internvl_jax.models import attention, internvl, llm, presets, vit
from internvl_jax.train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, PER_TILE, T = 56, 4, 40  # tiny chat model: 56 px tiles, 4 vision tokens each
# image shapes (h, w) -> tiles at max_dynamic_patch 4: wide 2 + thumbnail, square 1, tall 3 + thumbnail; None: text
SHAPES = [(56, 112), None, (56, 56), (168, 56), (112, 56), (56, 56), None, (56, 168), (56, 112), (56, 56)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.build_word_level(demo.DemoWorld("train", 200, 56).texts())


def _records(n=len(SHAPES), seed=0):
  world = demo.DemoWorld("train", n, 56)
  out = []
  for i in range(n):
    rec = dict(world[i], id=f"r{i}")
    shape = SHAPES[i % len(SHAPES)]
    if shape is None:
      del rec["image"]
    else:
      rec["image"] = np.random.default_rng(seed + i).integers(0, 255, shape + (3,)).astype(np.uint8)
    out.append(rec)
  return out


def _spec(tok, rows=2, tiles=12):
  return packing.PackSpec(rows=rows, max_len=T, tiles=tiles, image_size=S, tokens_per_tile=PER_TILE,
                          image_token_id=tok.image_token_id, pad_id=tok.pad_id)


def _features(tok, **kw):
  spec = features.FeatureSpec("instruct", S, T, tokens_per_tile=PER_TILE, max_tiles=5, packed=True, **kw)
  return features.make_feature_fn(spec, tok)


@pytest.fixture(scope="module")
def model(tok):
  cfg = presets.chat("tiny")
  cfg.language.vocab_size, cfg.image_token_id = 32, tok.image_token_id
  assert tok.vocab_size <= 32
  # random weights drawn with numpy into the abstract model: initialising it op by op compiles for ~15 s
  graphdef, state = nnx.split(nnx.eval_shape(lambda: internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  draw = lambda path, s: jnp.asarray(rng.normal(1.0 if "scale" in jax.tree_util.keystr(path) else 0.0, 0.1, s.shape),
                                     s.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@nnx.jit
def _logits(model, ids, px, attn, segment_ids=None, vision_index=None):
  return model(ids, px, attn, segment_ids=segment_ids, vision_index=vision_index).logits


def _builder(tok, examples, **kw):
  """One batch packed from the examples' prefix that fits (the examples that did not fit are returned too)."""
  b = packing.BatchBuilder(_spec(tok, **kw))
  for i, ex in enumerate(examples):
    if not b.add(ex):
      return b, examples[i:]
  return b, []


def _alone(model, ex):
  """The example run by itself, unpacked: its real tiles, right-padded to T (one shape: fewer compilations)."""
  n = len(ex["input_ids"])
  px = jnp.asarray(ex["pixel_values"]) if len(ex["pixel_values"]) else None
  ids = np.zeros((1, T), np.int32)
  ids[0, :n] = ex["input_ids"]
  return np.asarray(_logits(model, jnp.asarray(ids), px, jnp.asarray(ids != 0))[0, :n])


def _packed_call(model, batch, **kw):
  args = {k: jnp.asarray(batch[k]) for k in ("segment_ids", "vision_index")}
  args.update(kw)
  return np.asarray(_logits(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                            jnp.asarray(batch["attention_mask"]), **args))


def test_packed_row_logits_equal_each_example_run_alone(tok, model):
  examples = [_features(tok)(r, None) for r in _records()[:5]]
  b, _ = _builder(tok, examples, rows=2, tiles=12)
  assert len(b) >= 3 and max(seg for seg in b.build()["segment_ids"].max(axis=1)) >= 2  # a row holds 2 examples
  batch = b.build()
  got = _packed_call(model, batch)
  for row, start, ex in b.items:
    want = _alone(model, ex)
    np.testing.assert_allclose(got[row, start:start + len(want)], want, atol=2e-5, rtol=1e-5)
  # the test can fail: attention across the examples of a row changes the second example's logits
  row, start, ex = next(item for item in b.items if item[1] > 0)
  want = _alone(model, ex)
  crossing = _packed_call(model, batch, segment_ids=jnp.asarray((batch["segment_ids"] > 0).astype(np.int32)))
  assert np.abs(crossing[row, start:start + len(want)] - want).max() > 1e-3
  # RoPE is relative: inside a segment-masked example a constant position offset leaves the logits unchanged, so
  # the restart of positions is checked on the positions themselves (test_segment_mask_and_positions_formulas)
  # and here on what the decoder uses by default
  pos = np.asarray(llm.segment_positions(jnp.asarray(batch["segment_ids"])))
  np.testing.assert_array_equal(pos[row, start:start + len(want)], np.arange(len(want)))


def test_segment_mask_and_positions_formulas():
  seg = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], np.int32)
  m = np.asarray(attention.segment_mask(jnp.asarray(seg), jnp.asarray(seg)))[:, 0]
  want = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  np.testing.assert_array_equal(m, want)
  pos = np.asarray(llm.segment_positions(jnp.asarray(seg)))
  np.testing.assert_array_equal(pos[seg > 0], [0, 1, 0, 1, 2, 0, 0, 0, 1])


def test_vision_tower_runs_on_the_tile_budget_and_tokens_read_their_own_tiles(tok, model, monkeypatch):
  examples = [_features(tok)(r, None) for r in _records()[:5]]
  b, _ = _builder(tok, examples, rows=2, tiles=12)
  batch = b.build()
  seen = []
  original = vit.InternViT.__call__

  def spy(self, pixel_values, *a, **kw):
    seen.append(np.asarray(pixel_values))
    return original(self, pixel_values, *a, **kw)

  monkeypatch.setattr(vit.InternViT, "__call__", spy)
  model(*(jnp.asarray(batch[k]) for k in ("input_ids", "pixel_values", "attention_mask")),  # eager: spied
        segment_ids=jnp.asarray(batch["segment_ids"]), vision_index=jnp.asarray(batch["vision_index"]))
  assert len(seen) == 1 and seen[0].shape == (12, S, S, 3)  # the fixed budget, whatever the real count
  items = sorted(b.items, key=lambda x: x[:2])
  real = np.concatenate([ex["pixel_values"] for _, _, ex in items])
  assert 0 < len(real) < 12
  np.testing.assert_array_equal(seen[0][:len(real)], real)  # real tiles in row-major order of their tokens
  assert not seen[0][len(real):].any()  # then zero tiles
  used = set()
  for row, start, ex in items:
    image = np.flatnonzero(ex["input_ids"] == tok.image_token_id)
    assert len(image) == PER_TILE * len(ex["pixel_values"])
    tiles = batch["vision_index"][row, start + image] // PER_TILE
    # every image token of this example reads a tile holding this example's own pixels, its tiles in order
    np.testing.assert_array_equal(seen[0][tiles], np.repeat(ex["pixel_values"], PER_TILE, axis=0))
    assert not used & set(tiles.tolist())
    used |= set(tiles.tolist())
  assert used == set(range(len(real)))  # padding tiles are never referenced
  assert (batch["input_ids"] == tok.image_token_id).sum() == len(real) * PER_TILE


def _reference_first_fit(lengths, tiles, rows, max_len, budget):
  """Greedy first fit in arrival order, written out: -> per example (batch, row, start)."""
  out, batch, used, tiles_used = [], 0, [0] * rows, 0
  for n, t in zip(lengths, tiles):
    row = next((r for r in range(rows) if used[r] + n <= max_len), None) if tiles_used + t <= budget else None
    if row is None:
      batch, used, tiles_used = batch + 1, [0] * rows, 0
      row = 0
    out.append((batch, row, used[row]))
    used[row] += n
    tiles_used += t
  return out


def test_packing_is_first_fit_in_arrival_order(tok):
  examples = [_features(tok)(r, None) for r in _records(20)]
  batches = packing.pack(examples, _spec(tok, rows=2, tiles=6))
  want = _reference_first_fit([len(e["input_ids"]) for e in examples], [len(e["pixel_values"]) for e in examples],
                              2, T, 6)
  assert len(batches) == want[-1][0] + 1
  seg_count = {}
  for ex, (bi, row, start) in zip(examples, want):
    seg_count[bi, row] = seg_count.get((bi, row), 0) + 1
    got = batches[bi]
    np.testing.assert_array_equal(got["input_ids"][row, start:start + len(ex["input_ids"])], ex["input_ids"])
    assert (got["segment_ids"][row, start:start + len(ex["input_ids"])] == seg_count[bi, row]).all()
  for got in batches:
    assert got["pixel_values"].shape == (6, S, S, 3) and got["input_ids"].shape == (2, T)
  with pytest.raises(ValueError, match="tile budget"):
    packing.pack(examples, _spec(tok, rows=2, tiles=2))  # a 4-tile example can never fit 2


def test_packed_pipeline_is_deterministic_resumes_exactly_and_counts_never_fitting_records(tok):
  recs = _records(30)
  make = lambda tracker=None: iter(pipeline.train_dataset(
      recs, _features(tok), global_batch=2, seed=5, tracker=tracker or pipeline.BadRecordTracker(), num_threads=1,
      packing=_spec(tok, rows=2, tiles=6)))
  a = make()
  first = [next(a) for _ in range(3)]
  state = a.get_state()
  rest = [next(a) for _ in range(4)]
  b = make()
  for want in first:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  c = make()
  c.set_state(state)
  for want in rest:
    got = next(c)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # a budget of 3 tiles: the 4-tile records can never fit and are counted as bad records
  tracker = pipeline.BadRecordTracker(max_fraction=0.5, min_seen=1000)
  it = iter(pipeline.train_dataset(recs, _features(tok), global_batch=2, seed=5, tracker=tracker, num_threads=1,
                                   packing=_spec(tok, rows=2, tiles=3)))
  for _ in range(6):
    assert next(it)["pixel_values"].shape == (3, S, S, 3)
  assert tracker.bad >= 1 and tracker.bad < tracker.seen and "tile budget" in tracker.examples[0]


def test_packed_lm_loss_is_the_token_average_of_the_examples_alone(tok, model):
  examples = [_features(tok)(r, None) for r in _records()[:6]]
  b, _ = _builder(tok, examples, rows=2, tiles=12)
  batch = {k: jnp.asarray(v) for k, v in b.build().items()}
  loss, metrics = steps.instruct_loss_fn(model, batch, None, ml_collections.ConfigDict(dict(task="instruct")))
  ce_sum, count = 0.0, 0
  for _, _, ex in b.items:
    logits = _alone(model, ex)[:-1].astype(np.float64)
    targets, mask = ex["input_ids"][1:], ex["loss_mask"][1:].astype(bool)
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    ce_sum += (lse - logits[np.arange(len(targets)), targets])[mask].sum()
    count += mask.sum()
  assert int(metrics["tokens"]) == count
  np.testing.assert_allclose(float(loss), ce_sum / count, rtol=1e-5)
  # per-example counts for a per-example reduction: one (row, segment) = one example
  _, mask = losses.shift_for_next_token(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
  counts = np.asarray(losses.example_token_counts(mask, batch["segment_ids"]))
  for row, start, ex in b.items:
    assert (counts[row, start:start + len(ex["input_ids"])] == ex["loss_mask"][1:].sum()).all()


@pytest.mark.slow  # compiles the tiny chat model in a subprocess: 20-40 s on 2 busy cores
def test_train_cli_runs_stage3_with_packing(tmp_path):
  wd = str(tmp_path / "run")
  args = ["--config", "configs/instruct.py:model=tiny", "--config.total_steps=3",
          "--config.batch_size=2", "--config.log_every=1", "--config.warmup_steps=1", "--config.progress=False",
          "--config.data.num_threads=1", "--config.data.max_tiles=5", "--config.data.packing=True",
          "--config.data.tiles_per_batch=6", "--config.data.train.size=64", "--config.data.eval.source="]
  records = run_train_cli(args, wd)
  assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
  assert records[0]["tokens"] > 2 * 2 and records[0]["examples"] > 2  # more examples than rows: packed


def test_default_tile_budget_follows_the_sampled_tiles_per_token():
  ex = lambda tiles, tokens: {"pixel_values": np.zeros((tiles, 1, 1, 3)), "input_ids": np.zeros(tokens)}
  # 6 tiles in 50 tokens: a 48-token row holds ceil(48 * 6 / 50) = 6 tiles -> 16 rows x 6
  assert packing.default_tiles_per_batch(16, 48, 7, 4, [ex(2, 20), ex(4, 30)]) == 96
  assert packing.default_tiles_per_batch(16, 48, 7, 4, [ex(10, 41)]) == 16 * 12  # capped at 48 // 4 tiles a row
  assert packing.default_tiles_per_batch(2, 48, 7, 4, [ex(0, 20)]) == 2 * 4  # one 7-tile example must fit
  assert packing.default_tiles_per_batch(16, 48, 7, 4) == 32  # no sample: 2 a row


def test_packed_decoder_matches_transformers_on_each_sequence_alone(tmp_path):
  import torch

  import hf_refs
  from internvl_jax import convert

  ref = hf_refs.causal_lm(hf_refs.QWEN2, str(tmp_path))
  ours = convert.load_pretrained(str(tmp_path))
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 95, n) for n in (7, 5, 9)]
  ids, seg = np.zeros((2, 14), np.int32), np.zeros((2, 14), np.int32)
  where = [(0, 0), (0, 7), (1, 0)]  # rows: [seq0 seq1 pad pad], [seq2 pad ...]
  for k, ((row, start), s) in enumerate(zip(where, seqs)):
    ids[row, start:start + len(s)], seg[row, start:start + len(s)] = s, 1 + (start > 0)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours(jnp.asarray(ids), segment_ids=jnp.asarray(seg)).logits)
  for (row, start), s in zip(where, seqs):
    with torch.no_grad():
      want = ref(input_ids=torch.from_numpy(s[None].astype(np.int64))).logits[0].numpy()
    err, rel = hf_refs.errors(got[row, start:start + len(s)], want)
    assert rel < 1e-4, (row, start, err, rel)


def test_packing_config_errors_name_the_field():
  from internvl_jax.train import config_checks, defaults

  cfg = defaults.base_config("instruct", "tiny")
  cfg.batch_size, cfg.data.max_tiles, cfg.data.packing, cfg.data.tiles_per_batch = 2, 7, True, 4
  mesh = config_checks.make_checked_mesh(cfg)
  with pytest.raises(config_checks.ConfigError, match="tiles_per_batch=4 .*max_tiles=7"):
    config_checks.validate(cfg, mesh)
  cfg.data.tiles_per_batch = 8
  config_checks.validate(cfg, mesh)
  other = defaults.base_config("contrastive", "tiny")
  other.data.packing = True
  with pytest.raises(config_checks.ConfigError, match="data.packing"):
    config_checks.validate(other, config_checks.make_checked_mesh(other))


@pytest.mark.slow  # three short training runs in-process (~1 min on 2 busy cores)
def test_packed_run_resumes_with_the_same_losses(tmp_path):
  from conftest import tiny_config
  from internvl_jax.train import loop

  def cfg(steps):
    c = tiny_config("instruct", total_steps=steps, checkpoint_every=2)
    c.data.eval.source = ""
    c.data.packing, c.data.max_text_len, c.batch_size = True, 48, 2
    return c

  def losses_of(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      return {r["step"]: (r["loss"], r["examples"]) for r in map(json.loads, f)}

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  loop.run(cfg(4), straight)
  loop.run(cfg(2), resumed)
  loop.run(cfg(4), resumed)  # resumes from the step-2 checkpoint, data iterator state included
  a, b = losses_of(straight), losses_of(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(n > 2 for _, n in a.values())
  assert a == b  # bit-identical losses and the same examples per step


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_per_example_loss_reduction_counts_each_packed_example_alone(tok, model, reduction):
  """The official len2weight weighs example i's tokens by 1 / n_i or 1 / sqrt(n_i), n_i its own counted tokens:
  with packing, n_i is per (row, segment), not per row."""
  examples = [_features(tok)(r, None) for r in _records()[:6]]
  b, _ = _builder(tok, examples, rows=2, tiles=12)
  assert max(seg for seg in b.build()["segment_ids"].max(axis=1)) >= 2
  batch = {k: jnp.asarray(v) for k, v in b.build().items()}
  cfg = ml_collections.ConfigDict(dict(task="instruct", loss_reduction=reduction))
  loss, _ = steps.instruct_loss_fn(model, batch, None, cfg)
  num = den = 0.0
  for _, _, ex in b.items:
    logits = _alone(model, ex)[:-1].astype(np.float64)
    targets, mask = ex["input_ids"][1:], ex["loss_mask"][1:].astype(bool)
    top = logits.max(-1)
    ce = top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(len(targets)), targets]
    w = 1 / mask.sum() if reduction == "sample" else 1 / np.sqrt(mask.sum())
    num, den = num + w * ce[mask].sum(), den + w * mask.sum()
  np.testing.assert_allclose(float(loss), num / den, rtol=1e-5)
