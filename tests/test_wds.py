"""webdataset shards (data/wds.py): pattern expansion, the host x reader split (every sample once per epoch),
exact resume (record keys, batches, and a train.py-level run's losses), resampled mode, bad samples and shards,
mixtures. Shards are tiny tars written here with tarfile."""

import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from internvl_jax.data import demo, features, pipeline, sources, wds
from internvl_jax.data.transforms import BadRecord

from conftest import tiny_config


def _png(value: int) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value % 256, np.uint8)).save(out, format="PNG")
  return out.getvalue()


def _write(path, samples):
  """samples: [(key, {ext: bytes})] -> a tar of <key>.<ext> members, in order."""
  with tarfile.open(path, "w") as tar:
    for key, parts in samples:
      for ext, data in parts.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return str(path)


def _shards(folder, n_shards, per_shard, prefix="s"):
  """n_shards shards of per_shard good samples each (png + txt); keys '<prefix><shard>_<i>'."""
  paths = []
  for s in range(n_shards):
    samples = [(f"{prefix}{s}_{i}", {"png": _png(s * 31 + i), "txt": f"caption {s} {i}".encode()})
               for i in range(per_shard)]
    paths.append(_write(os.path.join(folder, f"{prefix}-{s:03d}.tar"), samples))
  return paths


def _keys(it, n):
  return [next(it)["key"] for _ in range(n)]


def test_pattern_expansion(tmp_path):
  for name in ("a-000.tar", "a-001.tar", "a-002.tar", "b-x.tar", "b-y.tar", "c.tar"):
    (tmp_path / name).write_bytes(b"")
  d = str(tmp_path)
  got = wds.expand_shards(f"{d}/a-{{000..002}}.tar,{d}/b-*.tar, {d}/{{c,a-001}}.tar")
  want = [f"{d}/a-000.tar", f"{d}/a-001.tar", f"{d}/a-002.tar", f"{d}/b-x.tar", f"{d}/b-y.tar", f"{d}/c.tar",
          f"{d}/a-001.tar"]
  assert got == want
  assert wds.expand_shards([f"{d}/a-00[12].tar"]) == want[1:3]
  assert wds.split_top_level("x{1,2}.tar,y.tar") == ["x{1,2}.tar", "y.tar"]
  with pytest.raises(FileNotFoundError, match="matches no file"):
    wds.expand_shards(f"{d}/z-*.tar")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    wds.expand_shards(f"{d}/q-{{0..3}}.tar")


def test_hosts_and_readers_cover_every_sample_once_per_epoch(tmp_path):
  paths = _shards(tmp_path, 8, 5)
  everything = {f"s{s}_{i}" for s in range(8) for i in range(5)}
  per_epoch = []
  for epoch in range(2):
    seen = []
    for host in range(2):
      for reader in range(2):  # what grain's multithread_prefetch / mp_prefetch do to each reader's copy
        ds = wds.WdsIterDataset(paths, seed=3, host=host, hosts=2, epochs=2)
        ds.set_slice(slice(reader, None, 2))
        keys = [r["key"] for r in ds]
        half = len(keys) // 2
        seen.append(keys[epoch * half:(epoch + 1) * half])
    flat = [k for part in seen for k in part]
    assert len(flat) == len(everything) and set(flat) == everything  # once each, none missed
    per_epoch.append(flat)
  assert per_epoch[0] != per_epoch[1]  # the shard order is drawn anew each epoch

  # the same through the training pipeline's readers (2 threads per host, window shuffle), one epoch
  src = wds.WdsSource(paths, shuffle_buffer=7)
  keys = []
  for host in range(2):
    it = pipeline._iterable_records(src, lambda r, rng: {"key": r["key"]}, seed=0, host=host, hosts=2,
                                    num_threads=2, epochs=1)
    keys += [r["key"] for r in it]
  assert sorted(keys) == sorted(everything)
  in_order = [f"s{s}_{i}" for s in range(8) for i in range(5)]
  assert keys != in_order  # shuffled


def _numeric(rec, rng):
  return {"k": np.int64(int(rec["key"][1:].replace("_", ""))), "r": rng.integers(1 << 30)}


