"""AOT planner: how much memory per device and how many FLOPs a training step needs, before renting the chips.

  python -m internvl_jax.plan --config configs/contrastive.py:model=internvit_6b --mesh data=1,fsdp=8,tensor=1 \
      --batch_size 256 [--dtype bfloat16 --remat full] [--out plan.json] [--step_time 1.9 --chip h100] \
      [--depth_check 12] [--contrastive_scaling 1024,4096,16384]
  python -m internvl_jax.plan --config configs/instruct.py:model=internvl3_5_8b --mesh data=1,fsdp=8 \
      --batch_size 32 --dtype bfloat16 --remat full --set data.max_text_len=4096 --set data.max_tiles=7 \
      --set freeze_llm=true --set freeze_mlp=true --set freeze_backbone=true --set use_llm_lora=16   # LoRA

It builds the real train step (train/steps.py) on the real state layout (train/state.py: abstract shapes plus the
shardings of the logical-axis table), lowers it with ShapeDtypeStructs that carry those shardings (no parameter is
allocated) and compiles it for as many fake CPU devices as the mesh has. Memory figures come from XLA's compiled
memory analysis (per device), FLOPs from its cost analysis and from the analytic formulas of bench/flops.py.
Stage 3 runs under the run config's fine-tuning switches (train/freezing.py: freeze_*, use_*_lora), exactly as
train.py builds its state: optimizer state and gradients for the trainable parameters only, frozen ones as
stored; the analytic FLOPs count no weight gradients for frozen parts (instruct_flops).

The compiler is XLA:CPU: its buffer assignment and fusion differ in detail from XLA:GPU / XLA:TPU, so read the
temporaries as an estimate (typically within tens of percent); parameter, optimizer and gradient bytes are exact.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=8,tensor=1' -> {'data': 1, 'fsdp': 8, 'expert': 1, 'tensor': 1} (missing axes are 1)."""
  out = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  for part in filter(None, text.split(",")):
    k, _, v = part.partition("=")
    if k.strip() not in out or not v.strip().isdigit():
      raise SystemExit(f"--mesh: {part!r} is not axis=size with axis in data, fsdp, expert, tensor")
    out[k.strip()] = int(v)
  return out


