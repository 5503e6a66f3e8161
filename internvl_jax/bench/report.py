"""Turning timings into the result records of the JSON file, and the records into a markdown table.

JSON (`--out`), one file per run:
  {"device": str, "platform": str, "peak_tflops": x, "peak_source": str, "matmul_tflops": x, "matmul_desc": str,
   "threads": n, "versions": {...}, "command": str, "dry_run": bool,
   "cases": [{"name": str, "unit": "images" | "tokens", "batch": n, "flops_per_call": x, ...,
              "jax": M, "torch": M, "torch_compile": M, "ratio": x, "ratio_eager": x, "ratio_compile": x}]}
  M = {"items_per_s", "tflops", "mfu", "frac_of_matmul", "compile_s", "peak_bytes", "peak_kind", "step_s",
       "step_s_all"} or {"error": str} or {"skipped": str}; absent sides are null.
  ratio = JAX items/s over the faster PyTorch variant that ran (eager or compiled); the per-variant ratios are
  kept beside it. "paired" (CPU default): {"rounds", "ratio", "ratio_min", "ratio_max", "jax_s", "torch_s"},
  JAX / PyTorch-eager speed from interleaved call pairs (timing.interleaved), the figure to quote on a shared
  machine. On CPU "paired" also has "matmul_tflops" (the matmul rate measured in each round) and
  "jax_frac_of_matmul" / "torch_frac_of_matmul" (median over rounds of the side's TFLOP/s over that round's
  rate): the fraction of what the machine could do in the same seconds.
"""

from __future__ import annotations

import json
import os
from typing import Any

from internvl_jax.bench import timing as timing_lib


def measurement(items_per_call: int, flops_per_call: float, t: timing_lib.Timing, machine: dict,
                peak: tuple[int | None, str]) -> dict:
  """A side's result: throughput, achieved TFLOP/s, MFU against the device peak and the fraction of this
  machine's measured matmul rate (the same number on CPU, where the measured rate is the peak)."""
  s = t.median_s
  tflops = flops_per_call / s / 1e12
  peak_tflops, matmul = machine.get("peak_tflops"), machine.get("matmul_tflops")
  return {"items_per_s": items_per_call / s, "tflops": tflops,
          "mfu": tflops / peak_tflops if peak_tflops else None,
          "frac_of_matmul": tflops / matmul if matmul else None,
          "compile_s": t.compile_s, "peak_bytes": peak[0], "peak_kind": peak[1], "step_s": s,
          "step_s_all": list(t.times_s)}


def _rate(side: Any) -> float | None:
  return side.get("items_per_s") if isinstance(side, dict) else None


def add_ratios(rec: dict) -> dict:
  """ratio_eager, ratio_compile and ratio (against the faster PyTorch variant) when the sides ran."""
  jax_rate = _rate(rec.get("jax"))
  eager, compiled = _rate(rec.get("torch")), _rate(rec.get("torch_compile"))
  rec["ratio_eager"] = jax_rate / eager if (jax_rate and eager) else None
  rec["ratio_compile"] = jax_rate / compiled if (jax_rate and compiled) else None
  best = max([r for r in (eager, compiled) if r], default=None)
  rec["ratio"] = jax_rate / best if (jax_rate and best) else None
  return rec


def write_json(path: str, result: dict) -> None:
  """Writes atomically (a run killed at its deadline still leaves the last complete file)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def _fmt(x: float | None, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _bytes(b: int | None) -> str:
  return "-" if b is None else f"{b / 2**30:.2f}"


def _side_cells(side: Any) -> list[str]:
  if not isinstance(side, dict):
    return ["-"] * 4
  if "items_per_s" not in side:
    why = side.get("error") or side.get("skipped") or "?"
    return [("error: " if "error" in side else "skipped: ") + why.splitlines()[0][:60]] + ["-"] * 3
  return [_fmt(side["items_per_s"], ".4g"), _fmt(side["tflops"], ".3g"), _fmt(side["mfu"], ".1%"),
          _fmt(side["compile_s"], ".1f")]


def _paired(rec: dict) -> str:
  p = rec.get("paired")
  if not isinstance(p, dict):
    return "-"
  return f"{p['ratio']:.2f} ({p['ratio_min']:.2f}-{p['ratio_max']:.2f}, n={p['rounds']})"


def _paired_fraction(rec: dict) -> str:
  p = rec.get("paired")
  if not isinstance(p, dict) or p.get("jax_frac_of_matmul") is None:
    return "-"
  return f"{p['jax_frac_of_matmul']:.1%} / {p['torch_frac_of_matmul']:.1%}"


def markdown(result: dict) -> str:
  """The human-readable table: machine line, then one row per case."""
  lines = [f"Device: {result['device']} | peak {_fmt(result.get('peak_tflops'), '.3f')} TFLOP/s "
           f"({result.get('peak_source')}) | measured matmul {_fmt(result.get('matmul_tflops'), '.3f')} TFLOP/s "
           f"({result.get('matmul_desc')}) | threads {result.get('threads')}",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items()),
           f"Command: `{result.get('command')}`" + (" (DRY RUN: tiny shapes, numbers meaningless)"
                                                    if result.get("dry_run") else ""),
           "",
           "| case | unit | batch | JAX items/s | JAX TFLOP/s | JAX MFU | JAX compile s | JAX peak GiB "
           "| PT eager items/s | PT eager TFLOP/s | PT eager MFU | PT first call s | PT compile items/s "
           "| JAX / PT | JAX / PT eager | JAX / PT compile | JAX / PT eager, interleaved pairs "
           "| JAX / PT frac. of same-round matmul |",
           "|" + "---|" * 18]
  for rec in result["cases"]:
    jax_side = rec.get("jax")
    peak = _bytes(jax_side.get("peak_bytes")) if isinstance(jax_side, dict) else "-"
    torch_c = rec.get("torch_compile")
    compiled = _side_cells(torch_c)[0] if isinstance(torch_c, dict) else "-"
    row = ([rec["name"], rec.get("unit", "-"), str(rec.get("batch", "-"))] + _side_cells(jax_side) + [peak]
           + _side_cells(rec.get("torch")) + [compiled]
           + [_fmt(rec.get(k), ".2f") for k in ("ratio", "ratio_eager", "ratio_compile")]
           + [_paired(rec), _paired_fraction(rec)])
    if "skipped" in rec or "error" in rec:
      row[3] = ("skipped: " + rec["skipped"]) if "skipped" in rec else ("error: " + rec["error"].splitlines()[0])
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines.append("MFU: achieved model TFLOP/s (internvl_jax/bench/flops.py) over the peak above; peak memory: "
               + "; ".join(sorted({str(s.get('peak_kind')) for r in result['cases'] for s in (r.get('jax'),
                                   r.get('torch')) if isinstance(s, dict) and s.get('peak_kind')})))
  return "\n".join(lines)
