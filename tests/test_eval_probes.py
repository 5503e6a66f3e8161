"""Probes of a frozen vision tower (eval.py --task linear_probe / attention_probe).

References: scikit-learn's LogisticRegression on the same standardised features (C = 1 / (wd N)); the official
attention_pooling head (OpenGVLab classification/models/intern_vit_6b.py) written out in numpy; synthetic data whose
best penalty is known by construction; and eval.py end to end on a tiny InternVL-14B-layout folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

import release_folders
from internvl_jax.evaluate import attention_probe as ap
from internvl_jax.evaluate import linear_probe as lp
from internvl_jax.evaluate import report, run, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gaussian_classes(rng, n, means, noise=1.0):
  y = rng.integers(0, len(means), n)
  return (means[y] + noise * rng.standard_normal((n, means.shape[1]))).astype(np.float32), y


def test_cls_patch_concat_is_the_official_feature(rng):
  tokens = rng.standard_normal((2, 5, 3)).astype(np.float32)
  want = np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=-1)  # cat(x[:, 0], x[:, 1:].mean(1))
  np.testing.assert_allclose(np.asarray(lp.cls_patch_concat(tokens)), want, rtol=1e-6)


@pytest.mark.parametrize("wd", [1e-3, 1e-1])
def test_logistic_regression_equals_sklearn(wd):
  """Separable-but-noisy classes: our fit and sklearn's at the matched penalty agree in accuracy and weights."""
  rng = np.random.default_rng(0)
  means = 0.35 * rng.standard_normal((10, 32))
  xtr, ytr = _gaussian_classes(rng, 600, means)
  xte, yte = _gaussian_classes(rng, 400, means)
  a, b = lp.standardize(xtr, xte)
  ours = lp.fit_logistic(a, ytr, 10, wd)
  ref = LogisticRegression(C=1.0 / (wd * len(ytr)), max_iter=10000, tol=1e-10).fit(a, ytr)
  logits = lp.predict_logits(ours, b)
  ref_top1, ref_top5 = (lp.topk_accuracy(ref.decision_function(b), yte, k) for k in (1, 5))
  assert abs(lp.topk_accuracy(logits, yte, 1) - ref_top1) <= 1.0
  assert abs(lp.topk_accuracy(logits, yte, 5) - ref_top5) <= 1.0
  assert 50.0 < ref_top1 < 99.0  # noisy: neither chance nor trivially separable
  # the same optimum (sklearn's logits are defined up to a per-row constant)
  centred = lambda z: z - z.mean(1, keepdims=True)
  np.testing.assert_allclose(centred(logits), centred(ref.decision_function(b)), atol=2e-2 * np.abs(logits).max())


def test_sweep_picks_a_strong_penalty_when_it_generalises():
  """10 informative features beside 200 heavy-tailed (Cauchy) noise ones: a weakly penalised head fits the training
  rows through their rare huge noise values and misreads new ones; a strong penalty keeps those weights small."""
  rng = np.random.default_rng(2)
  means = np.stack([np.full(10, 0.4), np.full(10, -0.4)])

  def draw(n):
    y = rng.integers(0, 2, n)
    x = np.concatenate([means[y] + rng.standard_normal((n, 10)), rng.standard_cauchy((n, 200))], 1)
    return x.astype(np.float32), y

  (xtr, ytr), (xte, yte) = draw(600), draw(1000)
  res = lp.linear_probe(xtr, ytr, xte, yte, 2, (1e-5, 1e-3, 1e-1, 1.0))
  weak = lp.linear_probe(xtr, ytr, xte, yte, 2, (1e-5,))
  assert res.weight_decay >= 1e-1, res.sweep
  assert res.top1 >= weak.top1 + 7.0, (res.top1, weak.top1)


def test_sweep_picks_a_weak_penalty_when_the_signal_hides_in_correlations():
  """Class differs only in x0 - x1 while x0 and x1 share a large common noise: a heavily shrunk head leans on the
  class-mean direction (x0 alone, swamped by the noise); a weakly penalised one finds the difference."""
  rng = np.random.default_rng(2)

  def draw(n):
    y = rng.integers(0, 3, n)
    z = 3.0 * rng.standard_normal(n)
    x = np.stack([z + 0.5 * y + 0.05 * rng.standard_normal(n), z + 0.05 * rng.standard_normal(n)], 1)
    return x.astype(np.float32), y

  (xtr, ytr), (xte, yte) = draw(600), draw(400)
  res = lp.linear_probe(xtr, ytr, xte, yte, 3, (1e-5, 1e-3, 1e-1, 1.0))
  strong = lp.linear_probe(xtr, ytr, xte, yte, 3, (1.0,))
  assert res.weight_decay <= 1e-3, res.sweep
  assert res.top1 >= 95.0 and strong.top1 <= res.top1 - 20.0, (res.top1, strong.top1)


