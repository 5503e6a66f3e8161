"""Exact match of stage 3 under packing (data.packing): an example is exact when every one of its answer tokens
is the argmax given the true prefix, counted per example (a segment of a packed row), never per row. Some
examples are made exact for the tiny model by writing its own teacher-forced argmax chain as their answer."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from internvl_jax import losses
from internvl_jax.data import packing
from internvl_jax.train import steps
from test_packing import PER_TILE, S, T, _alone, _features, _records, _spec, model, tok  # noqa: F401 (fixtures)


def _made_exact(model, tok, ex):
  """The example with each answer token replaced, in order, by the model's argmax at the previous position (so
  the model predicts all of them), or None when the chain runs into the image or pad token."""
  ex = dict(ex, input_ids=np.array(ex["input_ids"]))
  for t in np.flatnonzero(ex["loss_mask"]):
    if t == 0:
      continue
    pred = int(_alone(model, ex)[t - 1].argmax())
    if pred in (tok.image_token_id, tok.pad_id):
      return None
    ex["input_ids"][t] = pred
  return ex


def _is_exact(model, ex) -> bool:
  """numpy reference: all answer tokens are the argmax of the example run alone."""
  pred = _alone(model, ex)[:-1].argmax(-1)
  answer = ex["loss_mask"][1:].astype(bool)
  return bool(answer.any() and (pred[answer] == ex["input_ids"][1:][answer]).all())


def _one_per_row(tok, examples) -> dict:
  """The unpacked form: example i alone in row i (right-padded), no segment ids; its tiles read by vision_index."""
  b = packing.BatchBuilder(packing.PackSpec(rows=len(examples), max_len=T, tiles=sum(len(e["pixel_values"])
                                                                                       for e in examples),
                                            image_size=S, tokens_per_tile=PER_TILE,
                                            image_token_id=tok.image_token_id, pad_id=tok.pad_id))
  b.items = [(i, 0, ex) for i, ex in enumerate(examples)]
  batch = b.build()
  del batch["segment_ids"]
  return batch


def test_packed_exact_match_is_per_example_and_equals_the_unpacked_batch(tok, model):
  examples = []
  for i, rec in enumerate(_records()[:6]):
    ex = _features(tok)(rec, None)
    exact = _made_exact(model, tok, ex) if i % 2 == 0 else None
    examples.append(exact if exact is not None else ex)
  want = [_is_exact(model, ex) for ex in examples]
  b = packing.BatchBuilder(_spec(tok, rows=4, tiles=12))
  assert all(b.add(ex) for ex in examples)
  packed = {k: jnp.asarray(v) for k, v in b.build().items()}
  rows = {}
  for row, _, ex in b.items:
    rows.setdefault(row, []).append(want[next(i for i, e in enumerate(examples) if e is ex)])
  # the check can fail: some row mixes exact and inexact examples, so a row-wise all() scores differently
  assert any(any(r) and not all(r) for r in rows.values()), rows
  unpacked = {k: jnp.asarray(v) for k, v in _one_per_row(tok, examples).items()}

  # the in-loop eval step: per-row counts of exact examples and of examples
  got = {name: [np.asarray(x) for x in steps.lm_eval_outputs(model, batch)]
         for name, batch in (("packed", packed), ("unpacked", unpacked))}
  for name, (_, tokens, matches, n) in got.items():
    assert (n.sum(), matches.sum()) == (len(want), sum(want)), (name, matches, n, want)
  assert got["packed"][1].sum() == got["unpacked"][1].sum()
  np.testing.assert_allclose(got["packed"][0].sum(), got["unpacked"][0].sum(), rtol=1e-5)
  row_wise = sum(all(r) for r in rows.values()) / len(rows)
  assert got["packed"][2].sum() / got["packed"][3].sum() != row_wise

  # the training metric: the share of exact examples, the same packed or not
  cfg = ml_collections.ConfigDict(dict(task="instruct"))
  train = {name: float(steps.instruct_loss_fn(model, batch, None, cfg)[1]["exact_match"])
           for name, batch in (("packed", packed), ("unpacked", unpacked))}
  assert train["packed"] == train["unpacked"] == sum(want) / len(want)


def test_example_exact_match_groups_by_row_and_segment():
  correct = jnp.asarray([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1]], bool)
  mask = jnp.asarray([[0, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 0]], bool)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 3, 3]])
  exact, counted, present = (np.asarray(x) for x in losses.example_exact_match(correct, mask, seg))
  # row 0: segment 1 has a wrong counted token (t = 2), segment 2 does not; row 1: segment 1 wrong at t = 1
  np.testing.assert_array_equal(exact[:, :3], [[False, True, True], [False, True, True]])
  np.testing.assert_array_equal(counted[:, :3], [[2, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(present[:, :4], [[True, True, False, False], [True, True, True, False]])
  row_exact, _, row_present = (np.asarray(x) for x in losses.example_exact_match(correct, mask))
  np.testing.assert_array_equal(row_exact[:, 0], [False, False])
  assert row_present.all()
