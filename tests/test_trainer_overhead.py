"""bench/trainer_overhead.py: the PyTorch loop reads the same PNGs into the same pixels and caption ids as the
trainer's feature function (so the two loops compare like for like)."""

import numpy as np
from PIL import Image

from internvl_jax.bench import trainer_overhead as T
from internvl_jax.data import features, sources, tokenizer as tokenizer_lib
from internvl_jax.train import loop


def test_png_dataset_matches_trainer_features(tmp_path):
  jsonl = T.write_pngs(str(tmp_path), 3)
  assert len(open(jsonl).readlines()) == 3
  cfg = T.case_config(jsonl, 10)
  src = sources.make_source(cfg.data.train, T.IMAGE_SIZE)
  tok = tokenizer_lib.build_word_level(src.texts())
  fn = features.make_feature_fn(loop.feature_spec(cfg, train=False), tok)
  ds = T.PngCaptions(jsonl, tok)
  for i in range(3):
    ours = fn(src[i], None)
    x, ids, mask = ds[i]
    img = np.asarray(Image.open(tmp_path / f"img/{i:05d}.png").convert("RGB"), np.float32) / 255.0
    want = (img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  # ImageNet mean / std, written here
    np.testing.assert_allclose(x.numpy().transpose(1, 2, 0), want, atol=1e-5)
    np.testing.assert_allclose(ours["pixel_values"], want, atol=1e-5)
    tokenized = [features.caption_tokens(tok, c, T.TEXT_LEN) for c in src[i]["captions"]]
    match = [(c_ids, c_mask) for c_ids, c_mask in tokenized if np.array_equal(ids.numpy(), c_ids)]
    assert match, "the PyTorch loop's caption ids are none of the record's captions"
    np.testing.assert_array_equal(mask.numpy(), match[0][1])
