import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_jax.data import chat_format, tokenizer, transforms

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
  ours = chat_format.preprocess_image(photo, 448)
  ref = reference_processor(images=[Image.fromarray(photo)], return_tensors="np")["pixel_values"]
  assert ours.shape == ref.transpose(0, 2, 3, 1).shape  # the same tile grid (+ thumbnail)
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-5)


def test_grid_choice_rules():
  assert transforms.closest_grid(600, 400, 448, 1, 12) == (3, 2)
  assert transforms.closest_grid(2000, 300, 448, 1, 12) == (7, 1)
  # aspect-ratio tie between 1x1 and 2x2: a small image stays one tile, a large one takes the larger grid
  assert transforms.closest_grid(300, 300, 448, 1, 12) == (1, 1)
  assert transforms.closest_grid(1400, 1400, 448, 1, 12) == (3, 3)
  tiles = chat_format.preprocess_image(np.zeros((400, 600, 3), np.uint8), 448, max_num=6)
  assert tiles.shape == (7, 448, 448, 3) and tiles.dtype == np.float32


def test_prompt_expansion_puts_each_image_block_in_order():
  text = chat_format.expand_placeholders("<image>\ndescribe <image> this", "<image>", [2, 1], 3)
  first, second = text.split("describe")
  assert first.count("<IMG_CONTEXT>") == 6 and second.count("<IMG_CONTEXT>") == 3
  assert text.startswith("<img>") and text.count("<img>") == text.count("</img>") == 2
  with pytest.raises(ValueError, match="placeholders"):
    chat_format.expand_placeholders("<image> <image>", "<image>", [1], 2)
  assert chat_format.tokens_per_tile(448, 14, 0.5) == 256


def test_without_dynamic_tiling_one_squashed_tile():
  # the official evaluation scripts without --dynamic: build_transform's Resize((S, S)) of the whole image
  photo = skimage.data.chelsea()
  tiles = chat_format.preprocess_image(photo, 448, dynamic=False)
  ref = np.asarray(Image.fromarray(photo).resize((448, 448), Image.Resampling.BICUBIC), np.float32) / 255.0
  np.testing.assert_allclose(tiles[0], (ref - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD, atol=1e-5)
  assert tiles.shape == (1, 448, 448, 3)
  assert chat_format.num_dynamic_tiles(600, 400, 448, 12, True) == 7
  assert chat_format.num_dynamic_tiles(300, 300, 448, 12, True) == 1
