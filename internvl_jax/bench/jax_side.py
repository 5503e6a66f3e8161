"""The JAX program of each case: build the model, the inputs and one jitted function to time.

Inputs are random (speed does not depend on values); the models are the package's own (internvl_jax.models).
Inference cases hold their parameters in the compute dtype, as a deployment would (and as PyTorch's
`model.to(bfloat16)` does); training cases keep float32 master parameters and compute in `dtype` (DESIGN §3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.bench import cases, train_step
from internvl_jax.models import internvl, layers, llm, vit


@dataclasses.dataclass
class Program:
  """What timing.time_jax needs: fn(*args); with carry=True fn returns (new args[0], aux)."""
  fn: Callable
  args: tuple
  carry: bool = False


def build_module(make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
  """Initialises a module eagerly. (Tried: init under nnx.jit. It compiles a fresh program per model, ~20 s on a
  busy 2-core CPU even for the tiny presets, while eager init reuses per-op caches: 0.3 s after the first.)"""
  return make(nnx.Rngs(0))


def cast_floats(state: Any, dtype) -> Any:
  """Floating-point leaves of a state cast to `dtype` (inference weights in the compute dtype)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def images(spec: cases.Spec, seed: int = 0) -> np.ndarray:
  """[B, H, W, 3] float32 normalised-looking pixels (NHWC, the package's layout)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((spec.batch, spec.image_size, spec.image_size, 3), dtype=np.float32)


def text_ids(spec: cases.Spec, vocab: int, length: int, seed: int = 1) -> np.ndarray:
  """[B, length] int32 token ids that avoid the last two ids (image-context id of the tiny chat preset)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab - 2, (spec.batch, length), dtype=np.int32)


def chat_prompt(spec: cases.Spec) -> np.ndarray:
  """[B, prompt_len] ids: 4 text tokens, one tile of image-context tokens, the remaining text tokens."""
  chat = spec.chat
  n_img = spec.prompt_len - spec.text_len
  text = text_ids(spec, chat.language.vocab_size, spec.text_len)
  img = np.full((spec.batch, n_img), chat.image_token_id, np.int32)
  return np.concatenate([text[:, :4], img, text[:, 4:]], axis=1)


def build(spec: cases.Spec) -> Program:
  """The JAX program of a case."""
  return {"vit_fwd": _vit_fwd, "vit_train": _vit_train, "vit_fwdbwd": _vit_fwdbwd,
          "chat_prefill": _chat_prefill, "chat_decode": _chat_decode, "moe_fwd": _moe_fwd,
          "moe_fwdbwd": _moe_fwdbwd}[spec.kind](spec)


def _vit_fwd(spec: cases.Spec) -> Program:
  model = build_module(lambda r: vit.InternViT(spec.vision, rngs=r))
  graphdef, state = nnx.split(model)
  state = cast_floats(state, layers.to_dtype(spec.vision.dtype))

  @jax.jit
  def forward(state, pixel_values):
    return nnx.merge(graphdef, state)(pixel_values).last_hidden_state

  return Program(forward, (state, jnp.asarray(images(spec))))


def _vit_fwdbwd(spec: cases.Spec) -> Program:
  model = build_module(lambda r: vit.InternViT(spec.vision, rngs=r))
  fn, state = train_step.make_fwdbwd(model)
  return Program(fn, (state, jnp.asarray(images(spec))))


def contrastive_config(spec: cases.Spec):
  """The seed-style contrastive model with this case's ViT and text tower (InternViT-300M + BERT-base-sized)."""
  from internvl_jax.models import presets  # local: only the train case needs it
  cfg = presets.contrastive("tiny" if spec.vision.hidden_size < 64 else "seed_300m")
  cfg.vision, cfg.text, cfg.embed_dim = spec.vision, spec.text, spec.embed_dim
  return cfg


def _vit_train(spec: cases.Spec) -> Program:
  cfg = contrastive_config(spec)
  model = build_module(lambda r: internvl.InternVLContrastive(cfg, rngs=r))
  step, state = train_step.make_contrastive_step(model, train_step.optimizer())
  ids = jnp.asarray(text_ids(spec, spec.text.vocab_size, spec.text_len))
  mask = jnp.ones(ids.shape, jnp.int32)
  return Program(step, (state, jnp.asarray(images(spec)), ids, mask), carry=True)


