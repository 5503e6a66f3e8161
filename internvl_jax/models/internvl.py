"""Composite models: InternVLContrastive (seed design and InternVL-C/G) and InternVLChat (InternVL 1.5+)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from internvl_jax.models import heads, layers, llm, qllama, vit


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit-norm rows in float32. [..., E] -> [..., E]."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class InternVLContrastive(nnx.Module):
  """Image tower and text tower mapped to a shared unit-norm space, plus a learnable logit scale s (the loss uses
  exp(s)) and, when cfg.logit_bias_init is set (the sigmoid loss), a learnable logit bias.

  variant 'seed': ViT CLS -> ProjectionMLP; bidirectional text tower -> pooling -> Linear.
  variant 'c':    ViT tokens -> attention pooling (in the ViT); QLLaMA text -> last real token -> text_projection.
  variant 'g':    as 'c', image feature = normalize(C) + normalize(attention-pool(QLLaMA query outputs)).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if cfg.variant not in ("seed", "c", "g"):
      raise ValueError(f"contrastive variant {cfg.variant!r} is not 'seed', 'c' or 'g'")
    if cfg.variant != "seed" and cfg.text_kind != "qllama":
      raise ValueError("InternVL-C/G variants need text_kind='qllama'")
    self.config = cfg
    dtype = layers.to_dtype(cfg.vision.dtype)
    self.vision = vit.InternViT(cfg.vision, rngs=rngs)
    self.image_projection = (heads.ProjectionMLP(cfg.vision.hidden_size, cfg.embed_dim, cfg.num_proj_layers,
                                                 rngs=rngs, dropout_rate=cfg.proj_dropout, dtype=dtype)
                             if cfg.variant == "seed" else None)
    self.text = (qllama.QLLaMA(cfg.text, rngs=rngs) if cfg.text_kind == "qllama" else llm.Decoder(cfg.text, rngs=rngs))
    self.text_projection = layers.dense(cfg.text.hidden_size, cfg.embed_dim, ("embed", "mlp"),
                                        use_bias=cfg.variant == "seed", dtype=dtype, rngs=rngs)
    self.query_pool = (heads.AttentionPooling(cfg.text.hidden_size, cfg.query_pool_heads, cfg.embed_dim, rngs=rngs,
                                              dtype=dtype, attention_impl=cfg.text.attention_impl)
                       if cfg.variant == "g" else None)
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32), out_sharding=())
    # the sigmoid loss's bias b (SigLIP); absent for the softmax loss, so older checkpoints and the converted
    # releases (which have none) keep their exact parameter tree
    bias = cfg.get("logit_bias_init", None)
    self.logit_bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32), out_sharding=())

  def encode_image(self, pixel_values: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """pixel_values [B, H, W, 3] (normalised) -> unit-norm [B, embed_dim] float32."""
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    return self.image_features(self.vision(pixel_values, dropout_key=keys[0]), dropout_key=keys[1])

  def image_features(self, out: vit.VisionOutput, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """The image embedding from an InternViT output (so a caller that also needs the vision tokens, e.g. the
    stage-2 caption loss, runs the tower once). -> unit-norm [B, embed_dim] float32."""
    keys = (None, dropout_key)
    if self.config.variant == "seed":
      return l2_normalize(self.image_projection(out.pooler_output, keys[1]))
    feature = l2_normalize(out.pooler_output)
    if self.config.variant == "g":
      queries = self.text(out.last_hidden_state).last_hidden_state  # [B, Q, D_text]
      feature = feature + l2_normalize(self.query_pool(queries))
    return l2_normalize(feature)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T] int, attention_mask [B, T] (1 = real) -> unit-norm [B, embed_dim] float32."""
    if self.config.text_kind == "qllama":
      hidden = self.text.encode_text(input_ids, attention_mask)
    else:
      hidden = self.text(input_ids, attention_mask=attention_mask, return_logits=False).last_hidden_state
    return l2_normalize(self.text_projection(llm.pool_tokens(hidden, attention_mask, self.config.text_pooling)))

  def loss_params(self) -> tuple[jax.Array, jax.Array | None]:
    """(logit scale exp(s) [], logit bias [] or None when the model has none), float32: the loss's parameters."""
    return jnp.exp(self.logit_scale[...]), None if self.logit_bias is None else self.logit_bias[...]

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (image embeddings [B, E], text embeddings [B, E], logit scale exp(s) []), all float32."""
    return (self.encode_image(pixel_values, dropout_key=dropout_key), self.encode_text(input_ids, attention_mask),
            self.loss_params()[0])


class InternVLChat(nnx.Module):
  """ViT (layer `select_layer`) -> drop CLS -> pixel shuffle -> projector -> language model.

  mode 'replace' (InternVL 1.5+): the embeddings at `image_token_id` positions are replaced, in order, by the
  vision tokens of pixel_values [num_tiles, H, W, 3] (row-major over the batch, like the reference).
  mode 'prefix' (seed): [vision tokens of image b ; text tokens of row b], pixel_values [B, H, W, 3]; logits are
  returned for the text positions only.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if cfg.mode not in ("replace", "prefix"):
      raise ValueError(f"chat mode {cfg.mode!r} is not 'replace' or 'prefix'")
    self.config = cfg
    self.vision = vit.InternViT(cfg.vision, rngs=rngs)
    f = round(1 / cfg.downsample_ratio)
    self.projector = heads.ChatProjector(cfg.vision.hidden_size * f * f, cfg.language.hidden_size, rngs=rngs,
                                         dtype=layers.to_dtype(cfg.language.dtype))
    self.language = llm.Decoder(cfg.language, rngs=rngs)

  def trainable_filter(self):
    """The nnx filter of parameters to differentiate and optimise: everything but the vision tower when frozen."""
    if self.config.freeze_vision:
      return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision")))
    return nnx.Param

  def _vision_layers(self) -> int:
    sel, total = self.config.select_layer, self.config.vision.num_layers
    n = total + 1 + sel if sel < 0 else sel  # hidden_states[sel] of (embeddings, layer 1, ..., layer L)
    if not 1 <= n <= total:
      raise ValueError(f"select_layer {sel} is outside the vision tower's {total} layers")
    return n

  def vision_tokens(self, pixel_values: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
    """pixel_values [N, H, W, 3] -> projected vision tokens [N, (H/p/f)*(W/p/f), D_lm]. lora_key: LoRA dropout of
    the vision adapters (training only; the tower's drop-path / dropout stay off here)."""
    cfg = self.config
    hidden = self.vision(pixel_values, num_layers=self._vision_layers(), lora_key=lora_key).last_hidden_state[:, 1:]
    if cfg.freeze_vision:
      hidden = jax.lax.stop_gradient(hidden)  # no backward pass through the frozen tower
    p = cfg.vision.patch_size
    grid = (pixel_values.shape[1] // p, pixel_values.shape[2] // p)
    return self.projector(heads.pixel_shuffle(hidden, grid, cfg.downsample_ratio, cfg.ps_version))

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None,
            vision_index: jax.Array | None = None, lora_key: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, D_lm] with image-token positions filled from pixel_values ('replace' mode): in
    order, or (vision_index [B, T] int, packed batches) each image token from the flat vision token
    vision_index[b, t] of pixel_values' [num_tiles * tokens_per_tile] tokens. lora_key: the vision adapters'
    dropout (training)."""
    embeds = self.language.embed(input_ids)
    if pixel_values is None:
      return embeds
    vision = self.vision_tokens(pixel_values, lora_key)
    vision = vision.reshape(-1, vision.shape[-1]).astype(embeds.dtype)
    is_image = (input_ids == self.config.image_token_id).reshape(-1)
    if vision_index is not None:  # packed: the count may be below the tile budget's (zero tiles are never read)
      flat = jnp.where(is_image[:, None], vision[jnp.clip(vision_index.reshape(-1), 0, vision.shape[0] - 1)],
                       embeds.reshape(-1, embeds.shape[-1]))
      return flat.reshape(embeds.shape)
    try:  # a clear error when the counts are concrete; under jit a mismatch cannot be detected here
      if int(is_image.sum()) != vision.shape[0]:
        raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but pixel_values give {vision.shape[0]} "
                         "vision tokens; the prompt must have num_tiles * tokens_per_tile image tokens")
    except jax.errors.ConcretizationTypeError:
      pass
    order = jnp.clip(jnp.cumsum(is_image) - 1, 0, vision.shape[0] - 1)
    flat = jnp.where(is_image[:, None], vision[order], embeds.reshape(-1, embeds.shape[-1]))
    return flat.reshape(embeds.shape)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
               cache: dict | None = None, segment_ids: jax.Array | None = None,
               vision_index: jax.Array | None = None, lora_key: jax.Array | None = None) -> llm.DecoderOutput:
    """input_ids [B, T]; pixel_values (see class doc) or None; returns logits [B, T, vocab] float32.
    Packed rows ('replace' mode, data/packing.py): segment_ids [B, T] (attention and positions per example) and
    vision_index [B, T] (which vision token each image token takes). lora_key: LoRA dropout in training (split
    into a vision and a language stream); None: none (eval)."""
    keys = (None, None) if lora_key is None else tuple(jax.random.split(lora_key))
    if self.config.mode == "replace":
      return self.language(inputs_embeds=self.embed(input_ids, pixel_values, vision_index, keys[0]),
                           attention_mask=attention_mask, positions=positions, cache=cache, segment_ids=segment_ids,
                           lora_key=keys[1])
    if segment_ids is not None or vision_index is not None:
      raise ValueError("packed rows (segment_ids, vision_index) need the chat model's 'replace' mode")
    text = self.language.embed(input_ids)
    if pixel_values is None:  # later decode steps: the prefix already sits in the cache
      return self.language(inputs_embeds=text, attention_mask=attention_mask, positions=positions, cache=cache,
                           lora_key=keys[1])
    vision = self.vision_tokens(pixel_values, keys[0]).astype(text.dtype)
    b, nv = vision.shape[:2]
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    out = self.language(inputs_embeds=jnp.concatenate([vision, text], axis=1),
                        attention_mask=jnp.concatenate([jnp.ones((b, nv), bool), mask], axis=1), cache=cache,
                        lora_key=keys[1])
    return llm.DecoderOutput(None if out.logits is None else out.logits[:, nv:], out.last_hidden_state[:, nv:],
                             out.cache, out.aux_loss)
