"""Models for evaluation: loading one (a train.py workdir or a local Hugging Face folder) with its tokenizer and
chat format, and the jitted functions the evaluators call (image / text embeddings for contrastive models, greedy
answers for chat models).

  m = load_workdir(DIR, task)  # latest checkpoint of DIR (or of DIR/<stage> for a multi-stage run such as the demo)
  m = load_hf(DIR)             # convert.load_pretrained + the folder's tokenizer files and conversation template
  both take dtype= (e.g. "bfloat16") and mesh= (evaluate/placement.make_mesh): weights are cast and laid out on the
  mesh as they are read, and the model runs sharded (batches split over data x fsdp x expert)
  m.embed_images(pixels [B, S, S, 3] float32) -> [B, E] float32;  m.embed_texts(list of B str) -> [B, E] float32
  m.generate(pixels [N, S, S, 3], prompts (B lists of ids), max_new_tokens) -> list of B answers
  m.probe_features(pixels) -> [B, 2D] float32;  m.vision_tokens(pixels) -> [B, 1 + N, D]  (any model's vision tower)

Released InternVL-C/G folders get their texts exactly as the published evaluation tokenises them (EOS forced,
padded / cut to 80 tokens, pooled at the EOS: tokenizer.contrastive_text_ids); released chat folders are prompted,
stopped and answered as the official chat() does (data/chat_format.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from internvl_jax import sharding
from internvl_jax.data import chat_format as chat_format_lib
from internvl_jax.data import features as features_lib
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.evaluate import linear_probe, placement
from internvl_jax.models import internvl

EMBED_TASKS = ("retrieval", "zeroshot")  # need a contrastive model
CHAT_TASKS = ("caption", "vqa")  # need a chat model
PROBE_TASKS = ("linear_probe", "attention_probe")  # need a vision tower: either kind
HF_MAX_TEXT_LEN = 80  # InternVL-C/G's published text length


@dataclasses.dataclass
class EvalModel:
  """A loaded model and what the evaluators need to feed it.

  kind: 'contrastive' | 'chat'; image_size: S of the model's square input; text_prefix: prepended to every text
  embedded ('summarize:' for InternVL-C/G); max_text_len: token length texts are padded / cut to; text_layout:
  'train' (a train.py run's caption layout) or 'released' (the published InternVL-C/G evaluation's); chat: the
  chat model's prompt / stop format; name: what was loaded (recorded in the result JSON); mesh: the jax Mesh the
  parameters are laid out on (default: found from the parameters; None = one device).
  """
  model: nnx.Module
  kind: str
  tokenizer: tokenizer_lib.Tokenizer
  image_size: int
  name: str
  text_prefix: str = ""
  max_text_len: int = 32
  text_layout: str = "train"
  chat: chat_format_lib.ChatFormat | None = None
  mesh: Any = None

  def __post_init__(self):
    graphdef, state = nnx.split(self.model)
    self._graphdef, self._state = graphdef, state
    if self.mesh is None:
      self.mesh = sharding.model_mesh(self.model)
    mesh = self.mesh

    def img(s, x):
      with placement.mesh_context(mesh):  # the models' activation constraints follow the mesh while tracing
        return nnx.merge(graphdef, s).encode_image(x)

    def txt(s, ids, mask):
      with placement.mesh_context(mesh):
        return nnx.merge(graphdef, s).encode_text(ids, mask)

    def tokens(s, x):  # the vision tower's last block, every token (class token first); no pooling, no projection
      with placement.mesh_context(mesh):
        return nnx.merge(graphdef, s).vision(x).last_hidden_state

    # One jitted program per function; the state is an argument (not a constant) so it is not baked into the HLO.
    self._img = jax.jit(img) if self.kind == "contrastive" else None
    self._txt = jax.jit(txt) if self.kind == "contrastive" else None
    self._tokens = jax.jit(tokens)
    self._probe = jax.jit(lambda s, x: linear_probe.cls_patch_concat(tokens(s, x)))

  def _sharded(self, fn, *arrays) -> np.ndarray:
    """fn(state, *arrays) with the batch padded to a multiple of data x fsdp x expert and split over them;
    [B, ...] out."""
    batch, n = placement.pad_batch(arrays, self.mesh)
    return np.asarray(fn(self._state, *placement.place_batch(batch, self.mesh)))[:n]

  def require(self, task: str) -> None:
    if task in PROBE_TASKS:  # both kinds have a vision tower
      return
    want = "contrastive" if task in EMBED_TASKS else "chat"
    if self.kind != want:
      raise ValueError(f"task {task} needs a {want} model but {self.name} is a {self.kind} model; pass a "
                       f"{'stage-1/2 (contrastive)' if want == 'contrastive' else 'stage-3 (instruct)'} checkpoint")

  # ------------------------------------------------------------------------------------------ contrastive models

  def embed_images(self, pixels: np.ndarray) -> np.ndarray:
    """pixels float32 [B, S, S, 3] (normalised) -> unit-norm float32 [B, E]."""
    return self._sharded(self._img, pixels)

  def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
    """Texts (text_prefix prepended) -> {"input_ids", "attention_mask"}: int32 [B, max_text_len], right-padded.
    Released C/G folders: the published layout (tokenizer.contrastive_text_ids); train.py runs: the training
    caption layout (features.caption_tokens), so a model is scored on the texts it trained on."""
    texts = [self.text_prefix + t for t in texts]
    if self.text_layout == "released":
      ids, mask = tokenizer_lib.contrastive_text_ids(self.tokenizer, texts, self.max_text_len)
      return {"input_ids": ids, "attention_mask": mask}
    n = self.max_text_len
    ids = np.zeros((len(texts), n), np.int32)
    mask = np.zeros((len(texts), n), np.int32)
    for i, text in enumerate(texts):
      ids[i], mask[i] = features_lib.caption_tokens(self.tokenizer, text or " ", n)
    return {"input_ids": ids, "attention_mask": mask}

  def embed_tokens(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """tokenize()'s output [B, T] -> unit-norm float32 [B, E]."""
    return self._sharded(self._txt, batch["input_ids"], batch["attention_mask"])

  def embed_texts(self, texts: list[str]) -> np.ndarray:
    return self.embed_tokens(self.tokenize(list(texts)))

  # ------------------------------------------------------------------------------------------ vision tower probes

  def probe_features(self, pixels: np.ndarray) -> np.ndarray:
    """pixels float32 [B, S, S, 3] -> float32 [B, 2D]: the last block's class token and mean patch token
    (linear_probe.cls_patch_concat, the official linear-probing feature)."""
    return self._sharded(self._probe, pixels)

  def vision_tokens(self, pixels: np.ndarray) -> np.ndarray:
    """pixels float32 [B, S, S, 3] -> the last block's tokens [B, 1 + N, D] in the model's compute dtype."""
    return self._sharded(self._tokens, pixels)

  # ------------------------------------------------------------------------------------------------- chat models

  def prompt_ids(self, question: str, num_tiles: int = 1) -> list[int]:
    """The token ids of a one-turn prompt with one image of `num_tiles` tiles, up to where the answer starts, laid
    out as the official chat() lays it out (or, for a train.py run, as its training features do)."""
    return self.chat.input_ids(question, [num_tiles])

  def generate(self, pixels: np.ndarray, prompts: list[list[int]], max_new_tokens: int,
               prompt_len: int | None = None, min_new_tokens: int = 0) -> list[str]:
    """Greedy answers. pixels float32 [N, S, S, 3]: every prompt's tiles, in prompt order; prompts: B lists of
    token ids from prompt_ids, left-padded here to prompt_len (default: the longest; pass a fixed one to compile
    once). Generation stops at the chat format's stop ids; answers are cut there and at its stop string."""
    from internvl_jax.generate import generate  # local: only chat tasks need it
    t = prompt_len or max(len(p) for p in prompts)
    pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0  # masked out either way
    ids = np.full((len(prompts), t), pad, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
      ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    (ids, mask, pixels), n = placement.pad_batch((ids, mask, pixels), self.mesh)  # rows split evenly on a mesh
    out = np.asarray(generate(self.model, ids, jnp.asarray(pixels), mask, max_new_tokens=max_new_tokens,
                              eos_token_id=list(self.chat.stop_ids), min_new_tokens=min_new_tokens))[:n, t:]
    return [self.chat.answer(row) for row in out]


# ------------------------------------------------------------------------------------------------------ loading

def _read_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def stage_dir(workdir: str, task: str) -> str:
  """The folder holding the run for `task`: workdir itself when it has a config.json, else the last of its stage
  sub-folders (train.py's multi-stage layout) whose model suits the task (contrastive / alignment for
  retrieval, zeroshot and the probes — whose vision tower they trained —, instruct for caption and vqa, and for the
  probes when there is no other)."""
  if os.path.exists(os.path.join(workdir, "config.json")):
    return workdir
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir given to train.py")
  wanted = ("contrastive", "alignment") if task in EMBED_TASKS else ("instruct",)
  stages = [d for d in sorted(os.listdir(workdir)) if os.path.exists(os.path.join(workdir, d, "config.json"))]
  if task in PROBE_TASKS:  # the stage that trained the vision tower (contrastive / alignment), else any
    wanted = ("contrastive", "alignment")
    if not any(_read_config(os.path.join(workdir, d)).task in wanted for d in stages):
      wanted = ("instruct",)
  found = [d for d in stages if _read_config(os.path.join(workdir, d)).task in wanted]
  if not found:
    raise FileNotFoundError(f"{workdir} holds no config.json of a {' or '.join(wanted)} run for task {task}; "
                            "pass a train.py workdir (or a stage folder of one)")
  return os.path.join(workdir, found[-1])


def load_workdir(workdir: str, task: str, dtype=None, mesh=None) -> EvalModel:
  """The latest checkpoint of a train.py workdir (see stage_dir), its config.json and tokenizer.json.
  dtype: parameters and compute in this dtype (default: parameters as stored, compute as trained); mesh: read the
  parameters straight into the shardings of the logical-axis rules on this mesh."""
  from internvl_jax.convert.loader import set_dtype
  from internvl_jax.train import checkpoint, config_checks, state as state_lib  # local: training-only imports
  workdir = stage_dir(os.path.abspath(workdir), task)
  cfg = _read_config(workdir)
  if dtype is not None:
    set_dtype(cfg.model, dtype)
  if not tokenizer_lib.saved_in(workdir):
    raise FileNotFoundError(f"{workdir} has no saved tokenizer; train.py writes one at the start of a run")
  tok = tokenizer_lib.load(workdir)  # its tokenizer.json (+ tokenizer_config.json)
  abstract = nnx.eval_shape(state_lib.model_factory(cfg.task, cfg.model, cfg.seed))
  graphdef, state = nnx.split(abstract)
  if mesh is not None:
    sharding.check_divisible(state, mesh)
  shardings = None if mesh is None else nnx.to_pure_dict(sharding.param_shardings(state, mesh))
  params, step = checkpoint.read_params(workdir, shardings=shardings, dtype=dtype)
  if mesh is None:  # on the device once, not copied from the host at every call
    params = jax.tree.map(jnp.asarray, params)
  try:
    nnx.replace_by_pure_dict(state, params)
  except (KeyError, ValueError) as e:
    raise ValueError(f"the checkpoint of {workdir} does not fit its config.json ({e}); was config.json edited?") \
        from None
  model = nnx.merge(graphdef, state)
  size = config_checks.input_size(cfg)
  name = f"{workdir} (step {step})"
  if cfg.task == "instruct":
    return EvalModel(model, "chat", tok, size, name, max_text_len=cfg.data.max_text_len,
                     chat=chat_format_lib.ChatFormat.from_run(cfg, tok))
  return EvalModel(model, "contrastive", tok, size, name, text_prefix=cfg.model.get("text_prefix", ""),
                   max_text_len=cfg.data.max_text_len)


def load_hf(folder: str, max_text_len: int = HF_MAX_TEXT_LEN, dtype=None, mesh=None) -> EvalModel:
  """A local Hugging Face folder as released: config.json + safetensors through convert.load_pretrained, the
  tokenizer from its tokenizer files (tokenizer.json, a sentencepiece tokenizer.model, or vocab.json + merges.txt,
  with tokenizer_config.json), and for chat models the conversation template it names or ships; in `dtype`
  (default float32) and laid out on `mesh` (default one device) as the tensors are read."""
  from internvl_jax import convert  # local: pulls in the converters
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--hf folder {folder} does not exist")
  tok = tokenizer_lib.load(folder)  # before the weights: a folder without tokenizer files fails in a second
  model = convert.load_pretrained(folder, dtype=dtype or jnp.float32, mesh=mesh)
  cfg = model.config
  if isinstance(model, internvl.InternVLContrastive):
    return EvalModel(model, "contrastive", tok, convert.configs.input_size(cfg), f"hf:{folder}",
                     text_prefix=cfg.get("text_prefix", ""), max_text_len=max_text_len, text_layout="released")
  if isinstance(model, internvl.InternVLChat):
    if tok.image_token_id != cfg.image_token_id:
      raise ValueError(f"the tokenizer of {folder} puts <IMG_CONTEXT> at id {tok.image_token_id} but the model "
                       f"expects {cfg.image_token_id}; use the tokenizer saved with this checkpoint")
    fmt = chat_format_lib.ChatFormat.from_folder(folder, cfg, tok)
    return EvalModel(model, "chat", tok, fmt.image_size, f"hf:{folder}", chat=fmt)
  raise ValueError(f"{folder} holds a {type(model).__name__}, which cannot be evaluated; eval.py needs a "
                   "contrastive (InternVL-C/G) or chat (InternVL) checkpoint")