def test_resume_equals_uninterrupted(tmp_path):
  paths = _shards(tmp_path, 5, 7)
  src = wds.WdsSource(paths, shuffle_buffer=6)
  tracker = pipeline.BadRecordTracker()

  def batches(**kw):
    return pipeline.train_dataset(src, _numeric, global_batch=4, seed=5, tracker=tracker, num_threads=2, **kw)

  straight = iter(batches())
  expected = [next(straight) for _ in range(30)]  # 120 records: past the end of the 35-record epoch
  for stop in (3, 11):
    first = iter(batches())
    for _ in range(stop):
      next(first)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint's JsonSave stores it
    resumed = iter(batches())
    resumed.set_state(state)
    for want in expected[stop:]:
      got = next(resumed)
      np.testing.assert_array_equal(got["k"], want["k"])
      np.testing.assert_array_equal(got["r"], want["r"])  # the per-example rng resumes too


def test_resampled_draws_shards_with_replacement_and_resumes(tmp_path):
  paths = _shards(tmp_path, 4, 3)
  ds = wds.WdsIterDataset(paths, seed=1, resampled=True)
  it = iter(ds)
  keys = _keys(it, 120)  # 40 shard draws, ten times the 12 samples: the stream does not end
  shard_draws = collections.Counter(k.split("_")[0] for k in keys[::3])
  assert sum(shard_draws.values()) == 40 and set(shard_draws) <= {"s0", "s1", "s2", "s3"}
  assert len(set(shard_draws.values())) > 1  # with replacement: not every shard drawn equally often
  it2 = iter(ds)
  _keys(it2, 50)
  state = it2.get_state()
  it3 = iter(wds.WdsIterDataset(paths, seed=1, resampled=True))
  it3.set_state(state)
  assert _keys(it3, 70) == keys[50:]


def test_bad_samples_and_shards_are_counted_and_skipped(tmp_path):
  good = lambda k: (k, {"jpg": _png(7), "txt": b"a caption"})  # PIL decodes by content, not by extension
  a = _write(tmp_path / "a.tar", [good("a0"), ("a1", {"jpg": b"not an image", "txt": b"x"}),
                                   ("a2", {"png": _png(1)}), ("a3", {"txt": b"no image"}),
                                   ("a4", {"png": _png(2), "json": json.dumps({"caption": "from json"}).encode()}),
                                   ("a5", {"png": _png(3), "json": b"{}"}), good("a6")])
  b = _write(tmp_path / "b.tar", [good(f"b{i}") for i in range(4)])
  data = open(b, "rb").read()
  # cut inside the 3rd sample's image data: b0, b1 stay; the shard counts once
  cut = data.index(b"b2.jpg")
  open(b, "wb").write(data[:cut + 512 + 40])
  c = _write(tmp_path / "c.tar", [good(f"c{i}") for i in range(3)])
  data = open(c, "rb").read()
  open(c, "wb").write(data[:data.index(b"c1.txt") + 100])  # cut inside a header: c0 and c1's jpg are read
  d = tmp_path / "d.tar"
  d.write_bytes(b"this is not a tar file at all" * 40)
  spec = features.FeatureSpec(task="contrastive", image_size=4, max_text_len=4)

  def feature_fn(rec, rng):
    img = features.image_of(rec, 4, None, spec)
    if not rec.get("captions"):
      raise BadRecord("no caption")
    return {"key": rec["key"], "captions": rec["captions"], "img": np.asarray(img)}

  tracker = pipeline.BadRecordTracker(max_fraction=1.0)
  src = wds.WdsSource([a, b, c, str(d)], shuffle_buffer=1, shuffle_shards=False)
  out = list(pipeline._iterable_records(src, pipeline._guarded(feature_fn, tracker), seed=0, host=0, hosts=1,
                                        num_threads=1, epochs=1))
  assert [r["key"] for r in out] == ["a0", "a4", "a6", "b0", "b1", "c0"]
  assert out[1]["captions"] == ["from json"]
  # bad: a1 (undecodable), a2 (no caption), a3 (no image), a5 (no caption field), b (truncated), c (broken
  # header) and d (not a tar): 7 of 13
  assert tracker.summary() == {"records_seen": 13, "records_bad": 7}
  assert any("a1" in e and "cannot be decoded" in e for e in tracker.examples)

  empty = _write(tmp_path / "e.tar", [])
  with pytest.raises(ValueError, match="hold no samples"):
    next(iter(wds.WdsIterDataset([empty])))


