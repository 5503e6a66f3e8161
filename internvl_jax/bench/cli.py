"""Command line: `python -m internvl_jax.bench [--cases ...] [--out bench.json] [--dry-run] [--batch N]
[--repeats N] [--isolate] [--deadline-s S] [--torch-compile off|on|both]`.

Each case runs JAX and PyTorch in one process. With --isolate every case gets a fresh worker process (this same
module with --worker): process-lifetime memory peaks (RSS on CPU, device peaks on GPU) then belong to one case,
and memory one framework's allocator keeps cannot starve the next case. The final tables use --isolate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as platform_lib
import shlex
import subprocess
import sys
import tempfile
import time
import traceback

from internvl_jax.bench import cases, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m internvl_jax.bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", nargs="+", default=None,
                 help=f"case names or groups {sorted(cases.GROUPS)}, space or comma separated "
                      f"(default: cpu group on CPU, all elsewhere). Cases: {', '.join(cases.CASES)}")
  p.add_argument("--out", default=None, help="write the JSON results here")
  p.add_argument("--markdown", default=None, help="also write the markdown table here")
  p.add_argument("--dry-run", action="store_true", help="tiny presets, batch 2, 1 repeat, every case (a smoke test)")
  p.add_argument("--batch", type=int, default=None, help="batch of every case (default: per case and device)")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: per case; median reported)")
  p.add_argument("--warmup", type=int, default=None, help="untimed calls after compile (default 1; 0 in a dry run)")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                 help="compute dtype (default float32 on CPU, bfloat16 on accelerators)")
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn", "auto"])
  p.add_argument("--remat", default=None, help="remat policy of the training cases (see models/stack.py)")
  p.add_argument("--torch-compile", default=None, choices=["off", "on", "both"],
                 help="PyTorch variants: eager (off), torch.compile (on), or both (default: both on GPU, off on CPU)")
  p.add_argument("--no-torch", action="store_true", help="JAX only")
  p.add_argument("--paired", type=int, default=None,
                 help="after the separate timings, this many interleaved JAX / PyTorch-eager call pairs; the "
                      "median per-pair ratio is reported as 'paired' (default 5 on CPU, 0 on accelerators)")
  p.add_argument("--isolate", action="store_true", help="one worker process per case (use for final numbers)")
  p.add_argument("--deadline-s", type=float, default=None,
                 help="stop starting cases after this many seconds (the GPU script's time box); workers are "
                      "killed at the deadline and their case is recorded as timed out")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one case (or 'machine') -> --out
  p.add_argument("--machine-json", default=None, help=argparse.SUPPRESS)  # internal: the parent's machine record
  return p.parse_args(argv)


def _versions() -> dict:
  import flax
  import jax
  import jaxlib
  import optax
  out = {"python": platform_lib.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__}
  try:
    import torch
    import transformers
    out.update(torch=torch.__version__, transformers=transformers.__version__)
  except ImportError:
    pass
  return out


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform_lib.processor() or "cpu"


def measure_machine(dry_run: bool) -> dict:
  """Device description, table peak (accelerators) or measured matmul rate (CPU), thread count, versions."""
  import jax
  from internvl_jax.bench import flops, timing
  dev = jax.devices()[0]
  plat = jax.default_backend()
  threads = timing.cpu_threads()
  rate, desc = timing.matmul_tflops(plat, repeats=1 if dry_run else 5, size=256 if dry_run else None)
  if plat == "cpu":
    device, peak, source = f"CPU: {_cpu_name()}, {threads} threads", rate, "measured matmul (" + desc + ")"
  else:
    device, peak = f"{dev.device_kind} ({plat})", flops.table_peak_tflops(dev.device_kind)
    source = "dense bf16 table (flops.py)" if peak else "unknown device: no peak, MFU not reported"
  return {"device": device, "platform": plat, "device_kind": dev.device_kind, "peak_tflops": peak,
          "peak_source": source, "matmul_tflops": rate, "matmul_desc": desc, "threads": threads,
          "versions": _versions(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _settings(args, platform: str) -> cases.Settings:
  return cases.Settings(platform=platform, dry_run=args.dry_run, batch=args.batch, dtype=args.dtype,
                        attention_impl=args.attention_impl, remat=args.remat)


def _torch_variants(args, platform: str) -> list[str]:
  if args.no_torch:
    return []
  mode = args.torch_compile or ("off" if platform == "cpu" else "both")
  return {"off": ["torch"], "on": ["torch_compile"], "both": ["torch", "torch_compile"]}[mode]


def _run_jax(spec: cases.Spec, args, machine: dict) -> dict:
  import jax
  import numpy as np
  from internvl_jax.bench import jax_side, timing
  program = jax_side.build(spec)
  warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 1)
  t, out = timing.time_jax(program.fn, program.args, carry=program.carry, warmup=warmup,
                           repeats=args.repeats or spec.repeats)
  check = out[1] if program.carry else out
  leaves = [np.asarray(x) for x in jax.tree.leaves(check)]
  finite = all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
  m = report.measurement(spec.items_per_call, spec.flops_per_call, t, machine, timing.jax_peak_memory())
  m["finite"] = bool(finite)
  return m, t.once


def _run_torch(spec: cases.Spec, args, machine: dict, variant: str) -> dict:
  from internvl_jax.bench import timing, torch_side
  import torch
  compiled = variant == "torch_compile"
  if compiled and machine["platform"] == "cpu" and not torch.cuda.is_available():
    return {"skipped": "torch.compile is benchmarked on GPU only"}, None, None
  torch.set_num_threads(machine["threads"])  # the same cores XLA's CPU client uses
  torch_side.reset_memory()
  try:
    program = torch_side.build(spec, compile_model=compiled)
  except NotImplementedError as e:
    return {"skipped": str(e)}, None, None
  warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 1)
  t = timing.time_callable(program.call, program.sync, warmup=warmup, repeats=args.repeats or spec.repeats,
                           before_each=program.before_each)
  m = report.measurement(spec.items_per_call, spec.flops_per_call, t, machine, torch_side.peak_memory())
  if program.agree_rel_err is not None:
    m["agree_rel_err"] = program.agree_rel_err
  return m, t.once, program


def run_case(name: str, args, machine: dict) -> dict:
  """Both frameworks on one case; a failing side is recorded with its error and does not stop the run."""
  spec = cases.build_spec(name, _settings(args, machine["platform"]))
  rec = {"name": name, "kind": spec.kind, "unit": spec.unit, "batch": spec.batch, "image_size": spec.image_size,
         "dtype": spec.main_config.dtype, "remat": spec.main_config.remat, "items_per_call": spec.items_per_call,
         "flops_per_call": spec.flops_per_call, "jax": None, "torch": None, "torch_compile": None}
  if spec.gpu_only and machine["platform"] == "cpu" and not args.dry_run and not _named(args, name):
    rec["skipped"] = "GPU-only case"
    return report.add_ratios(rec)
  # On GPU PyTorch goes first and empties its cache before JAX allocates; on CPU JAX goes first so that its RSS
  # peak is its own (getrusage is a process-lifetime maximum).
  sides = _torch_variants(args, machine["platform"])
  order = sides + ["jax"] if machine["platform"] != "cpu" else ["jax"] + sides
  rounds = _paired_rounds(args, machine, spec)
  once = {}
  for side in order:
    try:
      if side == "jax":
        rec[side], once[side] = _run_jax(spec, args, machine)
      else:
        rec[side], once[side], program = _run_torch(spec, args, machine, side)
        if side != "torch" or not rounds:  # keep eager PyTorch alive to pair
          del program
          once.pop(side, None)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on one side; keep the other side's numbers
      rec[side] = {"error": f"{type(e).__name__}: {e}".strip()[:2000], "trace": traceback.format_exc()[-2000:]}
    print(f"[bench] {name} {side}: {_short(rec[side])}", file=sys.stderr, flush=True)
  if rounds and once.get("jax") and once.get("torch"):
    rec["paired"] = _pairs(once["jax"], once["torch"], rounds, spec, args, machine)
    print(f"[bench] {name} paired JAX / PT eager over {rounds} interleaved rounds: {_short_pair(rec['paired'])}",
          file=sys.stderr, flush=True)
  once.clear()
  if "torch" in sides:
    from internvl_jax.bench import torch_side
    torch_side.reset_memory()
  return report.add_ratios(rec)


def _pairs(once_jax, once_torch, rounds: int, spec: cases.Spec, args, machine: dict) -> dict:
  """Interleaved JAX / PyTorch-eager rounds; on CPU each round also measures the matmul rate, and the fraction of
  it each side reached is the median over rounds of (case TFLOP/s) / (that round's matmul TFLOP/s)."""
  import statistics
  from internvl_jax.bench import timing
  probe = None
  if machine["platform"] == "cpu":
    probe = timing.matmul_probe("cpu", calls=1 if args.dry_run else 3, size=256 if args.dry_run else None)
  pair = timing.interleaved(once_jax, once_torch, rounds, probe=probe)
  out = {"rounds": rounds, "ratio": pair["ratio"], "ratio_min": pair["ratio_min"], "ratio_max": pair["ratio_max"],
         "jax_s": pair["a_s"], "torch_s": pair["b_s"]}
  if probe is not None:
    tflops = lambda t: spec.flops_per_call / t / 1e12
    out["matmul_tflops"] = pair["probe"]
    out["jax_frac_of_matmul"] = statistics.median(tflops(t) / r for t, r in zip(pair["a_s"], pair["probe"]))
    out["torch_frac_of_matmul"] = statistics.median(tflops(t) / r for t, r in zip(pair["b_s"], pair["probe"]))
  return out


def _short_pair(p: dict) -> str:
  s = f"{p['ratio']:.3f} (min {p['ratio_min']:.3f}, max {p['ratio_max']:.3f})"
  if "jax_frac_of_matmul" in p:
    s += (f"; fraction of the same rounds' matmul rate: JAX {p['jax_frac_of_matmul']:.1%}, "
          f"PT {p['torch_frac_of_matmul']:.1%}")
  return s


def _paired_rounds(args, machine: dict, spec: cases.Spec) -> int:
  """Interleaved JAX/PyTorch rounds after the separate timings: default 5 on CPU (a shared machine), 0 on
  accelerators (both programs would have to fit in device memory at once); 1 in a dry run. Never for training
  cases outside a dry run: two optimiser states and two sets of activations at once do not fit (the 300M train
  step pair was killed for memory on a 24 GB machine)."""
  if spec.kind in ("vit_train", "vit_fwdbwd") and not args.dry_run:
    return 0
  if args.paired is not None:
    return args.paired
  if args.dry_run:
    return 1
  return 5 if machine["platform"] == "cpu" else 0


def _named(args, name: str) -> bool:
  return any(name in item.split(",") for item in (args.cases or []))


def _short(side: dict) -> str:
  if "items_per_s" in side:
    return f"{side['items_per_s']:.3f} items/s, {side['tflops']:.4f} TFLOP/s, compile {side['compile_s']:.1f} s"
  return str(side.get("error") or side.get("skipped"))[:200]


def _worker_cmd(args, target: str, out: str, machine: dict | None) -> list[str]:
  """This module re-invoked as a worker for one target, with the run's options."""
  cmd = [sys.executable, "-m", "internvl_jax.bench", "--worker", target, "--out", out]
  if machine is not None:
    cmd += ["--machine-json", json.dumps(machine)]
  for flag in ("batch", "repeats", "warmup", "dtype", "attention_impl", "remat", "torch_compile", "paired"):
    value = getattr(args, flag)
    if value is not None:
      cmd += [f"--{flag.replace('_', '-')}", str(value)]
  cmd += [f for f, on in (("--dry-run", args.dry_run), ("--no-torch", args.no_torch)) if on]
  if args.cases:
    cmd += ["--cases"] + args.cases
  return cmd


def _in_worker(args, target: str, timeout: float | None, machine: dict | None = None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "worker.json")
    try:
      # Worker progress goes to our stderr (stdout is for the table); inherit when stderr is not a real file.
      try:
        sink = sys.stderr.fileno()
      except (AttributeError, OSError, ValueError):
        sink = None
      proc = subprocess.run(_worker_cmd(args, target, out, machine), timeout=timeout, stdout=sink)
    except subprocess.TimeoutExpired:
      return {"error": f"worker timed out after {timeout:.0f} s (deadline)"}
    if proc.returncode != 0 or not os.path.exists(out):
      return {"error": f"worker exited with status {proc.returncode}"}
    with open(out) as f:
      return json.load(f)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  if args.worker:  # one target in this process; the parent merges
    if args.worker == "machine":
      result = measure_machine(args.dry_run)
    else:
      # The parent's machine record: every case's MFU is against the one matmul rate printed in the header.
      machine = json.loads(args.machine_json) if args.machine_json else measure_machine(args.dry_run)
      result = run_case(args.worker, args, machine)
    report.write_json(args.out, result)
    return result

  machine = _in_worker(args, "machine", None) if args.isolate else measure_machine(args.dry_run)
  if "error" in machine:
    raise SystemExit(f"could not measure the machine: {machine['error']}")
  names = cases.resolve_names(args.cases, machine["platform"], args.dry_run)
  argv_shown = sys.argv[1:] if argv is None else argv
  result = dict(machine, command="python -m internvl_jax.bench " + shlex.join(argv_shown), dry_run=args.dry_run,
                cases=[])
  for name in names:
    left = None if args.deadline_s is None else args.deadline_s - (time.perf_counter() - start)
    if left is not None and left <= 0:
      rec = {"name": name, "skipped": f"deadline of {args.deadline_s:.0f} s reached"}
    elif args.isolate:
      rec = _in_worker(args, name, left, machine)
      rec.setdefault("name", name)
    else:
      rec = run_case(name, args, machine)
    result["cases"].append(report.add_ratios(rec) if "jax" in rec else rec)
    if args.out:
      report.write_json(args.out, result)
  table = report.markdown(result)
  print(table)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  return result

