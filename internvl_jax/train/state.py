"""The train state and its sharded creation.

The state is a plain pytree (so jit, donation and Orbax see only arrays):
  step        int32 []   data steps taken (one batch each; an optimizer update every grad_accum_steps)
  params      dict       trainable parameters (float32), as nnx pure dicts
  frozen      dict       every other model variable (e.g. a frozen vision tower): no gradient, no optimizer state;
                         float32, or a LoRA run's config.lora_base_dtype (freezing.frozen_dtype)
  opt_state   optax state over `params` only
  bad_steps   int32 []   consecutive steps skipped for a non-finite loss or gradient
  skipped     int32 []   all steps skipped so far
The model's structure (nnx GraphDef) stays outside; a step rebuilds the module with nnx.merge.

Creation never materialises an unsharded copy: shapes come from nnx.eval_shape, shardings from the logical-axis
table (sharding.py), and the init runs under jit with those out_shardings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internvl_jax import sharding
from internvl_jax.models import captioning, internvl
from internvl_jax.train import freezing, optimizer as optimizer_lib

TASKS = ("contrastive", "alignment", "instruct")


def model_factory(task: str, model_cfg: ml_collections.ConfigDict, seed: int) -> Callable[[], nnx.Module]:
  """A zero-argument constructor of the stage's model (so it can run under eval_shape and jit)."""
  cls = {"contrastive": internvl.InternVLContrastive, "alignment": captioning.CaptioningContrastive,
         "instruct": internvl.InternVLChat}.get(task)
  if cls is None:
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
  return lambda: cls(model_cfg, rngs=nnx.Rngs(seed))


# SigLIP's initialisation of the sigmoid loss's parameters: t' = log 10 (t = exp(t') = 10) and b = -10
SIGMOID_LOGIT_SCALE_INIT, SIGMOID_LOGIT_BIAS_INIT = math.log(10.0), -10.0


def run_model_config(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model config as the run builds it (a copy): the freezing, LoRA and lock fields (freezing.model_config)
  and, for an image-text stage with config.loss='sigmoid', the logit bias parameter (model.logit_bias_init = -10,
  model.logit_scale_init = log 10, SigLIP's) unless the model config already sets logit_bias_init. Idempotent."""
  out = freezing.model_config(cfg, model_cfg)
  if cfg.task in freezing.IMAGE_TEXT_TASKS and cfg.get("loss", "softmax") == "sigmoid" and \
     out.get("logit_bias_init", None) is None:
    out.logit_scale_init, out.logit_bias_init = SIGMOID_LOGIT_SCALE_INIT, SIGMOID_LOGIT_BIAS_INIT
  return out


def prepare(cfg: ml_collections.ConfigDict) -> None:
  """Pins cfg.model to the model the run builds (run_model_config; stage 3 also resolves freeze_backbone,
  freezing.prepare), so that config.json records it and eval.py rebuilds the same model. Idempotent."""
  if cfg.task == "instruct":
    freezing.prepare(cfg)
  else:
    with cfg.unlocked():
      cfg.model = run_model_config(cfg, cfg.model)


def trainable_filter(model: nnx.Module, cfg: ml_collections.ConfigDict | None = None):
  """Stage 3 (cfg given, task 'instruct') or an image-text stage with a locked tower (config.lock_vision /
  lock_text): freezing.trainable_filter; otherwise the stage model's own rule (InternVLChat freezes its vision
  tower by config) or every Param."""
  if cfg is not None and (cfg.task == "instruct" or freezing.any_lock(cfg)):
    return freezing.trainable_filter(cfg)
  return model.trainable_filter() if hasattr(model, "trainable_filter") else nnx.Param


@dataclasses.dataclass
class StateSetup:
  graphdef: Any  # nnx GraphDef of the model
  abstract: Any  # the state's shapes (jax.ShapeDtypeStruct tree)
  shardings: Any  # NamedSharding tree matching the state
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Callable[[], dict]  # jit-able: builds a fresh state
  mesh: Mesh
  layer_masks: dict = dataclasses.field(default_factory=dict)  # freezing.layer_masks: partly trained leaves

  def create(self) -> dict:
    """A freshly initialised state, created directly in its shardings."""
    return jax.jit(self.init_fn, out_shardings=self.shardings)()

  def abstract_with_shardings(self):
    """ShapeDtypeStructs carrying shardings: the restore target of a checkpoint (any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                        self.shardings)


def _split(model: nnx.Module, cfg: ml_collections.ConfigDict | None = None):
  graphdef, params, frozen = nnx.split(model, trainable_filter(model, cfg), ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def optimizer_state_shardings(opt_state_abstract, params_abstract, params_shardings, mesh: Mesh):
  """Every optimizer-state subtree shaped like the parameters (Adam moments, accumulated gradients) takes the
  parameters' shardings; scalars (counts) are replicated."""
  treedef = jax.tree.structure(params_abstract)
  replicated = NamedSharding(mesh, P())

  def is_param_like(x):
    try:
      return jax.tree.structure(x) == treedef
    except Exception:  # noqa: BLE001 - exotic nodes are not parameter-shaped
      return False

  return jax.tree.map(lambda x: params_shardings if is_param_like(x) else replicated, opt_state_abstract,
                      is_leaf=is_param_like)


def setup_state(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, mesh: Mesh) -> StateSetup:
  """Shapes, shardings, optimizer and init function for cfg.task with model_cfg on mesh. The run's freezing,
  LoRA and lock switches (freezing.py) and its loss (run_model_config) shape the model config and the trainable /
  frozen split."""
  model_cfg = run_model_config(cfg, model_cfg)
  make_model = model_factory(cfg.task, model_cfg, cfg.seed)
  abstract_model = nnx.eval_shape(make_model)
  graphdef, params_state, frozen_state = nnx.split(abstract_model, trainable_filter(abstract_model, cfg), ...)
  abs_params = nnx.to_pure_dict(params_state)
  params_sh = nnx.to_pure_dict(sharding.param_shardings(params_state, mesh))
  frozen_sh = nnx.to_pure_dict(sharding.param_shardings(frozen_state, mesh))
  masks = freezing.layer_masks(cfg, abs_params)
  tx, schedule = optimizer_lib.make_optimizer(cfg, abs_params, layer_masks=masks)

  base_dtype = freezing.frozen_dtype(cfg)  # a LoRA base held in bfloat16 (config.lora_base_dtype)

  def init_fn():
    _, params, frozen = _split(make_model(), cfg)
    frozen = freezing.cast_frozen(frozen, base_dtype)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt_state": tx.init(params),
            "bad_steps": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init_fn)
  replicated = NamedSharding(mesh, P())
  shardings = {"step": replicated, "params": params_sh, "frozen": frozen_sh,
               "opt_state": optimizer_state_shardings(abstract["opt_state"], abstract["params"], params_sh, mesh),
               "bad_steps": replicated, "skipped": replicated}
  return StateSetup(graphdef, abstract, shardings, tx, schedule, init_fn, mesh, masks)


def merge_model(graphdef, state: dict) -> nnx.Module:
  """The live module from a state (inside or outside jit)."""
  return nnx.merge(graphdef, state["params"], state["frozen"])


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