def _position_task(rng, n, pos, t=8, d=16, classes=4):
  """Label = argmax of the first `classes` dims of token 3's content; token 4 carries its negation, so the mean over
  tokens holds no trace of it. pos [t, d]: fixed position codes, so the probe can find token 3."""
  z = rng.standard_normal((n, t, d)).astype(np.float32)
  z[:, 4] = -z[:, 3] + 0.1 * rng.standard_normal((n, d))
  return pos + z, np.argmax(z[:, 3, :classes], axis=1)


def test_attention_probe_learns_what_mean_pooling_cannot():
  rng = np.random.default_rng(0)
  pos = 2.0 * rng.standard_normal((8, 16)).astype(np.float32)
  xtr, ytr = _position_task(rng, 1024, pos)
  xte, yte = _position_task(rng, 512, pos)
  mean_probe = lp.linear_probe(xtr.mean(1), ytr, xte.mean(1), yte, 4, (1e-4,))
  probe, log = ap.train_attention_probe(xtr, ytr, 4, 4, epochs=20, batch_size=128, base_lr=0.4, progress=False)
  top1 = lp.topk_accuracy(ap.predict(probe, xte), yte, 1)
  assert mean_probe.top1 < 40.0  # chance is 25
  assert top1 >= 85.0, (top1, log)
  assert log["steps"] == 20 * (1024 // 128) and log["lr"] == pytest.approx(0.4 * 128 / 512)  # the scaling rule


def _layer_norm(x, p, eps=1e-5):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p.scale[...]) + np.asarray(p.bias[...])


def test_attention_probe_is_the_official_head(rng):
  """The eval-mode forward as AttentionPoolingBlock + SyncBatchNorm(eps 1e-6) + Linear compute it, in numpy, on the
  probe's trained weights (BatchNorm's running statistics updated by training)."""
  x, y = rng.standard_normal((64, 5, 8)).astype(np.float32), rng.integers(0, 3, 64)
  probe, _ = ap.train_attention_probe(x, y, 3, 2, epochs=2, batch_size=16, progress=False)
  w = lambda lin: (np.asarray(lin.kernel[...]), np.asarray(lin.bias[...]))
  pool = probe.pool
  q_in = _layer_norm(x.mean(1, keepdims=True), pool.norm_q)  # the query is the mean token
  k_in, v_in = _layer_norm(x, pool.norm_k), _layer_norm(x, pool.norm_v)
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = w(pool.q), w(pool.k), w(pool.v), w(pool.proj)
  heads = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 4).transpose(0, 2, 1, 3)
  q, k, v = heads(q_in @ wq + bq), heads(k_in @ wk + bk), heads(v_in @ wv + bv)
  att = np.einsum("bhqd,bhkd->bhqk", q * 4 ** -0.5, k)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  pooled = np.einsum("bhqk,bhkd->bqhd", att, v).reshape(64, 8) @ wo + bo
  bn = probe.norm
  mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  assert np.abs(mean).max() > 1e-3  # the running statistics moved
  normed = (pooled - mean) / np.sqrt(var + 1e-6) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  wh, bh = w(probe.head)
  np.testing.assert_allclose(ap.predict(probe, x), normed @ wh + bh, rtol=1e-4, atol=1e-4)


def test_probe_labels_align_the_splits():
  train = sources.LabelSet(["a", "b", "c"], ["cat", "dog", "cat"])
  test = sources.LabelSet(["d", "e"], ["dog", "cat"])
  names, ytr, yte = run.probe_labels(train, test)
  assert names == ["cat", "dog"] and ytr.tolist() == [0, 1, 0] and yte.tolist() == [1, 0]
  folders = sources.LabelSet(["a"], [1], ["ant", "bee"])
  names, _, yte = run.probe_labels(folders, sources.LabelSet(["b"], [0], ["bee"]))
  assert names == ["ant", "bee"] and yte.tolist() == [1]  # test folders matched by name
  with pytest.raises(ValueError, match="test class 'eel' is not one of the 2 classes"):
    run.probe_labels(train, sources.LabelSet(["x"], ["eel"]))
  digits = sources.LabelSet(["a", "b"], ["10", "3"])
  names, ytr, _ = run.probe_labels(digits, digits)
  assert names == ["3", "10"] and ytr.tolist() == [1, 0]  # integer labels sort numerically and are names
  with pytest.raises(ValueError, match="test class '1' is not one"):  # not "the class at index 1"
    run.probe_labels(digits, sources.LabelSet(["c"], ["1"]))
  _, _, yte = run.probe_labels(sources.LabelSet(["a"], ["0"]), sources.LabelSet(["c"], ["1"]), classnames=["x", "y"])
  assert yte.tolist() == [1]  # with --classnames, as zeroshot: an index


