import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import param_count
from internvl_jax.models import heads, internvl, llm, presets

PIXELS = jnp.asarray(np.random.default_rng(0).normal(size=(2, 56, 56, 3)), jnp.float32)
TEXT = jnp.array([[3, 4, 5, 0], [6, 7, 8, 9]])
MASK = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("name", ["tiny", "tiny_internvl_c", "tiny_internvl_g"])
def test_contrastive_embeddings_are_unit_norm_and_scale_starts_at_1_over_0_07(name):
  model = internvl.InternVLContrastive(presets.contrastive(name), rngs=nnx.Rngs(0))
  img, txt, scale = model(PIXELS, TEXT, MASK)
  assert img.shape == txt.shape == (2, 16) and img.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(txt, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-6)
  # padding after the caption does not change the text embedding
  longer = jnp.concatenate([TEXT, jnp.zeros((2, 2), TEXT.dtype)], 1)
  np.testing.assert_allclose(model.encode_text(longer, jnp.concatenate([MASK, jnp.zeros((2, 2), int)], 1)), txt,
                             atol=1e-5)


def test_internvl_g_image_feature_ensembles_c_and_the_query_path():
  model = internvl.InternVLContrastive(presets.contrastive("tiny_internvl_g"), rngs=nnx.Rngs(0))
  out = model.vision(PIXELS)
  c = internvl.l2_normalize(out.pooler_output)
  g = internvl.l2_normalize(model.query_pool(model.text(out.last_hidden_state).last_hidden_state))
  np.testing.assert_allclose(model.encode_image(PIXELS), internvl.l2_normalize(c + g), atol=1e-5)


def test_contrastive_presets_build_abstractly():
  for name in ("seed_300m", "internvl_c"):
    abstract = nnx.eval_shape(lambda: internvl.InternVLContrastive(presets.contrastive(name), rngs=nnx.Rngs(0)))
    assert param_count(abstract) > 1e8
  with pytest.raises(ValueError, match="unknown contrastive preset"):
    presets.contrastive("nope")


def _chat(**kw):
  cfg = presets.chat("tiny")
  cfg.update(kw)
  return internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))


def test_chat_replaces_image_tokens_in_order():
  model = _chat()
  img = 127
  ids = jnp.array([[1, img, img, img, img, 5, 6], [2, 3, img, img, img, img, 9]])
  embeds = model.embed(ids, PIXELS)
  vision = model.vision_tokens(PIXELS)  # [2 tiles, 4 tokens, 32]
  assert vision.shape == (2, 4, 32)
  np.testing.assert_allclose(embeds[0, 1:5], vision[0], atol=1e-6)
  np.testing.assert_allclose(embeds[1, 2:6], vision[1], atol=1e-6)
  np.testing.assert_allclose(embeds[0, 0], model.language.embed(ids)[0, 0], atol=0)
  out = model(ids, PIXELS)
  ref = model.language(inputs_embeds=embeds).logits
  np.testing.assert_allclose(out.logits, ref, atol=1e-5)
  with pytest.raises(ValueError, match="image tokens"):
    model(ids[:, :5], PIXELS)


def test_chat_vision_tokens_follow_select_layer_pixel_shuffle_and_projector():
  model = _chat(select_layer=-2)
  hidden = model.vision(PIXELS, output_hidden_states=True).hidden_states[-2][:, 1:]
  ref = model.projector(heads.pixel_shuffle(hidden, (4, 4), 0.5, "v2"))
  np.testing.assert_allclose(model.vision_tokens(PIXELS), ref, atol=1e-6)
  with pytest.raises(ValueError, match="select_layer"):
    _chat(select_layer=-5).vision_tokens(PIXELS)


def test_chat_prefix_mode_puts_vision_before_text():
  model = _chat(mode="prefix")
  out = model(TEXT, PIXELS, MASK)
  assert out.logits.shape == (2, 4, 128)
  vision = model.vision_tokens(PIXELS)
  full = model.language(inputs_embeds=jnp.concatenate([vision, model.language.embed(TEXT)], 1),
                        attention_mask=jnp.concatenate([jnp.ones((2, 4)), MASK], 1))
  np.testing.assert_allclose(out.logits, full.logits[:, 4:], atol=1e-5)


def test_frozen_vision_gets_no_gradient_and_is_outside_the_trainable_filter():
  model = _chat(freeze_vision=True)
  ids = jnp.array([[1, 127, 127, 127, 127, 5], [2, 127, 127, 127, 127, 9]])
  loss = lambda m: jnp.mean(m(ids, PIXELS).logits ** 2)
  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, model.trainable_filter())))(model)
  paths = {p[0] for p, _ in nnx.to_flat_state(grads)}
  assert paths == {"projector", "language"}
  # and the stop-gradient makes the full gradient of the vision tower exactly zero
  full = nnx.jit(nnx.grad(loss))(model)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(full["vision"]))
  unfrozen = nnx.jit(nnx.grad(loss))(_chat())
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(unfrozen["vision"])) > 0


def test_chat_incremental_decoding_with_the_image_prefix_in_the_cache():
  model = _chat()
  ids = jnp.array([[1, 127, 127, 127, 127, 5, 6, 7]])
  full = model(ids, PIXELS[:1]).logits
  out = model(ids[:, :6], PIXELS[:1], cache=model.language.init_cache(1, 10))
  out = model(ids[:, 6:7], cache=out.cache)
  out = model(ids[:, 7:8], cache=out.cache)
  np.testing.assert_allclose(out.logits[0, 0], full[0, 7], atol=1e-5)


def test_chat_1b_like_preset_counts():
  abstract = nnx.eval_shape(lambda: internvl.InternVLChat(presets.chat("internvl2_1b_like"), rngs=nnx.Rngs(0)))
  lm = param_count(abstract.language)
  assert abs(lm - 494_032_768) / 494_032_768 < 0.01  # Qwen2-0.5B with tied embeddings
  assert isinstance(abstract.language, llm.Decoder)
