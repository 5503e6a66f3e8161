"""The official InternVL fine-tuning data format (data.train.source=internvl): the meta JSON and repeat_time,
multi-image, video, system and text-only records, bad records, and a few stage-3 steps of train.py on it.

References are facts of OpenGVLab's internvl_chat_finetune.py / dataset.py, written out here: the tile rule of
dynamic_preprocess (max_num = max(1, max_dynamic_patch // num_image) per image, a thumbnail when more than one
tile), get_frame_indices, the `Frame-{i}: <image>` lines, preprocess_internvl2_5's prompt units."""

import collections
import json
import os

import av
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

import tokenizer_folders
from conftest import run_train_cli
from internvl_jax.data import features, internvl_meta, pipeline, tokenizer, transforms, visual
from internvl_jax.data.transforms import BadRecord

S, N = 28, 2  # tile size, vision tokens per tile
SYS_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block(tiles: int) -> str:
  return "<img>" + "<IMG_CONTEXT>" * (tiles * N) + "</img>"


def official_tiles(width, height, max_num, image_size=S, use_thumbnail=True):
  """dynamic_preprocess's tile count: the (cols, rows) with 1 <= cols * rows <= max_num whose aspect is closest to
  the image's (ties: the later, larger grid when the area > half of it), plus a thumbnail when > 1 tile."""
  ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                   if 1 <= i * j <= max_num}, key=lambda x: x[0] * x[1])
  best, best_diff = (1, 1), float("inf")
  for r in ratios:
    diff = abs(width / height - r[0] / r[1])
    if diff < best_diff:
      best, best_diff = r, diff
    elif diff == best_diff and width * height > 0.5 * image_size * image_size * r[0] * r[1]:
      best = r
  blocks = best[0] * best[1]
  return blocks + (1 if use_thumbnail and blocks != 1 else 0)