# ------------------------------------------------------------------------------------------------------ eval.py

def _eval(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--progress=false"] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory):
  """A tiny InternVL-14B-layout folder and train / test class folders of noisy red, green and blue images."""
  root = tmp_path_factory.mktemp("probe")
  model = root / "model"
  model.mkdir()
  release_folders.internvl_14b(str(model))
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("test", 6)):
    for name, colour in (("red", (200, 30, 30)), ("green_leaf", (30, 200, 30)), ("blue", (30, 30, 200))):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(np.asarray(colour) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.png")
  return root


@pytest.mark.slow  # two eval.py processes, each loading a model and compiling: ~30-50 s apiece on 2 busy cores
@pytest.mark.parametrize("task", ["linear_probe", "attention_probe"])
def test_eval_py_probe_on_class_folders(colour_folders, tmp_path, task):
  root = colour_folders
  out = str(tmp_path / f"{task}.json")
  extra = (["--weight_decays", "1e-4,1e-2"] if task == "linear_probe"
           else ["--probe_epochs", "20", "--probe_batch_size", "12"])
  res = _eval(["--task", task, "--hf", str(root / "model"), "--train_data", str(root / "train"), "--data",
               str(root / "test"), "--out", out, "--batch_size", "8"] + extra)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "|---|" in res.stdout
  result = json.load(open(out))
  report.validate_result(result)
  assert result["task"] == task and result["num_train"] == 36 and result["num_images"] == 18
  assert result["num_classes"] == 3 and result["top5"] is None
  assert set(result["per_class"]) == {"blue", "green leaf", "red"}
  assert result["top1"] >= 90.0  # colours are separable even through a random tower
  if task == "linear_probe":
    assert result["weight_decay"] in (1e-4, 1e-2) and len(result["sweep"]) == 2
    assert result["feature_dim"] == 2 * 24  # class token ; mean patch token of the 24-wide tower
  else:
    assert result["num_heads"] == 2 and result["steps"] == 20 * 3


def test_eval_py_checks_the_data_before_loading_a_model(tmp_path):
  res = _eval(["--task", "linear_probe", "--hf", str(tmp_path / "no_model"), "--train_data",
               str(tmp_path / "missing"), "--data", "demo:4"])
  assert res.returncode == 1
  assert "missing" in res.stderr.strip().splitlines()[-1] and "no_model" not in res.stderr


def test_tfds_classification_splits(tmp_path, monkeypatch):
  """tfds:NAME for a probe: image + ClassLabel sets (cifar10's layout) read without TensorFlow, the split from the
  spec or, by default, test for --data and train for --train_data; names from the ClassLabel, pixels exact."""
  import tensorflow_datasets as tfds
  from internvl_jax.evaluate import datasets

  def image(n):
    return np.full((8, 8, 3), 20 * n, np.uint8)

  class InternvlTinyClasses(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["cat", "dog", "eel"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(6)), "test": self._generate_examples(range(6, 9))}

    def _generate_examples(self, numbers):
      for n in numbers:
        yield n, {"image": Image.fromarray(image(n)), "label": n % 3}

  InternvlTinyClasses(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  monkeypatch.setattr(datasets, "TFDS_DATA_DIR", str(tmp_path / "tfds"))
  cache = str(tmp_path / "cache")
  train = datasets.load("tfds:internvl_tiny_classes", "linear_probe", 8, cache, split="train")
  test = datasets.load("tfds:internvl_tiny_classes", "attention_probe", 8, cache)
  named = datasets.load("tfds:internvl_tiny_classes:train", "zeroshot", 8, cache)
  assert train.classnames == test.classnames == ["cat", "dog", "eel"]
  assert len(train.image_paths) == 6 and len(test.image_paths) == 3 and len(named.image_paths) == 6
  for data in (train, test):
    for path, lab in zip(data.image_paths, data.labels):
      pixels = np.asarray(Image.open(path))
      assert pixels[0, 0, 0] % 60 == 20 * lab  # example n has label n % 3 and value 20 n
  with pytest.raises(ValueError, match="tfds:internvl_tiny_classes:nope"):
    datasets.load("tfds:internvl_tiny_classes:nope", "linear_probe", 8, cache)


def test_probes_take_the_stage_that_trained_the_vision_tower(tmp_path):
  from internvl_jax.evaluate import models
  for stage, task in (("stage1", "contrastive"), ("stage3", "instruct")):
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "config.json").write_text(json.dumps({"task": task}))
  assert models.stage_dir(str(tmp_path), "linear_probe").endswith("stage1")
  assert models.stage_dir(str(tmp_path), "vqa").endswith("stage3")
  (tmp_path / "stage1" / "config.json").unlink()  # a chat-only workdir: its tower is the one there is
  assert models.stage_dir(str(tmp_path), "attention_probe").endswith("stage3")
