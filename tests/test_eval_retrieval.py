"""Retrieval: caption preprocessing, recall on hand-built similarity matrices, blocked top-k vs brute force."""

import numpy as np
import pytest

from internvl_jax.evaluate import retrieval


@pytest.mark.parametrize("raw, want", [
  ("A dog runs.", "a dog runs"),
  ("Two  men\tplay\n\nchess!", "two men play chess"),
  ('He said "hi" (twice)*#:;~', "he said hi twice"),
  ("end...start", "end start"),  # punctuation between words becomes a space, not nothing
  ("A man's hat, red-and-blue, costs $5?", "a man's hat, red-and-blue, costs $5?"),  # , ' - $ ? are kept
  ("  ...  ", ""),
  ("ÉCOLE Street", "école street"),
])
def test_preprocess_caption(raw, want):
  assert retrieval.preprocess_caption(raw) == want


def test_preprocess_caption_truncates_to_50_words():
  words = [f"W{i}." for i in range(60)]
  out = retrieval.preprocess_caption(" ".join(words)).split()
  assert out == [f"w{i}" for i in range(50)]
  assert retrieval.preprocess_caption("a b c d", max_words=2) == "a b"


# 3 images x 6 captions (two per image). Hand-ranked: the two directions disagree, one row needs the
# any-caption rule (image 2's first caption is its worst) and two columns contain exact ties.
TXT2IMG = [0, 0, 1, 1, 2, 2]
SIMS = np.array([
  #  c0    c1    c2    c3    c4    c5
  [0.90, 0.10, 0.80, 0.20, 0.30, 0.40],  # img0: best caption c0 (own)           -> rank 1
  [0.95, 0.50, 0.30, 0.20, 0.10, 0.00],  # img1: c0, c1 (img0), then c2 (own)     -> rank 3
  [0.10, 0.20, 0.30, 0.40, 0.05, 0.60],  # img2: c5 (own, its SECOND caption)     -> rank 1
], np.float32)
# Text->image ranks (1-based): c0: img1 > img0 -> 2; c1: img1 > img2 > img0 -> 3; c2: img0, then img1 = img2 tie,
# lower index first -> 2; c3: img2, then img0 = img1 tie -> img1 is 3rd; c4: img0 > img1 > img2 -> 3; c5 -> 1.


def test_recall_hand_built_directions_differ():
  r = retrieval.recall_from_similarity(SIMS, TXT2IMG, ks=(1, 2, 3))
  assert r["image_to_text"] == pytest.approx({"R@1": 200 / 3, "R@2": 200 / 3, "R@3": 100.0})
  assert r["text_to_image"] == pytest.approx({"R@1": 100 / 6, "R@2": 50.0, "R@3": 100.0})


def test_recall_hand_built_uneven_caption_counts():
  sims = np.array([[0.1, 0.2, 0.9, 0.8],
                   [0.5, 0.6, 0.0, 0.4]], np.float32)
  # img0: best c2 (own) -> hit. img1: best c1 (img0's) -> miss. Captions: c0 -> img1 (miss), c1 -> img1 (miss),
  # c2 -> img0 (hit), c3 -> img0 (miss): 1 of 4.
  r = retrieval.recall_from_similarity(sims, [0, 0, 0, 1], ks=(1, 2))
  assert r["image_to_text"] == pytest.approx({"R@1": 50.0, "R@2": 50.0})
  assert r["text_to_image"] == pytest.approx({"R@1": 25.0, "R@2": 100.0})


def _brute_force_recall(img, txt, txt2img, ks):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  sims = img.astype(np.float64) @ txt.astype(np.float64).T
  txt2img = np.asarray(txt2img)
  i2t_rank = np.empty(len(img))
  for i in range(len(img)):
    order = np.argsort(-sims[i], kind="stable")
    i2t_rank[i] = np.flatnonzero(txt2img[order] == i).min()
  t2i_rank = np.empty(len(txt))
  for j in range(len(txt)):
    order = np.argsort(-sims[:, j], kind="stable")
    t2i_rank[j] = np.flatnonzero(order == txt2img[j])[0]
  return ({f"R@{k}": 100 * np.mean(i2t_rank < k) for k in ks}, {f"R@{k}": 100 * np.mean(t2i_rank < k) for k in ks})


