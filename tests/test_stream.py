"""stream() yields generate()'s tokens one at a time (greedy and sampled, with a repetition penalty, stopping at
the same stop token) for a plain decoder and a tiny released-layout chat model with an image, and compiles one
prefill and one step per prompt-length bucket however many prompts of different lengths it serves."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import release_folders
from internvl_jax import stream as stream_lib
from internvl_jax.evaluate import models
from internvl_jax.generate import generate
from internvl_jax.models import llm, presets

NEW = 10


@pytest.fixture(scope="module")
def decoder():
  return llm.Decoder(presets.language("tiny"), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  """A tiny InternVL2-1B-style folder (OpenGVLab layout, Qwen2, Hermes-2 template) loaded as eval.py loads it,
  and an 80 x 60 image file (several 56 px tiles + thumbnail with dynamic tiling)."""
  root = tmp_path_factory.mktemp("chat")
  folder = release_folders.internvl2_1b(str(root / "model"))[0]
  image = str(root / "image.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(image)
  return models.load_hf(folder), image


def _generate_new(model, ids, pixels=None, **kw):
  return np.asarray(generate(model, ids[None], pixel_values=pixels, max_new_tokens=NEW, **kw))[0, len(ids):].tolist()


def _until_stop(tokens, stop):
  return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


def test_decoder_stream_equals_generate(decoder):
  ids = np.random.default_rng(0).integers(0, 120, (11,)).astype(np.int32)
  want = _generate_new(decoder, ids)
  assert list(stream_lib.stream(decoder, ids, max_new_tokens=NEW)) == want
  stop = want[4]  # a token first produced at step 4 (or earlier): the stream ends right after it
  want_stop = _until_stop(_generate_new(decoder, ids, eos_token_id=[stop]), stop)
  got = list(stream_lib.stream(decoder, ids, max_new_tokens=NEW, stop_ids=[stop]))
  assert got == want_stop and got[-1] == stop and len(got) <= 5
  # sampled, with a repetition penalty and min_new_tokens: the same sampler and key sequence as generate
  kw = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.5, min_new_tokens=2)
  key = jax.random.key(7)
  want = _generate_new(decoder, ids, rng=key, **kw)
  assert list(stream_lib.stream(decoder, ids, max_new_tokens=NEW, key=key, **kw)) == want
  assert want != _generate_new(decoder, ids)  # the settings matter


def test_decoder_stream_batch(decoder):
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 120, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[1, :3], mask[1, :3] = 0, 0
  want = np.asarray(generate(decoder, ids, attention_mask=mask, max_new_tokens=NEW))[:, 9:]
  got = np.stack(list(stream_lib.stream(decoder, ids, attention_mask=mask, max_new_tokens=NEW)), axis=1)
  np.testing.assert_array_equal(got, want)


def test_chat_stream_with_image_equals_generate(chat):
  m, image = chat
  inputs = m.chat.inputs("Describe the image.", [image])
  ids, pixels = inputs["input_ids"][0], inputs["pixel_values"]
  assert pixels.shape[0] > 1 and (ids == m.chat.tokenizer.image_token_id).sum() == 4 * pixels.shape[0]  # tiled
  want = _generate_new(m.model, ids, pixels)
  assert list(stream_lib.stream(m.model, ids, pixels, max_new_tokens=NEW)) == want
  stop = want[3]
  want_stop = _until_stop(_generate_new(m.model, ids, pixels, eos_token_id=[stop]), stop)
  got = list(stream_lib.stream(m.model, ids, pixels, max_new_tokens=NEW, stop_ids=[stop]))
  assert got == want_stop and got[-1] == stop
  assert stream_lib.programs(m.model).cache_size() == 2  # one prefill, one step for both requests


def test_compilations_stay_fixed_across_prompt_lengths():
  assert [stream_lib.bucket_length(t) for t in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
  rng = np.random.default_rng(2)
  decoder = llm.Decoder(presets.language("tiny"), rngs=nnx.Rngs(3))  # nothing compiled for it yet
  progs = stream_lib.programs(decoder)
  before = progs.cache_size()
  assert before == 0
  for t in (3, 7, 12, 16):  # one bucket (16): one prefill + one step, whatever the settings
    ids = rng.integers(0, 120, (t,)).astype(np.int32)
    got = list(stream_lib.stream(decoder, ids, max_new_tokens=6, temperature=0.5 * (t % 2), stop_ids=[t, 1, 2]))
    assert 1 <= len(got) <= 6
  assert progs.cache_size() - before == 2
  for t in (20, 25, 31):  # a second bucket (32): two more, then none
    list(stream_lib.stream(decoder, rng.integers(0, 120, (t,)).astype(np.int32), max_new_tokens=6))
  assert progs.cache_size() - before == 4


def test_stream_bad_inputs(decoder):
  with pytest.raises(ValueError, match="repetition_penalty > 0"):
    next(stream_lib.stream(decoder, np.ones((3,), np.int32), repetition_penalty=-1.0))
  with pytest.raises(ValueError, match="left-padded"):
    next(stream_lib.stream(decoder, np.ones((1, 3), np.int32), attention_mask=np.array([[1, 1, 0]])))
  assert list(stream_lib.stream(decoder, np.ones((3,), np.int32), max_new_tokens=0)) == []


@pytest.mark.slow
def test_longrope_stream_equals_transformers(tmp_path):
  """Phi-3 longrope with 16 original positions: a 7-token prompt (bucketed to 16) and 16 new tokens cross them,
  where transformers' generate recomputes the sequence with the long factors (test_phi3's case)."""
  import hf_refs
  import torch
  from test_phi3 import VARIANTS
  from internvl_jax import convert
  ref = hf_refs.causal_lm(VARIANTS["longrope"], str(tmp_path))
  ours = convert.load_pretrained(str(tmp_path))
  ids, mask = hf_refs.prompts(True, seed=0)
  with torch.no_grad():
    want = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=16).numpy()[:, ids.shape[1]:]
  got = np.stack(list(stream_lib.stream(ours, ids, attention_mask=mask, max_new_tokens=16)), axis=1)
  np.testing.assert_array_equal(got, want)
  assert stream_lib.programs(ours).cache_size() == 3  # prefill, step, and the one recompute step