def official_middle_indices(num_frames, vlen):
  """get_frame_indices(sample='middle'): intervals from linspace(0, vlen, n + 1).astype(int), (start + end - 1) // 2
  of each, padded with the last."""
  acc = min(num_frames, vlen)
  iv = np.linspace(0, vlen, acc + 1).astype(int)
  idx = [(iv[i] + iv[i + 1] - 1) // 2 for i in range(acc)]
  return idx + [idx[-1]] * (num_frames - len(idx))


def _conv(question, answer="yes", system=None):
  turns = [{"from": "system", "value": system}] if system is not None else []
  return turns + [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write(folder, name, records):
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return path


def _meta(folder, entries):
  path = os.path.join(folder, "meta.json")
  with open(path, "w") as f:
    json.dump(entries, f)
  return path


def _spec(k, template="internvl2_5", max_len=400, **kw):
  return features.FeatureSpec("instruct", S, max_len, tokens_per_tile=N, max_tiles=k, template=template, **kw)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  folder = tokenizer_folders.qwen2_bpe(str(tmp_path_factory.mktemp("qwen2")))
  return tokenizer.load(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def images(tmp_path):
  Image.new("RGB", (6 * S, S), (200, 30, 30)).save(tmp_path / "wide.png")  # aspect 6
  Image.new("RGB", (S, 2 * S), (30, 200, 30)).save(tmp_path / "tall.png")  # aspect 1/2
  Image.new("RGB", (S, S), (30, 30, 200)).save(tmp_path / "square.png")
  (tmp_path / "broken.png").write_bytes(b"not an image")
  return tmp_path


def test_meta_repeat_time_counts_and_a_deterministic_resumable_order(tmp_path):
  _write(tmp_path, "a.jsonl", [{"conversations": _conv(f"a{i}")} for i in range(10)])
  _write(tmp_path, "b.jsonl", [{"conversations": _conv(f"b{i}")} for i in range(3)])
  src = internvl_meta.InternVLMetaSource(_meta(tmp_path, {
      "a": {"root": "", "annotation": str(tmp_path / "a.jsonl"), "repeat_time": 0.5, "data_augment": False},
      "b": {"root": "", "annotation": str(tmp_path / "b.jsonl"), "repeat_time": 2, "data_augment": False}}))
  # official: repeat_time < 1 keeps the first int(n * r) lines; > 1 repeats the whole file
  want = collections.Counter({f"a{i}": 1 for i in range(5)} | {f"b{i}": 2 for i in range(3)})
  assert len(src) == 11
  assert collections.Counter(src[i]["conversations"][0]["value"] for i in range(len(src))) == want

  def question(rec, rng):
    return {"q": np.asarray([ord(c) for c in rec["conversations"][0]["value"]], np.int32)}

  def make():
    return iter(pipeline.train_dataset(src, question, global_batch=1, seed=7, tracker=pipeline.BadRecordTracker(),
                                       num_threads=1))

  it = make()
  seen = ["".join(map(chr, next(it)["q"][0])) for _ in range(15)]
  state = it.get_state()
  rest = ["".join(map(chr, next(it)["q"][0])) for _ in range(7)]
  assert collections.Counter(seen[:11]) == want  # one epoch: each record as often as repeat_time says
  assert collections.Counter(seen[11:] + rest) == want and seen[11:] + rest != seen[:11]  # reshuffled epoch 2
  again = make()
  assert ["".join(map(chr, next(again)["q"][0])) for _ in range(15)] == seen  # same seed, same order
  again.set_state(state)
  assert ["".join(map(chr, next(again)["q"][0])) for _ in range(7)] == rest  # resumed mid-epoch


def test_multi_image_blocks_follow_the_official_tile_rule(images, qwen2):
  tok, ref = qwen2
  q = "Image-1: <image>\nImage-2: <image>\nWhich is wider?"
  _write(images, "m.jsonl", [{"image": ["wide.png", "tall.png"], "conversations": _conv(q, "the first")}])
  src = internvl_meta.InternVLMetaSource(_meta(images, {"m": {"root": str(images), "annotation": "m.jsonl",
                                                              "repeat_time": 1, "max_dynamic_patch": 6}}))
  rec = src[0]
  # two images, max_dynamic_patch 6: max_num = max(1, 6 // 2) = 3 each (6 would give the wide one 6 x 1 tiles)
  t_wide, t_tall = official_tiles(6 * S, S, 3), official_tiles(S, 2 * S, 3)
  assert (t_wide, t_tall) == (4, 3)  # 3 x 1 + thumbnail, 1 x 2 + thumbnail
  q_expanded = f"Image-1: {block(t_wide)}\nImage-2: {block(t_tall)}\nWhich is wider?"
  units = [f"<|im_start|>system\n{SYS_V25}<|im_end|>\n", f"<|im_start|>user\n{q_expanded}<|im_end|>\n",
           "<|im_start|>assistant\nthe first<|im_end|>\n"]
  k = t_wide + t_tall + 1  # one spare slot
  assert features.instruct_prompt(rec, _spec(k)) == "".join(units)
  f = features.make_feature_fn(_spec(k), tok)(rec, None)
  attended = [i for i, m in zip(f["input_ids"].tolist(), f["attention_mask"].tolist()) if m]
  want = [i for u in units for i in ref(u, add_special_tokens=False)["input_ids"]]
  assert attended == want  # the attended tokens are exactly the official prompt
  img = f["input_ids"] == tok.image_token_id
  assert img.sum() == k * N and f["attention_mask"][img].tolist() == [1] * (7 * N) + [0] * N  # spare slot hidden
  assert f["input_ids"].tolist().count(tok.token_id("</img>")) == 2
  # slot order: the wide image's 3 tiles and its thumbnail, then the tall image's 2 tiles and thumbnail
  wide = Image.open(images / "wide.png").convert("RGB")
  np.testing.assert_allclose(f["pixel_values"][3], transforms.normalize(wide.resize((S, S), Image.BICUBIC)),
                             atol=1e-5)
  assert np.allclose(f["pixel_values"][4], transforms.normalize(np.full((S, S, 3), (30, 200, 30), np.uint8)),
                     atol=1e-4) and not f["pixel_values"][7].any()

  # too few slots for the official rule: the per-image cap drops until the tiles fit (here to 1: no thumbnail)
  assert [len(t) for t in features.instruct_layout(rec, _spec(5), None)[2]] == \
      [official_tiles(6 * S, S, 1), official_tiles(S, 2 * S, 1)] == [1, 1]
  assert features.instruct_prompt(rec, _spec(6)).count(block(3)) == 2  # cap 2: (2 x 1 + 1) and (1 x 2 + 1)
  with pytest.raises(BadRecord, match="2 images need at least 2 tile slots"):
    features.instruct_layout(rec, _spec(1), None)
  # several images and no placeholders: the official preprocess fails on the record (no <image> is inserted)
  with pytest.raises(BadRecord, match="0 <image> placeholders for 2 images"):
    features.instruct_layout(dict(rec, conversations=_conv("Which is wider?")), _spec(k), None)


def test_single_image_gets_its_placeholder_and_max_dynamic_patch(images):
  _write(images, "s.jsonl", [{"image": "wide.png", "conversations": _conv("What colour?", "red")}])
  for meta_cap, k, want in ((None, 4, official_tiles(6 * S, S, 3)), (2, 8, official_tiles(6 * S, S, 2))):
    entry = {"root": str(images), "annotation": "s.jsonl", "repeat_time": 1}
    entry |= {"max_dynamic_patch": meta_cap} if meta_cap else {}
    rec = internvl_meta.InternVLMetaSource(_meta(images, {"s": entry}))[0]
    # no max_dynamic_patch in the meta: the config's, by default max_tiles - 1
    assert features.instruct_prompt(rec, _spec(k)).endswith(
        f"<|im_start|>user\n{block(want)}\nWhat colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")


def _write_video(path, num_frames, fps=10, size=32):
  with av.open(str(path), "w") as c:
    stream = c.add_stream("mpeg4", rate=fps)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(num_frames):  # frame i is grey 12 * i, so a decoded frame tells its index
      for p in stream.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), 12 * i, np.uint8), "rgb24")):
        c.mux(p)
    for p in stream.encode():
      c.mux(p)


