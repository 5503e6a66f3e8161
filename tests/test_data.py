"""Data: demo world, tokenizer, features (instruct masking), jsonl forms, bad records, tiling, grain pipeline."""

import json

import numpy as np
import pytest
from PIL import Image

from internvl_jax.data import demo, features, pipeline, sources, tokenizer, transforms


@pytest.fixture(scope="module")
def tok():
  return tokenizer.build_word_level(demo.DemoWorld("train", 200, 56).texts())


def test_demo_is_deterministic_and_splits_differ():
  a, b = demo.DemoWorld("train", 10, 56), demo.DemoWorld("train", 10, 56, cache=False)
  np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
  assert a[3]["captions"] == b[3]["captions"]
  ev = demo.DemoWorld("eval", 10, 56)
  assert any(not np.array_equal(a[i]["image"], ev[i]["image"]) for i in range(10))
  rec = a[0]
  assert rec["image"].shape == (56, 56, 3) and rec["image"].dtype == np.uint8
  assert rec["conversations"][0]["value"].startswith("<image>\n")


def test_demo_answers_are_consistent_with_scene():
  for q, ans in demo.questions(("red", "circle"), ("blue", "square"), "above"):
    if q == "what colour is the circle?":
      assert ans == "red"
    if q == "where is the blue square?":
      assert ans == "bottom"
  # same shape twice: no colour-of-shape question is asked (it would be ambiguous)
  qs = [q for q, _ in demo.questions(("red", "circle"), ("blue", "circle"), "left of")]
  assert not any(q.startswith("what colour") for q in qs)


def test_tokenizer_roundtrip(tok, tmp_path):
  ids = tok.encode("a red circle above a blue square")
  assert tok.decode(ids) == "a red circle above a blue square"
  assert tok.encode("<IMG_CONTEXT>") == [tok.image_token_id]
  tok.save(str(tmp_path / "tokenizer.json"))
  again = tokenizer.load(str(tmp_path))
  assert again.encode("a red circle") == tok.encode("a red circle") and again.vocab_size == tok.vocab_size


def test_instruct_masks_prompt_and_image_tokens(tok):
  spec = features.FeatureSpec("instruct", 56, 24, tokens_per_tile=4, max_tiles=2)
  rec = demo.DemoWorld("train", 5, 56)[1]
  f = features.make_feature_fn(spec, tok)(rec, None)
  ids, attn, loss = f["input_ids"], f["attention_mask"], f["loss_mask"]
  assert f["pixel_values"].shape == (2, 56, 56, 3)
  img = ids == tok.image_token_id
  assert img.sum() == 8  # 2 slots x 4 tokens
  assert not loss[img].any()  # image tokens are never trained on
  # exactly the answer and its end-of-turn token carry the loss
  answer = rec["conversations"][1]["value"]
  assert list(ids[loss == 1]) == tok.encode(answer) + [tok.eos_id]
  assistant = tok.token_id("<assistant>")
  first_answer = int(np.argmax(loss))
  assert ids[first_answer - 1] == assistant and not loss[:first_answer].any()
  # one tile used of two: the second slot's image tokens are not attended, padding neither
  assert attn[img].tolist() == [1] * 4 + [0] * 4
  assert not attn[ids == tok.pad_id].any()


def _write_images(tmp_path, n):
  for i in range(n):
    Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")


def test_jsonl_three_forms(tmp_path, tok):
  _write_images(tmp_path, 3)
  lines = [{"image": "im0.png", "caption": "a red circle"}, {"image": "im1.png", "captions": ["a", "a blue square"]},
           {"image": "im2.png", "label": "circle"},
           {"image": "im0.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour is the circle?"},
                                                  {"from": "gpt", "value": "red"}]}]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  src = sources.JsonlSource(str(path))
  assert len(src) == 4 and src[1]["captions"] == ["a", "a blue square"] and src[2]["label"] == "circle"
  assert src[0]["image_path"] == str(tmp_path / "im0.png")
  it_fn = features.make_feature_fn(features.FeatureSpec("contrastive", 28, 8), tok)
  assert it_fn(src[0], None)["pixel_values"].shape == (28, 28, 3)
  assert it_fn(src[2], None)["input_ids"][1] == tok.encode("circle")[0]  # label as the text
  ins = features.make_feature_fn(features.FeatureSpec("instruct", 28, 20, tokens_per_tile=1), tok)
  assert ins(src[3], None)["loss_mask"].sum() == 2


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
  _write_images(tmp_path, 2)
  (tmp_path / "broken.png").write_bytes(b"not an image")
  good = [{"image": f"im{i % 2}.png", "caption": "a red circle"} for i in range(38)]
  bad = [{"image": "missing.png", "caption": "x"}, {"image": "broken.png", "caption": "x"}]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in good + bad) + "\n")
  tracker = pipeline.BadRecordTracker(max_fraction=0.1, min_seen=10)
  fn = features.make_feature_fn(features.FeatureSpec("contrastive", 28, 8), tok)
  it = iter(pipeline.train_dataset(sources.JsonlSource(str(path)), fn, global_batch=4, seed=0, tracker=tracker,
                                   num_threads=1))
  for _ in range(10):
    assert next(it)["pixel_values"].shape == (4, 28, 28, 3)
  assert tracker.bad >= 1 and tracker.seen >= 40
  assert any("missing.png" in e or "broken.png" in e for e in tracker.examples)


