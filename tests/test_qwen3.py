"""Qwen3 dense (InternVL3.5-1B..38B language models): transformers' Qwen3ForCausalLM and an InternVL chat model
with a qwen3 text_config (transformers-native and OpenGVLab layouts) load into our decoder and match PyTorch:
logits, greedy generation with left padding, KV-cache decoding, and save_pretrained back to transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_refs
import opengvlab_layout
from internvl_jax import convert
from internvl_jax.generate import generate
from internvl_jax.models import internvl, llm, presets

jax.config.update("jax_default_matmul_precision", "highest")
REL_TOL = 1e-5  # max |ours - torch| / max |torch| over the logits of real tokens, float32
IMG = 95
NEW = 8


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen3"))
  ref = hf_refs.causal_lm(hf_refs.QWEN3, folder)
  return ref, convert.load_pretrained(folder)


def test_config(lm):
  ref, ours = lm
  c = ours.config
  assert c.qk_norm and not c.qkv_bias and llm.head_dim(c) == 16 != c.hidden_size // c.num_heads
  assert c.num_experts == 0 and ours.layers.attn.q_norm.scale.shape == (2, 16)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_match_torch(lm, pad):
  ref, ours = lm
  ids, mask = hf_refs.prompts(pad)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  abs_err, rel_err = hf_refs.errors(got[mask.astype(bool)], want[mask.astype(bool)])
  print(f"qwen3 logits pad={pad}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL


def test_greedy_generate_with_left_padding_equals_torch(lm):
  ref, ours = lm
  ids, mask = hf_refs.prompts(True)
  with torch.no_grad():
    want = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                        max_new_tokens=NEW).numpy()
  np.testing.assert_array_equal(np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=NEW)), want)


def test_kv_cache_decode_equals_full_forward(lm):
  _, ours = lm
  ids, mask = hf_refs.prompts(True)
  full = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  out = ours(jnp.asarray(ids[:, :4]), attention_mask=jnp.asarray(mask[:, :4]), cache=ours.init_cache(2, 7))
  steps = [np.asarray(out.logits)]
  for t in range(4, 7):
    out = ours(jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.asarray(mask[:, t:t + 1]), cache=out.cache)
    steps.append(np.asarray(out.logits))
  got = np.concatenate(steps, axis=1)
  real = mask.astype(bool)
  assert hf_refs.errors(got[real], full[real])[1] < 1e-6


def test_save_pretrained_writes_a_qwen3_transformers_loads(lm, tmp_path):
  from transformers import Qwen3ForCausalLM
  ref, ours = lm
  convert.save_pretrained(ours, str(tmp_path))
  back = Qwen3ForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = hf_refs.prompts(True)
  with torch.no_grad():
    a = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    b = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# InternVL chat with a Qwen3 language model (InternVL3.5), both layouts


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  native = str(tmp_path_factory.mktemp("internvl_qwen3"))
  ref = hf_refs.chat_model(hf_refs.QWEN3, native, image_token_id=IMG, tie_word_embeddings=True)
  og = str(tmp_path_factory.mktemp("internvl_qwen3_opengvlab"))
  opengvlab_layout.chat_to_opengvlab(native, og, "qwen3")
  return ref, native, og


def chat_inputs():
  """Two prompts with one 56x56 tile each (4 image tokens), row 1 left-padded by 3."""
  rng = np.random.default_rng(4)
  ids = rng.integers(0, IMG, (2, 11)).astype(np.int64)
  ids[0, 2:6], ids[1, 5:9] = IMG, IMG
  mask = np.ones_like(ids)
  ids[1, :3], mask[1, :3] = 0, 0
  return ids, mask, rng.standard_normal((2, 56, 56, 3)).astype(np.float32)


def torch_inputs(ids, mask, pixels):
  return dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())


@pytest.mark.parametrize("layout", ["native", "opengvlab"])
def test_chat_logits_and_greedy_tokens_match_torch(chat, layout):
  ref, native, og = chat
  ours = convert.load_pretrained(native if layout == "native" else og)
  assert isinstance(ours, internvl.InternVLChat) and ours.config.language.qk_norm
  ids, mask, pixels = chat_inputs()
  with torch.no_grad():
    want = ref(**torch_inputs(ids, mask, pixels)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(mask)).logits)
  abs_err, rel_err = hf_refs.errors(got[mask.astype(bool)], want[mask.astype(bool)])
  print(f"chat qwen3 {layout} logits: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
  assert rel_err < REL_TOL
  if layout == "native":  # the same weights either way: one generation (one compile) is enough
    with torch.no_grad():
      tokens = ref.generate(**torch_inputs(ids, mask, pixels), do_sample=False, max_new_tokens=NEW).numpy()
    np.testing.assert_array_equal(
        np.asarray(generate(ours, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW)), tokens)


def test_opengvlab_qwen3_folder_is_detected_as_qwen3(chat):
  from internvl_jax.convert import configs, files
  _, _, og = chat
  assert configs.language_family(files.read_config(og)["llm_config"]) == "qwen3"
  assert configs.language_family({"architectures": ["Qwen3MoeForCausalLM"]}) == "qwen3_moe"
  # without tokenizer files the InternVL3.5 id is assumed: Qwen3's added tokens end at </think> = 151668, then
  # <img>, </img>, <IMG_CONTEXT>
  assert configs.chat_from_opengvlab(files.read_config(og), None).image_token_id == 151671


def test_sliding_window_and_attention_bias_are_refused():
  from internvl_jax.convert import configs
  base = dict(hf_refs.QWEN3)
  for extra, msg in ((dict(use_sliding_window=True), "use_sliding_window"), (dict(attention_bias=True), "bias"),
                     (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types")):
    with pytest.raises(configs.ConversionError, match=msg):
      configs.language_from_hf(dict(base, **extra), "qwen3")


@pytest.mark.parametrize("name", ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b"])
def test_qwen3_presets_count_the_parameters_transformers_does(name):
  from transformers import Qwen3Config, Qwen3ForCausalLM
  cfg = presets.language(name)
  ours = nnx.eval_shape(lambda: llm.Decoder(cfg, rngs=nnx.Rngs(0)))
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  with torch.device("meta"):
    theirs = Qwen3ForCausalLM(Qwen3Config(**convert.configs.language_to_hf(cfg)))
  assert n_ours == sum(p.numel() for p in theirs.parameters())  # tied: the embedding counted once


# InternVL3.5's published sizes (vision / language / total, billions, one decimal), from the release table of the
# InternVL3.5 quick start (docs/en/internvl3.5/quick_start.md of the InternVL docs)
PUBLISHED = {"internvl3_5_1b": (0.3, 0.8, 1.1), "internvl3_5_2b": (0.3, 2.0, 2.3), "internvl3_5_4b": (0.3, 4.4, 4.7),
             "internvl3_5_8b": (0.3, 8.2, 8.5), "internvl3_5_14b": (0.3, 14.8, 15.1),
             "internvl3_5_38b": (5.5, 32.8, 38.4), "internvl3_5_30b_a3b": (0.3, 30.5, 30.8),
             "internvl3_5_241b_a28b": (5.5, 235.1, 240.7), "internvl3_5_gpt_oss_20b_a4b": (0.3, 20.9, 21.2)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_internvl3_5_chat_presets_have_the_published_sizes(name):
  from internvl_jax.models import vit
  cfg = presets.chat(name)
  count = lambda make: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make),
                                                                                      nnx.Param)))
  sizes = (count(lambda: vit.InternViT(cfg.vision, rngs=nnx.Rngs(0))),
           count(lambda: llm.Decoder(cfg.language, rngs=nnx.Rngs(0))),
           count(lambda: internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))))
  # a tie would drop a vocab x hidden matrix: 1B would read 0.6B / 0.9B
  assert tuple(round(n / 1e9 + 1e-9, 1) for n in sizes) == PUBLISHED[name]
  if "gpt_oss" not in name:
    assert cfg.language.qk_norm and cfg.image_token_id == 151671


def test_chat_save_pretrained_writes_an_internvl_with_qwen3_text_transformers_loads(chat, tmp_path):
  from transformers import InternVLForConditionalGeneration
  ref, _, og = chat
  convert.save_pretrained(convert.load_pretrained(og), str(tmp_path))  # OpenGVLab in, transformers-native out
  back = InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  assert back.config.text_config.model_type == "qwen3"
  ids, mask, pixels = chat_inputs()
  with torch.no_grad():
    np.testing.assert_array_equal(ref(**torch_inputs(ids, mask, pixels)).logits.numpy(),
                                  back(**torch_inputs(ids, mask, pixels)).logits.numpy())