def _frame_index(tile: np.ndarray) -> int:
  grey = (tile * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN) * 255
  return int(round(float(grey.mean()) / 12))


def test_video_frames_follow_get_frame_indices(tmp_path, qwen2):
  tok, _ = qwen2
  _write_video(tmp_path / "v.mp4", 20)
  _write(tmp_path, "v.jsonl", [{"video": "v.mp4", "conversations": _conv("What happens?", "It gets brighter.")}])
  rec_meta = _meta(tmp_path, {"v": {"root": str(tmp_path), "annotation": "v.jsonl", "repeat_time": 1}})
  rec = internvl_meta.InternVLMetaSource(rec_meta)[0]
  spec = _spec(4, min_num_frame=2, max_num_frame=6)
  # evaluation (no rng): min(max_num_frame, slots) = 4 frames, 'middle' sampling
  want = official_middle_indices(4, 20)
  assert want == [2, 7, 12, 17]
  assert visual.video_frames(rec["video_path"], 4, None)[1] == want
  f = features.make_feature_fn(spec, tok)(rec, None)
  assert [_frame_index(f["pixel_values"][i]) for i in range(4)] == want
  lines = "".join(f"Frame-{i}: {block(1)}\n" for i in (1, 2, 3, 4))  # one tile per frame
  assert f"<|im_start|>user\n{lines}What happens?<|im_end|>\n" in features.instruct_prompt(rec, spec)
  # training: a frame count in [min_num_frame, min(max_num_frame, slots)], each index drawn from
  # [start, end - 1) of its interval of linspace(0, vlen, n + 1).astype(int)
  for seed in range(5):
    layout = features.instruct_layout(rec, spec, np.random.default_rng(seed))
    got = [_frame_index(transforms.normalize(t[0])) for t in layout[2]]
    assert 2 <= len(got) <= 4
    iv = np.linspace(0, 20, len(got) + 1).astype(int)
    assert all(iv[i] <= g < iv[i + 1] - 1 for i, g in enumerate(got)), (seed, got)
  # a folder of frames: numbered name_<n>.jpg, sampled only when it holds more than the frames wanted
  os.makedirs(tmp_path / "frames")
  for i in range(12):
    Image.new("RGB", (S, S), (12 * i,) * 3).save(tmp_path / "frames" / f"img_{i + 1}.jpg", quality=100)
  frames, idx = visual.video_frames(str(tmp_path / "frames"), 4, None)
  assert idx == official_middle_indices(4, 12) == [1, 4, 7, 10]
  assert [round(np.asarray(fr, np.float32).mean() / 12) for fr in frames] == idx  # img_2, img_5, ... (numeric order)
  tok_words = tokenizer.build_word_level(internvl_meta.InternVLMetaSource(rec_meta).texts())
  assert tok_words.unk_id not in tok_words.encode("Frame-3: what happens?")  # a built tokenizer knows the labels
  assert len(visual.video_frames(str(tmp_path / "frames"), 16, None)[0]) == 12  # fewer: all, not padded