def test_recall_matches_brute_force_on_random_embeddings(rng):
  n, e = 37, 8
  # 1 to 4 captions per image (COCO has 5 to 7), shuffled so captions of an image are not adjacent.
  counts = rng.integers(1, 5, size=n)
  txt2img = rng.permutation(np.repeat(np.arange(n), counts))
  # Correlated embeddings so recall is neither 0 nor 100: each caption is a noisy copy of its image.
  img = rng.normal(size=(n, e)).astype(np.float32)
  txt = (img[txt2img] + 1.2 * rng.normal(size=(len(txt2img), e))).astype(np.float32)
  # block_size 5 does not divide 37 or len(txt): exercises the padded last block.
  got = retrieval.evaluate_retrieval(img, txt, txt2img, block_size=5).metrics
  i2t, t2i = _brute_force_recall(img, txt, txt2img, (1, 5, 10))
  assert got["image_to_text"] == pytest.approx(i2t)
  assert got["text_to_image"] == pytest.approx(t2i)
  assert 0 < got["text_to_image"]["R@1"] < 100 and got["image_to_text"]["R@10"] > got["image_to_text"]["R@1"]


def test_blocked_topk_matches_full_sort(rng):
  q, k = rng.normal(size=(11, 6)), rng.normal(size=(23, 6))
  vals, idx = retrieval.blocked_topk(q, k, 4, block_size=3)
  full = q @ k.T
  want = np.argsort(-full, axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(vals, np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-5)
  assert idx.dtype == np.int32 and vals.dtype == np.float32
  # More neighbours asked than keys: everything, ranked.
  _, idx_all = retrieval.blocked_topk(q, k[:3], 10)
  assert idx_all.shape == (11, 3)


def test_evaluate_retrieval_returns_cosine_scores(rng):
  img, txt = rng.normal(size=(4, 5)) * 7.0, rng.normal(size=(8, 5)) * 0.1  # scale must not matter
  res = retrieval.evaluate_retrieval(img, txt, [0, 0, 1, 1, 2, 2, 3, 3], ks=(1, 5))
  assert res.i2t_topk.shape == (4, 5) and res.t2i_topk.shape == (8, 4)
  assert np.all(np.abs(res.i2t_scores) <= 1 + 1e-5)
  assert np.all(np.diff(res.i2t_scores, axis=1) <= 1e-6)  # best first


def test_txt2img_validation():
  with pytest.raises(ValueError, match="no caption"):
    retrieval.img2txt_from_txt2img([0, 0, 2], 3)
  with pytest.raises(ValueError, match="outside"):
    retrieval.img2txt_from_txt2img([0, 3], 3)
  assert retrieval.img2txt_from_txt2img([1, 0, 1], 2) == [[1], [0, 2]]


def test_compute_embeddings_pads_last_batch_and_trims(rng):
  data = rng.normal(size=(10, 3)).astype(np.float32)
  batches = [{"x": data[i:i + 4]} for i in range(0, 10, 4)]  # sizes 4, 4, 2
  seen = []

  def embed_fn(batch):
    seen.append(batch["x"].shape)
    return batch["x"] * 2.0

  out = retrieval.compute_embeddings(embed_fn, batches, pad_to=4, progress=False)
  assert seen == [(4, 3)] * 3
  np.testing.assert_allclose(out, data * 2.0)
  with pytest.raises(ValueError, match="empty"):
    retrieval.compute_embeddings(embed_fn, [], progress=False)


def test_image_groups_make_interchangeable_images_hits():
  # Images 0 and 1 show the same scene (group "a"); image 2 is alone. One caption per image.
  txt2img = [0, 1, 2]
  # Image 0's best caption is caption 1 (image 1's): a miss per image, a hit per group.
  # Caption 0's best image is image 1: likewise. Image 2 and caption 2 are right either way.
  sims = np.array([[0.5, 0.9, 0.0],
                   [0.9, 0.95, 0.0],
                   [0.0, 0.1, 1.0]])
  strict = retrieval.recall_from_similarity(sims, txt2img, ks=(1,))
  grouped = retrieval.recall_from_similarity(sims, txt2img, ks=(1,), image_groups=["a", "a", "b"])
  assert strict["image_to_text"]["R@1"] == pytest.approx(200 / 3)  # images 1, 2
  assert strict["text_to_image"]["R@1"] == pytest.approx(200 / 3)  # captions 1, 2
  assert grouped["image_to_text"]["R@1"] == 100.0 and grouped["text_to_image"]["R@1"] == 100.0
  # groups equal to the image indices are the published protocol
  same = retrieval.recall_from_similarity(sims, txt2img, ks=(1,), image_groups=[0, 1, 2])
  assert same == strict
  with pytest.raises(ValueError, match="one id per image"):
    retrieval.recall_from_similarity(sims, txt2img, ks=(1,), image_groups=[0, 1])
