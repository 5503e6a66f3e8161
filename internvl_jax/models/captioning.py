"""The stage-2 (alignment) model: InternVLContrastive plus a way to predict the caption from the image.

Stage 2 trains contrastive + lambda * generative on the same image-text batch, so the model must also produce
next-token logits for a caption conditioned on the image:

- variants 'c' / 'g': QLLaMA already is that decoder. Its query path takes text after the 96 queries
  ([queries ; caption], queries bidirectional and cross-attending into the ViT tokens, caption causal), and its
  LM head gives the logits. Nothing is added.
- variant 'seed': the text tower is bidirectional (it pools a caption into one vector) and cannot predict tokens.
  We add a small causal decoder (`caption_decoder`, our LLaMA-style blocks with an LM head) that reads
  [projected ViT tokens ; caption] as a prefix-LM: bidirectional over the image prefix, causal over the caption.
  It is a separate module (not the text tower run causally) so the contrastive text tower keeps its meaning.

The class subclasses InternVLContrastive, so every stage-1 parameter keeps its name (vision.*, text.*, ...) and a
stage-1 checkpoint initialises stage 2 by name; only caption_* parameters start fresh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from internvl_jax.models import internvl, layers, llm, presets, vit


def caption_decoder_config(cfg: ml_collections.ConfigDict, num_layers: int = 2) -> ml_collections.ConfigDict:
  """A causal decoder with an LM head sized like the seed text tower (same vocab and width), `num_layers` deep."""
  t = cfg.text
  return presets.language_config(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_layers=num_layers, num_heads=t.num_heads,
      num_kv_heads=t.num_kv_heads, mlp_dim=t.mlp_dim, norm_eps=t.norm_eps, causal=True, lm_head=True,
      dtype=t.dtype, attention_impl=t.attention_impl, scan_layers=t.scan_layers, remat=t.remat)


class CaptioningContrastive(internvl.InternVLContrastive):
  """InternVLContrastive + caption logits. cfg: a contrastive config; for variant 'seed' also
  cfg.caption_decoder (a language config, see caption_decoder_config)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    if cfg.variant == "seed":
      dec = cfg.get("caption_decoder") or caption_decoder_config(cfg)
      if not (dec.causal and dec.lm_head):
        raise ValueError("caption_decoder must be causal with an LM head (causal=True, lm_head=True)")
      self.caption_projector = layers.dense(cfg.vision.hidden_size, dec.hidden_size, ("embed", "mlp"),
                                            dtype=layers.to_dtype(dec.dtype), rngs=rngs)
      self.caption_decoder = llm.Decoder(dec, rngs=rngs)
    else:
      if not cfg.text.lm_head:
        raise ValueError("InternVL-C/G captioning needs QLLaMA's LM head (text.lm_head=True)")
      self.caption_projector = self.caption_decoder = None

  def caption_logits(self, vision_out: vit.VisionOutput, input_ids: jax.Array,
                     attention_mask: jax.Array | None = None) -> jax.Array:
    """Next-token logits over the caption: vision_out from self.vision, input_ids [B, T] -> [B, T, vocab] float32
    (position t predicts token t + 1)."""
    tokens = vision_out.last_hidden_state  # [B, 1 + N, Dv]
    b, t = input_ids.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if self.config.variant != "seed":
      out = self.text(tokens, input_ids, mask, return_logits=True)
      return out.logits[:, self.config.text.num_query_tokens:]
    prefix = self.caption_projector(tokens)
    embeds = self.caption_decoder.embed(input_ids)
    n = prefix.shape[1]
    out = self.caption_decoder(inputs_embeds=jnp.concatenate([prefix.astype(embeds.dtype), embeds], axis=1),
                               attention_mask=jnp.concatenate([jnp.ones((b, n), bool), mask], axis=1),
                               prefix_len=n)
    return out.logits[:, n:]
