import numpy as np
import pytest
import skimage.data
import tokenizers
from PIL import Image
from tokenizers import models, pre_tokenizers
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_jax.data import chat_inputs, tokenizer, transforms

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"]


@pytest.fixture(scope="module")
def reference_processor():
  # transformers' InternVL image processor (GotOcr2 with crop_to_patches), set to InternVL's published values
  return GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                  max_patches=12, image_mean=list(transforms.IMAGENET_MEAN),
                                  image_std=list(transforms.IMAGENET_STD))


@pytest.mark.parametrize("name", PHOTOS)
def test_tiles_match_transformers_on_real_photos(reference_processor, name):
  photo = getattr(skimage.data, name)()
  ours = chat_inputs.preprocess_image(photo, 448)
  ref = reference_processor(images=[Image.fromarray(photo)], return_tensors="np")["pixel_values"]
  assert ours.shape == ref.transpose(0, 2, 3, 1).shape  # the same tile grid (+ thumbnail)
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-5)


def test_grid_choice_rules():
  assert transforms.closest_grid(600, 400, 448, 1, 12) == (3, 2)
  assert transforms.closest_grid(2000, 300, 448, 1, 12) == (7, 1)
  # aspect-ratio tie between 1x1 and 2x2: a small image stays one tile, a large one takes the larger grid
  assert transforms.closest_grid(300, 300, 448, 1, 12) == (1, 1)
  assert transforms.closest_grid(1400, 1400, 448, 1, 12) == (3, 3)
  tiles = chat_inputs.preprocess_image(np.zeros((400, 600, 3), np.uint8), 448, max_num=6)
  assert tiles.shape == (7, 448, 448, 3) and tiles.dtype == np.float32


def _tiny_tokenizer():
  vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<IMG_CONTEXT>", "<img>", "</img>", "describe", "this",
                                       "<unk>"])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<pad>", "</s>", "<IMG_CONTEXT>", "<img>", "</img>"])
  return tokenizer.Tokenizer(tok, eos_token="</s>", pad_token="<pad>")


def test_prompt_builder_expands_each_image_in_order():
  text = chat_inputs.expand_image_placeholders("<image>\ndescribe <image> this", [2, 1], 3)
  first, second = text.split("describe")
  assert first.count("<IMG_CONTEXT>") == 6 and second.count("<IMG_CONTEXT>") == 3
  assert text.startswith("<img>") and text.count("<img>") == text.count("</img>") == 2
  assert chat_inputs.expand_image_placeholders("describe", [1], 2).startswith("<img><IMG_CONTEXT><IMG_CONTEXT></img>\n")
  with pytest.raises(ValueError, match="placeholders"):
    chat_inputs.expand_image_placeholders("<image> <image>", [1], 2)


def test_chat_inputs_have_one_context_id_per_vision_token():
  tok = _tiny_tokenizer()
  out = chat_inputs.chat_inputs(tok, "<image>\ndescribe this", [np.zeros((56, 112, 3), np.uint8)], image_size=56)
  n_tiles = out["pixel_values"].shape[0]
  assert n_tiles == 3  # 2 tiles + thumbnail
  assert int((out["input_ids"] == tok.image_token_id).sum()) == n_tiles * chat_inputs.tokens_per_tile(56, 14, 0.5)
  assert chat_inputs.tokens_per_tile(448, 14, 0.5) == 256


def test_chatml_prompt_layout():
  assert chat_inputs.chatml_prompt("<image>\nhi") == "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert chat_inputs.chatml_prompt("q", system="s").startswith("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n")