def test_all_bad_dataset_fails_with_message(tmp_path, tok):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(json.dumps({"image": f"nope{i}.png", "caption": "x"}) for i in range(60)) + "\n")
  tracker = pipeline.BadRecordTracker(max_fraction=0.05, min_seen=20)
  fn = features.make_feature_fn(features.FeatureSpec("contrastive", 28, 8), tok)
  it = iter(pipeline.train_dataset(sources.JsonlSource(str(path)), fn, global_batch=4, seed=0, tracker=tracker,
                                   num_threads=1))
  with pytest.raises(pipeline.DataError, match=r"nope\d+\.png does not exist"):
    next(it)


def test_pipeline_resumes_from_state(tok):
  fn = features.make_feature_fn(features.FeatureSpec("contrastive", 56, 8), tok)
  world = demo.DemoWorld("train", 40, 56)
  make = lambda: iter(pipeline.train_dataset(world, fn, global_batch=4, seed=3,
                                             tracker=pipeline.BadRecordTracker(), num_threads=1))
  a = make()
  first = [next(a)["input_ids"] for _ in range(3)]
  state = a.get_state()
  rest = [next(a)["input_ids"] for _ in range(3)]
  b = make()
  np.testing.assert_array_equal(next(b)["input_ids"], first[0])  # same seed, same order
  b.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(b)["input_ids"], want)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_batch_prefetch_changes_neither_batches_nor_state(tok, num_threads):
  """The background batch thread (prefetch_batches) hands out the batches the caller would have made itself, and
  get_state() after k batches is the state of k batches, not of the ones already made ahead: a resume from it
  continues exactly where the consumer was (a state of the prefetched batches would skip them)."""
  fn = features.make_feature_fn(features.FeatureSpec("contrastive", 56, 8), tok)
  world = demo.DemoWorld("train", 40, 56)
  make = lambda prefetch: iter(pipeline.train_dataset(world, fn, global_batch=4, seed=3, num_threads=num_threads,
                                                      tracker=pipeline.BadRecordTracker(), prefetch_batches=prefetch))
  plain, ahead = make(0), make(3)
  for _ in range(2):
    want, got = next(plain), next(ahead)
    assert set(want) == set(got)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  import time
  time.sleep(0.2)  # let the thread run ahead
  state = ahead.get_state()
  assert state == plain.get_state()
  resumed = make(3)
  resumed.set_state(state)
  for _ in range(3):
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(plain)["input_ids"])
  for it in (plain, ahead, resumed):
    it.close()


def test_dynamic_tiling_grid():
  assert transforms.closest_grid(800, 400, 448, 1, 6) == (2, 1)
  assert transforms.closest_grid(448, 448, 448, 1, 6) == (1, 1)
  tiles = transforms.dynamic_tiles(Image.new("RGB", (900, 300)), 28, max_num=6)
  assert len(tiles) == 4 and all(t.size == (28, 28) for t in tiles)  # 3 x 1 grid + thumbnail


def test_training_captions_carry_the_eval_text_prefix(tok):
  """Training tokenizes 'text_prefix + caption' exactly as evaluation does (InternVL-C/G's 'summarize:'), so a
  model is scored on the texts it was trained on; the instruct stage takes no prefix."""
  from flax import nnx

  from internvl_jax.evaluate import models as eval_models
  from internvl_jax.train import loop
  import configs.contrastive
  import configs.instruct

  cfg = configs.contrastive.get_config("model=tiny")
  cfg.model.text_prefix, cfg.data.max_text_len = "a ", 16
  spec = loop.feature_spec(cfg, train=False)
  assert spec.text_prefix == "a "
  rec = demo.DemoWorld("eval", 10, spec.image_size)[0]
  feats = features.make_feature_fn(spec, tok)(rec, None)
  scorer = eval_models.EvalModel(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), "chat", tok, spec.image_size, "t",
                                 text_prefix="a ", max_text_len=16)
  np.testing.assert_array_equal(feats["input_ids"], scorer.tokenize([rec["captions"][0]])["input_ids"][0])
  unprefixed = features.caption_tokens(tok, rec["captions"][0], 16)[1]
  assert feats["attention_mask"].sum() == unprefixed.sum() + 1  # one more token: the prefix
  assert loop.feature_spec(configs.instruct.get_config("model=tiny"), train=True).text_prefix == ""