def test_mixture_proportions_and_resume(tmp_path):
  a = _shards(tmp_path, 2, 10, prefix="a")
  b = _shards(tmp_path, 2, 10, prefix="b")
  mix = wds.Mixture({"a": wds.WdsSource(a, shuffle_buffer=4), "b": wds.WdsSource(b, shuffle_buffer=4)},
                    wds.parse_mixture("a:0.75,b:0.25"))
  keys = _keys(iter(mix.iter_dataset(seed=2)), 400)
  share = sum(k.startswith("a") for k in keys) / len(keys)
  assert abs(share - 0.75) < 0.02, share
  assert _keys(iter(mix.iter_dataset(seed=2)), 400) == keys  # deterministic
  it = iter(mix.iter_dataset(seed=2))
  _keys(it, 137)
  state = json.loads(json.dumps(it.get_state()))
  again = iter(mix.iter_dataset(seed=2))
  again.set_state(state)
  assert _keys(again, 200) == keys[137:337]

  # through the training pipeline's 2 reader threads: each member's shards are dealt to both readers
  def records():
    return pipeline._iterable_records(mix, lambda r, rng: {"key": r["key"]}, seed=2, host=0, hosts=1, num_threads=2)
  it = iter(records())
  threaded = _keys(it, 300)
  assert abs(sum(k.startswith("a") for k in threaded) / 300 - 0.75) < 0.02
  assert {k for k in threaded if k.startswith("b")} == {f"b{s}_{i}" for s in range(2) for i in range(10)}
  it = iter(records())
  _keys(it, 101)
  state = json.loads(json.dumps(it.get_state()))
  again = iter(records())
  again.set_state(state)
  assert _keys(again, 199) == threaded[101:]


def test_mixture_from_config(tmp_path):
  c = tiny_config("contrastive")
  import ml_collections
  c.data.sources.laion = ml_collections.ConfigDict(dict(source="wds", path=_shards(tmp_path, 1, 2, "l")[0]))
  c.data.sources.coyo = ml_collections.ConfigDict(dict(source="wds", path=_shards(tmp_path, 1, 2, "c")[0]))
  c.data.train.mixture = "laion:0.7,coyo:0.3"
  src = sources.make_train_source(c.data, 8)
  assert isinstance(src, wds.Mixture) and src.weights == {"laion": 0.7, "coyo": 0.3}
  for form in ({"laion": 0.7, "coyo": 0.3}, [("laion", 0.7), ("coyo", 0.3)]):  # as a config file may write it
    c.data.train.mixture = form
    copy = ml_collections.ConfigDict(c.to_dict())  # what loop.run trains on; config.json is written from it
    assert json.loads(copy.to_json_best_effort())["data"]["train"]["mixture"]
    assert sources.make_train_source(copy.data, 8).weights == {"laion": 0.7, "coyo": 0.3}
  c.data.train.mixture = "laion:0.7,cc12m:0.3"
  with pytest.raises(ValueError, match="config.data.sources.cc12m"):
    sources.make_train_source(c.data, 8)
  with pytest.raises(ValueError, match="name:weight"):
    wds.parse_mixture("laion")


def test_demo_shards_hold_the_demo_world(tmp_path):
  paths = demo.write_wds(str(tmp_path), size=10, shard_size=4, image_size=32)
  assert [os.path.basename(p) for p in paths] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
  world = demo.DemoWorld("train", 10, 32)
  recs = list(wds.WdsIterDataset(paths, shuffle_shards=False, epochs=1))
  assert [r["key"] for r in recs] == [f"{i:08d}" for i in range(10)]
  for i, rec in enumerate(recs):
    assert rec["captions"] == [world[i]["captions"][i % 2]]
    img = np.asarray(Image.open(io.BytesIO(rec["image_bytes"])).convert("RGB"), np.float32)
    err = np.abs(img - world[i]["image"]).mean()  # JPEG (quality 95) loses the background noise, not the scene
    assert err < 8 and err < 0.5 * np.abs(img - world[(i + 1) % 10]["image"]).mean()


def test_input_bench_runs(capsys):
  from internvl_jax.bench import wds_input

  rows = wds_input.main(["--samples", "32", "--width", "64", "--height", "48", "--threads", "1,2"])
  assert [r["threads"] for r in rows] == [1, 2] and all(r["samples_per_s"] > 0 and r["per_core"] > 0 for r in rows)
  out = capsys.readouterr().out
  # 16 images/s per chip: 32 pairs per 2 s step (the plan's assumption), printed beside the measured rates
  assert "| 1 |" in out and "| 2 |" in out and "16.0 images/s per chip" in out