def _chat_model(spec: cases.Spec):
  model = build_module(lambda r: internvl.InternVLChat(spec.chat, rngs=r))
  graphdef, state = nnx.split(model)
  return graphdef, cast_floats(state, layers.to_dtype(spec.chat.language.dtype))


def _prefill_fn(graphdef, spec: cases.Spec, max_len: int):
  """state, ids, pixels -> (cache, next token): vision tower, projector, decoder over the whole prompt with a
  fresh cache, logits for the last position only (as generation needs)."""

  def prefill(state, input_ids, pixel_values):
    m = nnx.merge(graphdef, state)
    cache = m.language.init_cache(input_ids.shape[0], max_len)
    out = m.language(inputs_embeds=m.embed(input_ids, pixel_values), cache=cache, return_logits=False)
    logits = m.language.logits(out.last_hidden_state[:, -1:])
    return out.cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  return prefill


def _chat_prefill(spec: cases.Spec) -> Program:
  graphdef, state = _chat_model(spec)
  fn = jax.jit(_prefill_fn(graphdef, spec, spec.prompt_len))
  return Program(fn, (state, jnp.asarray(chat_prompt(spec)), jnp.asarray(images(spec))))


def _chat_decode(spec: cases.Spec) -> Program:
  """Greedy decoding of `new_tokens` tokens in one jitted scan after an untimed prefill: what a generate loop
  runs per token, without Python dispatch per step."""
  graphdef, state = _chat_model(spec)
  max_len = spec.prompt_len + spec.new_tokens
  prefill = jax.jit(_prefill_fn(graphdef, spec, max_len))
  cache, first = prefill(state, jnp.asarray(chat_prompt(spec)), jnp.asarray(images(spec)))

  @jax.jit
  def decode(state, cache, token):
    m = nnx.merge(graphdef, state)

    def body(carry, _):
      cache, tok = carry
      out = m.language(tok[:, None], cache=cache)
      nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
      return (out.cache, nxt), nxt

    _, tokens = jax.lax.scan(body, (cache, token), None, length=spec.new_tokens)
    return tokens.T  # [B, new_tokens]

  return Program(decode, (state, jax.block_until_ready(cache), first))


def moe_decoder(spec: cases.Spec) -> nnx.Module:
  """The moe_* cases' decoder stack, float32, with the same weights every time it is built (torch_side copies
  them into transformers' model)."""
  return build_module(lambda r: llm.Decoder(spec.text, rngs=r))


def moe_inputs(spec: cases.Spec, seed: int = 3) -> np.ndarray:
  """[B, T, D] float32 input embeddings of the moe_* cases (unit-variance, like a normalised residual stream)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((spec.batch, spec.text_len, spec.text.hidden_size), dtype=np.float32)


def moe_forward(graphdef):
  """state, embeddings [B, T, D] -> final hidden states [B, T, D] (causal, no LM head)."""
  return lambda state, x: nnx.merge(graphdef, state)(inputs_embeds=x, return_logits=False).last_hidden_state


def _moe_fwd(spec: cases.Spec) -> Program:
  graphdef, state = nnx.split(moe_decoder(spec))
  state = cast_floats(state, layers.to_dtype(spec.text.dtype))
  return Program(jax.jit(moe_forward(graphdef)), (state, jnp.asarray(moe_inputs(spec))))


def _moe_fwdbwd(spec: cases.Spec) -> Program:
  """Forward + backward (float32 parameters, compute in the case dtype), loss = mean square of the output plus
  the router load-balancing loss, as training would add it."""
  graphdef, params, rest = nnx.split(moe_decoder(spec), nnx.Param, ...)
  coef = float(spec.text.get("router_aux_loss_coef", 0.0))

  def loss_fn(p, r, x):
    out = nnx.merge(graphdef, p, r)(inputs_embeds=x, return_logits=False)
    return jnp.mean(jnp.square(out.last_hidden_state.astype(jnp.float32))) + coef * out.aux_loss

  @jax.jit
  def fwdbwd(state, x):
    loss, grads = jax.value_and_grad(loss_fn)(*state, x)
    return grads, loss

  return Program(fwdbwd, ((params, rest), jnp.asarray(moe_inputs(spec))))