def force_host_devices(n: int) -> None:
  """Makes the CPU backend expose n devices. Must run before JAX creates its backend (the first device query)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load_config(spec: str):
  """'configs/contrastive.py:model=internvit_6b' -> the ConfigDict of get_config(arg)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("plan_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def set_field(cfg, dotted: str, value: str) -> None:
  """--set model.vision.num_layers=12: the value is parsed as JSON when it can be (numbers, booleans)."""
  *path, last = dotted.split(".")
  target, walked = cfg, []
  for key in path + [last]:
    keys = list(target.keys()) if hasattr(target, "keys") else []
    if key not in keys:
      near = difflib.get_close_matches(key, [str(k) for k in keys], n=1)
      where = f"config.{'.'.join(walked)}" if walked else "the config"
      hint = f"; did you mean --set {'.'.join(walked + [near[0]])}=...?" if near else ""
      raise ValueError(f"--set {dotted}: {where} has no field {key!r}{hint}")
    if key != last or walked != path:
      target = target[key]
    walked.append(key)
  target = cfg
  for p in path:
    target = target[p]
  try:
    parsed = json.loads(value)
  except ValueError:
    parsed = value
  with target.unlocked() if hasattr(target, "unlocked") else _null():
    target[last] = parsed


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def towers(model_cfg):
  """The stacked towers of a model config (the ones --dtype / --remat / --depth_check act on)."""
  return [model_cfg[k] for k in ("vision", "text", "language") if k in model_cfg]


def per_device_bytes(abstract_tree, sharding_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs laid out by a matching tree of NamedShardings
  (the largest shard: shards of uneven splits are padded to it)."""
  import jax

  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)):
    total += math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
  return total


def abstract_batch(cfg, mesh):
  """ShapeDtypeStructs of one global batch of cfg.task, batch axis sharded like the trainer's batches."""
  import jax
  import jax.numpy as jnp

  from internvl_jax.train import config_checks, steps

  b, t, s = cfg.batch_size, cfg.data.max_text_len, config_checks.input_size(cfg)
  sh = steps.batch_sharding(mesh)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  batch = {"input_ids": sds((b, t), jnp.int32), "attention_mask": sds((b, t), jnp.int32)}
  if cfg.task == "instruct":
    batch["pixel_values"] = sds((b, cfg.data.get("max_tiles", 1), s, s, 3), jnp.float32)
    batch["loss_mask"] = sds((b, t), jnp.int32)
  else:
    batch["pixel_values"] = sds((b, s, s, 3), jnp.float32)
  return batch


def analytic_flops(cfg) -> float | None:
  """Model FLOPs of one training step (3 x forward, DESIGN §8) from bench/flops.py, or None for a task the
  formulas do not cover. Contrastive C/G: ViT + attention pooling + causal QLLaMA text pass + text projection."""
  from internvl_jax.bench import flops
  from internvl_jax.train import config_checks

  m, b, t, s = cfg.model, cfg.batch_size, cfg.data.max_text_len, config_checks.input_size(cfg)
  if cfg.task == "instruct" and m.get("mode") == "replace":
    return b * sum(f * x for f, x in instruct_flops(cfg).values())
  if cfg.task != "contrastive":
    return None
  if m.variant == "seed":
    per_pair = flops.contrastive_forward_flops(m.vision, s, m.text, t, m.embed_dim)
  else:
    v, d, n = m.vision, m.vision.hidden_size, flops.vit_tokens(m.vision, s)
    pool = 2.0 * (2 * n * d * d + d * d) + 4.0 * n * d + 2.0 * d * m.embed_dim  # k, v over all tokens; q; attn; out
    text = flops.decoder_sequence_flops(m.text, t, causal=True, logits_positions=0)
    per_pair = flops.vit_forward_flops(v, s) + pool + text + 2.0 * m.text.hidden_size * m.embed_dim
    if m.variant == "g":
      return None  # the query path of G is not in the formulas yet
  return 3.0 * b * per_pair


def adapter_flops_per_token(tower, kind: str) -> float:
  """Forward FLOPs per token of a tower's LoRA adapters (2 r (in + out) per adapted matmul), 0 without LoRA.
  kind 'language': q, k, v, o on every layer, gate / up / down on the dense ones; 'vision': qkv, proj, fc1, fc2."""
  from internvl_jax.models import moe

  r, d = int(tower.get("lora_rank", 0) or 0), tower.hidden_size
  if not r:
    return 0.0
  if kind == "vision":
    return 2.0 * r * tower.num_layers * ((d + 3 * d) + 2 * d + 2 * (d + tower.mlp_dim))
  hd = tower.get("head_dim") or d // tower.num_heads
  attn = (d + tower.num_heads * hd) * 2 + (d + tower.num_kv_heads * hd) * 2
  dense = tower.num_layers - len(moe.moe_layer_ids(tower))
  return 2.0 * r * (tower.num_layers * attn + dense * 3 * (d + tower.mlp_dim))


def instruct_flops(cfg) -> dict[str, tuple[float, float]]:
  """Stage 3 ('replace' mode) per example: part -> (factor, forward FLOPs), the step's FLOPs being the sum of
  factor x forward. Factors follow what JAX differentiates under the run's freezing switches (train/freezing.py):
  3 = forward + activation gradients + weight gradients (trained weights); 2 = forward + activation gradients
  only (frozen weights that gradients must flow through to reach trained ones: a LoRA base, a frozen language
  model under a trained projector); 1 = forward only (nothing trained at or before it: stop_gradient on a frozen
  tower, frozen embeddings). Partly trained vision stacks (unfreeze_vit_layers) compute weight gradients for
  every layer (masked afterwards), so they count 3. Adapters count 3 (rank-r matmuls beside their base)."""
  from internvl_jax.bench import flops
  from internvl_jax.train import config_checks, freezing

  f = freezing.resolve(cfg)
  m = freezing.model_config(cfg, cfg.model)
  t, s, tiles = cfg.data.max_text_len, config_checks.input_size(cfg), cfg.data.get("max_tiles", 1)
  v_layers = flops.chat_vision_layers(m)
  patch = tiles * flops.vit_forward_flops(m.vision, s, 0)
  blocks = tiles * flops.vit_forward_flops(m.vision, s, v_layers) - patch
  v_adapters = tiles * flops.vit_tokens(m.vision, s) * adapter_flops_per_token(m.vision, "vision") * (
      v_layers / m.vision.num_layers)
  v_trained = not f.vision_base or f.vit_layers != 0
  vision_grad = v_trained or bool(m.vision.get("lora_rank", 0))  # gradients reach into the tower
  lm = m.language
  head = 2.0 * lm.hidden_size * lm.vocab_size * t if lm.lm_head else 0.0
  body = flops.decoder_sequence_flops(lm, t, causal=True) - head
  upstream = vision_grad or not f.projector  # something trained below the language model
  lm_grad = upstream or not f.language_base or bool(lm.get("lora_rank", 0)) or not f.lm_head
  proj = 3.0 if not f.projector else (2.0 if vision_grad else 1.0)
  return {"vision_patch": (3.0 if not f.vision_base else 1.0, patch),
          "vision_blocks": (3.0 if v_trained else (2.0 if vision_grad else 1.0), blocks),
          "vision_adapters": (3.0, v_adapters),
          "projector": (proj, tiles * flops.chat_projector_flops(m, s)),
          "language_body": (3.0 if not f.language_base else (2.0 if lm_grad else 1.0), body),
          "language_adapters": (3.0, t * adapter_flops_per_token(lm, "language")),
          "lm_head": (3.0 if not f.lm_head else (2.0 if lm_grad else 1.0), head)}


def compile_step(cfg, mesh):
  """Lowers and compiles the real train step abstractly. Returns (compiled, setup, seconds)."""

  from internvl_jax.train import state as state_lib, steps

  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  step = steps.make_train_step(setup, cfg)
  start, cpu = time.perf_counter(), time.process_time()
  compiled = step.lower(setup.abstract_with_shardings(), abstract_batch(cfg, mesh)).compile()
  compile_step.last_cpu_seconds = time.process_time() - cpu  # CPU time: robust to other jobs on the machine
  return compiled, setup, time.perf_counter() - start


def memory_breakdown(compiled, setup) -> dict:
  """Per-device bytes: params (trainable + frozen, as the state stores them), frozen_params (the part of params
  with no gradient and no optimizer state: frozen towers, a LoRA base), optimizer state (over the trainable
  parameters only), gradients (one float32 copy of the trainable parameters, sharded like them: exact),
  temporaries (XLA's temp buffers minus that gradient copy: activations, rematerialised values, collective
  buffers, compute-dtype copies of the weights), total (XLA: arguments + temps + outputs not aliased to donated
  arguments; includes the batch and small outputs, so slightly above the sum of the parts)."""
  abstract, sh = setup.abstract, setup.shardings
  frozen = per_device_bytes(abstract["frozen"], sh["frozen"])
  params = per_device_bytes(abstract["params"], sh["params"]) + frozen
  optimizer = per_device_bytes(abstract["opt_state"], sh["opt_state"])
  gradients = per_device_bytes(abstract["params"], sh["params"])
  mem = compiled.memory_analysis()
  temp = int(mem.temp_size_in_bytes)
  total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp)
  return {"params": params, "frozen_params": frozen, "optimizer": optimizer, "gradients": gradients,
          "temporaries": max(temp - gradients, 0), "total": total}


def cost_flops(compiled, n_devices: int) -> float | None:
  """Global FLOPs of the step as XLA's cost analysis counts them (per-device program x devices). XLA's
  HloCostAnalysis visits a while loop's body once, whatever the trip count, so for scanned layers this counts one
  layer per tower (plus everything outside the scans): a lower bound, shown beside the analytic figure."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  f = (cost or {}).get("flops")
  return None if f is None else float(f) * n_devices


def tower_params(abstract_params, abstract_frozen) -> dict[str, int]:
  """Parameter count per top-level module (vision, text, projections, ...)."""
  import jax

  out: dict[str, int] = {}
  for tree in (abstract_params, abstract_frozen):
    for name, sub in tree.items():
      out[name] = out.get(name, 0) + sum(x.size for x in jax.tree.leaves(sub))
  return out


def contrastive_scaling(mesh, sizes, embed_dim: int) -> list[dict]:
  """Per-device temporaries of value_and_grad of the InfoNCE loss alone over [B, E] float32 embeddings sharded on
  the batch axes, plain (XLA places the [B, B] logits) vs sharded (rows per device), for each global B."""
  import jax
  import jax.numpy as jnp

  from internvl_jax import losses
  from internvl_jax.train import steps

  rows = []
  sh = steps.batch_sharding(mesh)
  for b in sizes:
    emb = jax.ShapeDtypeStruct((b, embed_dim), jnp.float32, sharding=sh)
    scale = jax.ShapeDtypeStruct((), jnp.float32)
    row = {"batch": b}
    for name, fn in (("plain", losses.contrastive_loss),
                     ("sharded", lambda i, t, s: losses.sharded_contrastive_loss(i, t, s, mesh))):
      g = jax.jit(jax.value_and_grad(lambda i, t, s, fn=fn: fn(i, t, s)[0], argnums=(0, 1, 2)))
      row[name] = int(g.lower(emb, emb, scale).compile().memory_analysis().temp_size_in_bytes)
    rows.append(row)
  return rows


def tflop(x: float | None) -> str:
  return "         n/a" if not x else f"{x / 1e12:12.4g} TFLOP"


def gib(x: float) -> str:
  return f"{x / 2**30:8.2f} GiB"


CHIPS = (("h100", "H100"), ("h200", "H200"), ("tpu v4", "TPU v4"), ("tpu v5e", "TPU v5e"), ("tpu v5p", "TPU v5p"),
         ("tpu v6e", "TPU v6e"))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m internvl_jax.plan", description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
  ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1", help="data=D,fsdp=F,expert=E,tensor=T (fake CPU "
                  "devices)")
  ap.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
  ap.add_argument("--image_size", type=int, default=None, help="input size (default: the vision preset's)")
  ap.add_argument("--dtype", default=None, help="compute dtype of every tower, e.g. bfloat16 (default: config)")
  ap.add_argument("--remat", default=None, help="remat policy of every tower: none|full|dots|... (default: config)")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any config field")
  ap.add_argument("--platform", default=None, choices=("cpu", "gpu", "tpu"),
                  help="the target: resolves the compute dtype 'auto' as it would (bfloat16 on gpu / tpu, float32 "
                       "on cpu); default: the machine the planner runs on")
  ap.add_argument("--depth_check", type=int, default=0,
                  help="also compile with the vision tower at this many layers (other towers scaled alike) and "
                       "print the compile-time ratio (scan keeps it near 1)")
  ap.add_argument("--contrastive_scaling", default="", help="global batches, e.g. 1024,4096,16384: per-device "
                  "temporaries of the contrastive loss alone, plain vs sharded")
  ap.add_argument("--step_time", type=float, default=None, help="seconds per step: prints the MFU it means")
  ap.add_argument("--chip", default="", help="highlight one chip of the MFU table (h100, h200, v4, v5e, v5p, v6e)")
  ap.add_argument("--out", default="", help="write the summary JSON here")
  args = ap.parse_args(argv)

  mesh_shape = parse_mesh(args.mesh)
  n_devices = math.prod(mesh_shape.values())
  force_host_devices(n_devices)

  import jax  # noqa: F401  (imported only now: the device count above must be set first)

  from internvl_jax import sharding
  from internvl_jax.bench import flops as flops_lib

  cfg = load_config(args.config)
  with cfg.unlocked():
    cfg.mesh.update(mesh_shape)
    if args.batch_size:
      cfg.batch_size = args.batch_size
    if args.image_size:
      cfg.model.image_size = args.image_size
    for t in towers(cfg.model):
      if args.dtype:
        t.dtype = args.dtype
      if args.remat:
        t.remat = args.remat
  for item in args.set:
    k, _, v = item.partition("=")
    set_field(cfg, k, v)
  from internvl_jax.models import layers
  for t in towers(cfg.model) + ([cfg.model.caption_decoder] if cfg.model.get("caption_decoder") else []):
    if t.get("dtype") == "auto":  # resolved here: the planner compiles on CPU for an accelerator target
      t.dtype = layers.auto_dtype(args.platform)
  if jax.device_count() != n_devices:
    raise SystemExit(f"JAX sees {jax.device_count()} devices, the mesh needs {n_devices}: run the planner as its "
                     "own process (python -m internvl_jax.plan) so it can set the fake device count first")
  mesh = sharding.make_mesh(mesh_shape)
  from internvl_jax.train import config_checks
  config_checks.validate(cfg, mesh)  # the user's mistakes (batch vs mesh, ...) as one line, before compiling

  compiled, setup, seconds = compile_step(cfg, mesh)
  big_cpu = compile_step.last_cpu_seconds
  mem = memory_breakdown(compiled, setup)
  per_tower = tower_params(setup.abstract["params"], setup.abstract["frozen"])
  n_params = sum(per_tower.values())
  n_trainable = sum(x.size for x in jax.tree.leaves(setup.abstract["params"]))
  f_cost, f_model = cost_flops(compiled, n_devices), analytic_flops(cfg)

  from internvl_jax.train import config_checks

  v = cfg.model.vision
  print(f"plan: {args.config}  task {cfg.task}  mesh {mesh_shape} ({n_devices} devices)  global batch "
        f"{cfg.batch_size}  image {config_checks.input_size(cfg)} px  text {cfg.data.max_text_len} tokens")
  print(f"      vision {v.num_layers} layers x {v.hidden_size}  dtype {v.dtype}  remat {v.remat}  "
        f"scan {v.scan_layers}  attention {v.attention_impl}")
  print("\nparameters")
  for name, count in sorted(per_tower.items(), key=lambda kv: -kv[1]):
    print(f"  {name:<20} {count:>16,}")
  print(f"  {'total':<20} {n_params:>16,}")
  print(f"  {'trainable':<20} {n_trainable:>16,}   (optimizer state and gradients exist for these only)")
  if cfg.task == "instruct":
    from internvl_jax.train import freezing

    print("\nfine-tuning switches (train/freezing.py): trainable / frozen per group")
    print("  " + freezing.parameter_table(setup.abstract["params"], setup.abstract["frozen"],
                                          setup.layer_masks).replace("\n", "\n  "))
  lm = cfg.model.get("language")
  active = None
  if lm is not None and lm.get("num_experts", 0):
    active = flops_lib.decoder_matmul_params(lm)  # router + top-k experts + attention + LM head, per token
    print(f"  {'LM active per token':<20} {active:>16,}   (matmul parameters: {lm.num_experts_per_tok} of "
          f"{lm.num_experts} experts; FLOPs per token = 2 x this forward, 6 x in training, plus attention)")
  print("\nbytes per device (XLA:CPU compiled memory analysis of the sharded step)")
  notes = {"params": "trainable + frozen parameters as stored (float32; a LoRA base in lora_base_dtype), "
                     "per-device shard (exact)",
           "frozen_params": "of which frozen (no gradient, no optimizer state; e.g. a LoRA base)",
           "optimizer": "Adam moments (+ counts) of the trainable parameters, sharded like them (exact)",
           "gradients": "one float32 copy of the trainable parameters' shards (exact; lives in XLA temps)",
           "temporaries": "XLA temp buffers minus the gradients: activations, remat values, collective buffers",
           "total": "XLA peak: arguments + temps + outputs not aliased to the donated state (includes the batch)"}
  for k in ("params", "frozen_params", "optimizer", "gradients", "temporaries", "total"):
    print(f"  {k:<13} {gib(mem[k])}   {notes[k]}")
  print("\nFLOPs per step (global)")
  print(f"  XLA cost analysis  {tflop(f_cost)}  (per-device program x devices; XLA counts a scan (while loop) "
        f"body ONCE, so with scan_layers this is far below the real count: read the analytic line)")
  print(f"  analytic (model)   {tflop(f_model)}  (3 x forward for trained parts, DESIGN §8; frozen parts 2 x "
        f"(no weight gradients) or 1 x; no remat, norms or softmax)")
  if cfg.task == "instruct" and cfg.model.get("mode") == "replace":
    for part, (factor, fwd) in instruct_flops(cfg).items():
      if fwd:
        print(f"    {part:<18} {factor:.0f} x forward {tflop(cfg.batch_size * fwd)}")
  print(f"\ncompile time {seconds:.1f} s wall ({big_cpu:.1f} s CPU)")

  result = {"params": int(n_params), "trainable_params": int(n_trainable),
            "bytes_per_device": {k: int(mem[k]) for k in mem},
            "flops_per_step": float(f_model or f_cost or 0.0), "compile_seconds": round(seconds, 2)}
  if active:
    result["lm_active_params_per_token"] = int(active)

  if args.depth_check:
    small = cfg.copy_and_resolve_references()
    ratio = args.depth_check / v.num_layers
    with small.unlocked():
      for t in towers(small.model):
        group = t.get("cross_attention_frequency", 1)
        t.num_layers = max(group, int(round(t.num_layers * ratio / group)) * group)
    _, _, small_seconds = compile_step(small, mesh)
    small_cpu = compile_step.last_cpu_seconds
    print(f"compile time at {small.model.vision.num_layers} vision layers {small_seconds:.1f} s wall, "
          f"{small_cpu:.1f} s CPU; at {v.num_layers} layers {seconds:.1f} s wall, {big_cpu:.1f} s CPU -> ratio "
          f"{seconds / small_seconds:.2f}x wall, {big_cpu / small_cpu:.2f}x CPU (scan: should stay <= 1.5x; "
          f"CPU time is the fair figure on a shared machine)")

  if args.step_time:
    model_flops = f_model or f_cost
    print(f"\nMFU at {args.step_time:.3f} s/step on {n_devices} chips (model FLOPs / time / (chips x dense bf16 "
          f"peak))")
    for key, label in CHIPS:
      peak = flops_lib.table_peak_tflops(key)
      mfu = model_flops / args.step_time / (n_devices * peak * 1e12)
      mark = "  <--" if args.chip and args.chip.lower().replace("tpu", "").strip() in key else ""
      print(f"  {label:<8} peak {peak:6.0f} TFLOP/s  MFU {100 * mfu:6.1f}%{mark}")

  if args.contrastive_scaling:
    sizes = [int(s) for s in args.contrastive_scaling.split(",") if s]
    print(f"\ncontrastive loss alone, per-device temporaries (value and gradient, embeddings [B, "
          f"{cfg.model.embed_dim}] float32 on {n_devices} devices)")
    for row in contrastive_scaling(mesh, sizes, cfg.model.embed_dim):
      print(f"  global batch {row['batch']:6d}: plain {gib(row['plain'])}  sharded {gib(row['sharded'])}")

  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
  return result


if __name__ == "__main__":
  if "--verbose" in sys.argv:
    sys.argv.remove("--verbose")
    main(sys.argv[1:])
  else:
    try:
      main(sys.argv[1:])
    except (ValueError, KeyError, FileNotFoundError) as e:  # ConfigError is a ValueError
      print(f"error: {e} (--verbose for the traceback)", file=sys.stderr)
      sys.exit(2)