def test_video_shorter_than_the_frames_wanted_is_padded_with_its_last_frame(tmp_path):
  _write_video(tmp_path / "short.mp4", 3)
  frames, idx = visual.video_frames(str(tmp_path / "short.mp4"), 5, None)
  assert idx == official_middle_indices(5, 3) == [0, 1, 2, 2, 2] and len(frames) == 5


def test_system_turn_sets_the_system_message(images, qwen2):
  tok, ref = qwen2
  _write(images, "sys.jsonl", [
      {"image": "square.png", "conversations": _conv("Describe.", "A blue square.", system="You are terse.")}])
  rec = internvl_meta.InternVLMetaSource(_meta(images, {"s": {"root": str(images), "annotation": "sys.jsonl",
                                                              "repeat_time": 1}}))[0]
  # preprocess_internvl2_5: the record's system turn replaces the template's system message
  units = ["<|im_start|>system\nYou are terse.<|im_end|>\n",
           f"<|im_start|>user\n{block(1)}\nDescribe.<|im_end|>\n", "<|im_start|>assistant\nA blue square.<|im_end|>\n"]
  spec = _spec(1, system="the config's message: a record's system turn wins")
  assert features.instruct_prompt(rec, spec) == "".join(units)
  f = features.make_feature_fn(spec, tok)(rec, None)
  n = int(f["attention_mask"].sum())
  assert f["input_ids"][:n].tolist() == [i for u in units for i in ref(u, add_special_tokens=False)["input_ids"]]
  trained = [i for i, m in zip(f["input_ids"].tolist(), f["loss_mask"].tolist()) if m]
  assert trained == ref("A blue square.<|im_end|>", add_special_tokens=False)["input_ids"]


def test_text_only_records(tmp_path, qwen2):
  tok, ref = qwen2
  _write(tmp_path, "t.jsonl", [{"conversations": _conv("Say hi.", "Hi.")},
                               {"image": [], "conversations": _conv("Say hi.", "Hi.")},
                               {"image": "", "video": "", "conversations": _conv("Say hi.", "Hi.")}])
  src = internvl_meta.InternVLMetaSource(_meta(tmp_path, {"t": {"root": "", "annotation": "t.jsonl",
                                                                "repeat_time": 1}}))
  units = [f"<|im_start|>system\n{SYS_V25}<|im_end|>\n", "<|im_start|>user\nSay hi.<|im_end|>\n",
           "<|im_start|>assistant\nHi.<|im_end|>\n"]
  for i in range(3):  # an empty image or video counts as none, as the official __getitem__ has it
    assert features.instruct_prompt(src[i], _spec(2)) == "".join(units)
    f = features.make_feature_fn(_spec(2), tok)(src[i], None)
    img = f["input_ids"] == tok.image_token_id
    assert img.sum() == 2 * N and not f["attention_mask"][img].any() and not f["pixel_values"].any()
    attended = [t for t, m in zip(f["input_ids"].tolist(), f["attention_mask"].tolist()) if m]
    assert attended == [t for u in units for t in ref(u, add_special_tokens=False)["input_ids"]]


