"""TfdsSource on a real tensorflow-datasets preparation, written and read without TensorFlow: a tiny set shaped
like coco_captions (image + captions.text, array_record) built here into a temp data_dir, read back by name, and
train.py training on it in a subprocess that has no builder class (tfds reads the prepared set from its
dataset_info.json). One training image is corrupt bytes: it must be a counted bad record, not a crash."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from internvl_jax.data import features, sources, transforms
from internvl_jax.evaluate import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME, GRAY = "internvl_tiny_captions", "internvl_tiny_gray"
SIZES = {"train": 12, "val": 4}
CORRUPT = 5  # the train example whose image bytes are not an image


def _image(n: int) -> np.ndarray:
  """Example n's 32x32 image: a pattern that differs between examples (PNG keeps it exactly)."""
  img = np.zeros((32, 32, 3), np.uint8)
  img[..., 0] = 10 * n % 256
  img[:, : n + 1, 1] = 255
  img[..., 2] = np.arange(32, dtype=np.uint8)[:, None] * 4
  return img


def _captions(n: int) -> list[str]:
  return [f"example {n} first", f"example {n} second"]


class InternvlTinyCaptions(tfds.core.GeneratorBasedBuilder):
  """coco_captions' layout: image, captions.text (a sequence of texts). Train examples 0-11, val 100-103."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(SIZES["train"])),
            "val": self._generate_examples(range(100, 100 + SIZES["val"]))}

  def _generate_examples(self, numbers):
    for n in numbers:
      # bytes are stored as they are; encoding an array would need TensorFlow, a PIL image does not
      image = b"not an image" if n == CORRUPT else Image.fromarray(_image(n))
      yield n, {"image": image, "captions": {"text": _captions(n)}}


class InternvlTinyGray(tfds.core.GeneratorBasedBuilder):
  """A one-channel Image feature and a single Text caption."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 1)),
        "meta": {"caption": tfds.features.Text()},
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for n in range(3):
      yield n, {"picture": Image.fromarray(np.full((20, 24), 50 * n, np.uint8)), "meta": {"caption": f"gray {n}"}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  for builder in (InternvlTinyCaptions, InternvlTinyGray):
    builder(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def _number(rec) -> int:
  """Which example a record is (tfds shuffles the order at preparation), from its first caption."""
  return int(rec["captions"][0].split()[1])


def test_source_reads_images_captions_and_ids(data_dir):
  for split, size in SIZES.items():
    src = sources.TfdsSource(NAME, split, "image", "captions.text", data_dir)
    assert len(src) == size
    numbers, bad = [], []
    for i in range(size):
      rec = src[i]
      assert rec["id"] == f"{NAME}/{split}/{i}" and rec["key"] == f"{split}/{i}"
      if "error" in rec:
        bad.append(rec)
        continue
      n = _number(rec)
      numbers.append(n)
      assert rec["captions"] == _captions(n)  # str, not bytes; both captions, in order
      assert rec["image"].dtype == np.uint8
      np.testing.assert_array_equal(rec["image"], _image(n))  # the image of the same example as the captions
    expected = [n for n in (range(SIZES["train"]) if split == "train" else range(100, 104)) if n != CORRUPT]
    assert sorted(numbers) == expected
    if split == "train":
      assert len(bad) == 1 and "cannot be decoded (UnidentifiedImageError" in bad[0]["error"]
      with pytest.raises(transforms.BadRecord, match="cannot be decoded"):  # what the trainer counts and skips
        features.image_of(bad[0], 16, None, features.FeatureSpec("contrastive", 16, 12))
    else:
      assert not bad


def test_texts_reads_every_caption_without_decoding_images(data_dir):
  src = sources.TfdsSource(NAME, "train", data_dir=data_dir)
  # the corrupt example's captions are there too: texts() leaves the images encoded
  assert sorted(src.texts()) == sorted(c for n in range(SIZES["train"]) for c in _captions(n))


def test_one_channel_images_and_a_single_text_caption(data_dir):
  src = sources.TfdsSource(GRAY, "train", image_key="picture", caption_key="meta.caption", data_dir=data_dir)
  recs = sorted((src[i] for i in range(len(src))), key=lambda r: r["captions"])
  assert [r["captions"] for r in recs] == [["gray 0"], ["gray 1"], ["gray 2"]]
  assert recs[1]["image"].shape == (20, 24)
  assert np.asarray(transforms.to_pil(recs[1]["image"]))[0, 0].tolist() == [50, 50, 50]


def test_config_mistakes_are_one_clear_error(data_dir):
  with pytest.raises(ValueError, match=r"caption_key='captions\.txt' is not a field of tfds dataset") as e:
    sources.TfdsSource(NAME, "train", caption_key="captions.txt", data_dir=data_dir)
  assert {"captions.text", "image"} == set(str(e.value).split("its fields: ")[1].split(", "))
  with pytest.raises(ValueError, match="image_key='img'"):
    sources.TfdsSource(NAME, "train", image_key="img", data_dir=data_dir)
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    sources.TfdsSource(NAME, "test", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="neither registered nor prepared") as e:
    sources.TfdsSource("no_such_set_anywhere", "train", data_dir=data_dir)
  assert "\n" not in str(e.value)  # tfds's own message lists every registered dataset
  with pytest.raises(FileNotFoundError, match="not prepared in .*tfds build mnist"):  # never downloads
    sources.TfdsSource("mnist", "train", data_dir=data_dir)


def test_missing_package_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if it were not installed
  with pytest.raises(ImportError, match="needs tensorflow-datasets: pip install"):
    sources.TfdsSource(NAME, "train")


def test_eval_set_from_tfds(data_dir, tmp_path, monkeypatch):
  # eval.py's tfds:NAME:SPLIT reads the default data_dir ($TFDS_DATA_DIR); point it at the temp one
  monkeypatch.setattr(sources, "TfdsSource", functools.partial(sources.TfdsSource, data_dir=data_dir))
  ds = datasets.load(f"tfds:{NAME}:val", "retrieval", 16, cache_dir=str(tmp_path))
  assert len(ds.image_paths) == 4 and len(ds.texts) == 8
  for text, i in zip(ds.texts, ds.txt2img):
    n = int(text.split()[1])
    np.testing.assert_array_equal(np.asarray(Image.open(ds.image_paths[i])), _image(n))
  with pytest.raises(ValueError, match=f"1 of 12 records of tfds:{NAME}:train cannot be read"):
    datasets.load(f"tfds:{NAME}:train", "retrieval", 16, cache_dir=str(tmp_path))


def test_train_cli_on_tfds(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  tfds_flags = []
  for split, name in (("train", "train"), ("eval", "val")):
    tfds_flags += [f"--config.data.{split}.source=tfds", f"--config.data.{split}.name={NAME}",
                   f"--config.data.{split}.split={name}", f"--config.data.{split}.data_dir={data_dir}"]
  args = ["--config", "configs/contrastive.py:model=tiny", "--workdir", wd, "--config.total_steps=3",
          "--config.batch_size=8", "--config.eval_batch_size=8", "--config.log_every=1", "--config.warmup_steps=1",
          "--config.data.max_text_len=8", "--config.progress=False", "--config.data.num_threads=1"] + tfds_flags
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  # 3 batches of 8 from 11 good records: the corrupt one came round at least once, and was skipped
  assert records[-1]["records_bad"] >= 1 and records[-1]["records_seen"] >= 24 + records[-1]["records_bad"]
  assert "i2t_r1" in records[-1]  # the retrieval eval ran on the tfds val split
  with open(os.path.join(wd, "tokenizer.json")) as f:
    vocab = json.load(f)["model"]["vocab"]
  # built from the train split's captions (texts()), the corrupt example's included
  assert {"example", "first", "second", "5", "11"} <= set(vocab) and "103" not in vocab