def test_bad_records_are_skipped_and_counted(images):
  good = {"image": "square.png", "conversations": _conv("what colour", "blue")}
  bad = [{"image": "missing.png", "conversations": _conv("q")},
         {"image": "broken.png", "conversations": _conv("q")},
         {"image": "square.png", "conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]},
         {"image": ["square.png", "wide.png"], "conversations": _conv("<image> only one placeholder")},
         {"video": "nothing.mp4", "conversations": _conv("q")},
         {"image": "square.png", "conversations": _conv("q", "")},
         "not json", "[1, 2]"]
  _write(images, "bad.jsonl", [good] * 4 + bad)
  src = internvl_meta.InternVLMetaSource(_meta(images, {"b": {"root": str(images), "annotation": "bad.jsonl",
                                                              "repeat_time": 1}}))
  tok = tokenizer.build_word_level(list(src.texts()))
  fn = features.make_feature_fn(features.FeatureSpec("instruct", S, 40, tokens_per_tile=N, max_tiles=3), tok)
  tracker = pipeline.BadRecordTracker(max_fraction=1.0, name="train")
  kept = sum(int(b["valid"].sum()) for b, _ in pipeline.eval_batches(src, fn, batch_size=4, tracker=tracker))
  assert kept == 4 and tracker.seen == 12 and tracker.bad == 8
  assert any("missing.png does not exist" in e for e in tracker.examples)
  assert any("broken.png cannot be decoded" in e for e in tracker.examples)
  assert any("'bot'" in e for e in tracker.examples)


def test_meta_errors_name_the_field(tmp_path):
  _write(tmp_path, "a.jsonl", [{"conversations": _conv("q")}])
  with pytest.raises(ValueError, match="repeat_time=1.5 must be"):
    internvl_meta.InternVLMetaSource(_meta(tmp_path, {"a": {"root": "", "annotation": "a.jsonl", "repeat_time": 1.5}}))
  with pytest.raises(FileNotFoundError, match="annotation nope.jsonl does not exist"):
    internvl_meta.InternVLMetaSource(_meta(tmp_path, {"a": {"root": "", "annotation": "nope.jsonl"}}))


@pytest.mark.slow  # compiles the tiny chat model in a subprocess: ~50 s on a busy 2-core machine
def test_train_cli_runs_stage3_on_a_meta_file(images):
  """train.py, stage 3, tiny model, 3 steps over single-image, multi-image, video and text-only records."""
  _write_video(images / "v.mp4", 12)
  recs = [{"image": "square.png", "conversations": _conv("what colour", "blue")},
          {"image": ["wide.png", "tall.png"], "conversations": _conv("<image>\n<image>\nwhich is wider", "the first")},
          {"video": "v.mp4", "conversations": _conv("what happens", "it gets brighter")},
          {"conversations": _conv("say hi", "hi")}]
  _write(images, "a.jsonl", recs)
  meta = _meta(images, {"a": {"root": str(images), "annotation": "a.jsonl", "repeat_time": 2, "data_augment": True},
                        "b": {"root": str(images), "annotation": "a.jsonl", "repeat_time": 0.5,
                              "max_dynamic_patch": 2}})
  wd = str(images / "run")
  data = ["--config.data.train.source=internvl", f"--config.data.train.path={meta}",
          "--config.data.eval.source=internvl", f"--config.data.eval.path={meta}"]
  args = ["--config", "configs/instruct.py:model=tiny", "--config.total_steps=3",
          "--config.batch_size=2", "--config.eval_batch_size=4", "--config.log_every=1", "--config.warmup_steps=1",
          "--config.progress=False", "--config.data.num_threads=1", "--config.data.max_tiles=4",
          "--config.data.max_text_len=48", "--config.data.min_num_frame=2", "--config.data.max_num_frame=3"] + data
  records = run_train_cli(args, wd)
  assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
  assert records[-1]["records_bad"] == 0 and "eval_loss" in records[-1]


def test_inference_tiles_with_the_cap_the_run_trained_with():
  import configs.instruct
  from internvl_jax.data import chat_format

  cfg = configs.instruct.get_config("model=tiny")
  cfg.data.max_tiles = 4
  tok = tokenizer.build_word_level(["a b"])
  assert chat_format.ChatFormat.from_run(cfg, tok).max_num == 3  # default: max_tiles - 1
  cfg.data.max_dynamic_patch = 2
  assert chat_format.ChatFormat.from_run(cfg, tok).max_num == 2
