"""The benchmark tool: FLOP formulas against hand computations, case resolution, and the whole CLI (and the GPU
script's argument handling) end to end on CPU with --dry-run. Timings themselves are never asserted: numbers
come from the benchmark run, not from tests."""

import json
import os
import subprocess
import sys
import types

import pytest

from internvl_jax.bench import cases, cli, flops, report, timing
from internvl_jax.models import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE_KEYS = {"items_per_s", "tflops", "mfu", "compile_s", "peak_bytes", "peak_kind", "frac_of_matmul"}


def test_vit_flops_match_design_formula():
  # DESIGN §8: per layer 24 N D^2 + 4 N^2 D for MLP ratio 4; InternViT-300M at 448 px ~0.72 TFLOP per image.
  v = presets.vision("internvit_300m")
  n, d = 1 + 32 * 32, 1024
  hand = 24 * (24 * n * d**2 + 4 * n**2 * d) + 2 * 1024 * (14 * 14 * 3) * d  # 24 layers + patch conv
  assert flops.vit_forward_flops(v, 448) == pytest.approx(hand, rel=1e-12)
  assert flops.vit_forward_flops(v, 448) == pytest.approx(0.72e12, rel=0.01)
  # InternViT-6B at 224 px, 48 layers: ~3.1 TFLOP.
  assert flops.vit_forward_flops(presets.vision("internvit_6b"), 224) == pytest.approx(3.1e12, rel=0.02)


def test_vit_flops_generalise_to_other_mlp_widths():
  v = presets.vision("tiny")  # D 32, MLP 64 (ratio 2), 2 layers, 56 px -> 16 patches + CLS
  v.mlp_dim = 96
  n, d, m = 17, 32, 96
  hand = 2 * (8 * n * d * d + 4 * n * d * m + 4 * n * n * d) + 2 * 16 * 588 * d
  assert flops.vit_forward_flops(v, 56) == pytest.approx(hand, rel=1e-12)


def test_decoder_flops_by_hand():
  lm = presets.language("tiny")  # vocab 128, D 32, 2 layers, 4 heads of 8, 2 kv heads, MLP 64
  per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64
  assert flops.decoder_matmul_params(lm) == 2 * per_layer + 32 * 128
  # 3 new tokens after a 10-token prompt attend to 11, 12, 13 keys.
  expected = 2 * (2 * per_layer + 32 * 128) * 3 + 4 * 2 * 4 * 8 * (11 + 12 + 13)
  assert flops.decode_flops(lm, 10, 3) == pytest.approx(expected, rel=1e-12)
  # A causal 4-token prefill with logits for the last position only: keys 1 + 2 + 3 + 4.
  expected = 2 * (2 * per_layer) * 4 + 2 * 32 * 128 + 4 * 2 * 4 * 8 * 10
  assert flops.decoder_sequence_flops(lm, 4, causal=True, logits_positions=1) == pytest.approx(expected)


def test_training_cases_count_three_forwards():
  s = cases.Settings(dry_run=True)
  fb = cases.build_spec("internvit_6b_fwdbwd_224", s)
  assert fb.flops_per_call == pytest.approx(3 * fb.batch * flops.vit_forward_flops(fb.vision, fb.image_size))
  tr = cases.build_spec("internvit_300m_train_224", s)
  one = flops.contrastive_forward_flops(tr.vision, tr.image_size, tr.text, tr.text_len, tr.embed_dim)
  assert tr.flops_per_call == pytest.approx(3 * tr.batch * one)


def test_moe_cases_count_active_parameters_and_keep_the_30b_a3b_shape():
  # InternVL3.5-30B-A3B's Qwen3-MoE layer: D 2048, 32 q heads and 4 kv heads of 128, router over 128 experts,
  # top-8 SwiGLU experts of width 768. Active matmul parameters per layer, by hand:
  active = 2048 * 32 * 128 * 2 + 2048 * 4 * 128 * 2 + 2048 * 128 + 8 * 3 * 2048 * 768
  assert active == 56_885_248
  fwd = cases.build_spec("qwen3_moe_30b_a3b_fwd", cases.Settings(platform="gpu"))
  lm, t, layers = fwd.text, fwd.text_len, fwd.text.num_layers
  assert (lm.hidden_size, lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.num_experts, lm.num_experts_per_tok,
          lm.moe_mlp_dim, lm.qk_norm, lm.lm_head) == (2048, 32, 4, 128, 128, 8, 768, True, False)
  attention = 4 * layers * 32 * 128 * t * (t + 1) / 2  # causal: token i attends to i + 1 keys
  assert fwd.items_per_call == fwd.batch * t
  assert fwd.flops_per_call == pytest.approx(fwd.batch * (2 * active * layers * t + attention), rel=1e-12)
  bwd = cases.build_spec("qwen3_moe_30b_a3b_fwdbwd", cases.Settings(platform="gpu"))
  one = bwd.batch * (2 * active * bwd.text.num_layers * bwd.text_len
                     + 4 * bwd.text.num_layers * 32 * 128 * bwd.text_len * (bwd.text_len + 1) / 2)
  assert bwd.flops_per_call == pytest.approx(3 * one, rel=1e-12)
  cpu = cases.build_spec("qwen3_moe_30b_a3b_fwd", cases.Settings(platform="cpu"))
  assert cpu.text.num_experts == 16 and cpu.text.num_experts_per_tok == 8 and cpu.text.moe_mlp_dim == 768
  assert "qwen3_moe_30b_a3b_fwdbwd" not in cases.resolve_names(None, "cpu", dry_run=False)


@pytest.mark.parametrize("name", ["qwen3_moe_30b_a3b_fwd",
                                  pytest.param("qwen3_moe_30b_a3b_fwdbwd", marks=pytest.mark.slow)])
def test_moe_case_dry_run_agrees_with_transformers_before_timing(tmp_path, name):
  out = tmp_path / "bench.json"
  cli.main(["--dry-run", "--cases", name, "--out", str(out)])
  result = json.loads(out.read_text())
  _check_result(result, [name])
  c = result["cases"][0]
  assert c["unit"] == "tokens" and c["items_per_call"] == 2 * 8
  assert c["torch"]["agree_rel_err"] < 1e-4  # transformers' Qwen3MoeModel with our weights, float32


def test_peak_table_and_case_resolution():
  assert flops.table_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.table_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.table_peak_tflops("TPU v5 lite") == 197.0
  assert flops.table_peak_tflops("cpu") is None
  assert "internvit_6b_fwdbwd_224" not in cases.resolve_names(None, "cpu", dry_run=False)
  assert cases.resolve_names(None, "gpu", dry_run=False)[0] == "internvit_300m_train_448"
  assert cases.resolve_names(["chat_tiny_decode,internvit_300m_fwd_224"], "cpu", False) == [
      "chat_tiny_decode", "internvit_300m_fwd_224"]
  with pytest.raises(ValueError, match="unknown case"):
    cases.resolve_names(["nope"], "cpu", False)


def test_ratio_uses_faster_torch_variant():
  rec = report.add_ratios({"jax": {"items_per_s": 12.0}, "torch": {"items_per_s": 4.0},
                           "torch_compile": {"items_per_s": 6.0}})
  assert (rec["ratio"], rec["ratio_eager"], rec["ratio_compile"]) == (2.0, 3.0, 2.0)
  assert report.add_ratios({"jax": {"items_per_s": 1.0}, "torch": {"error": "x"}})["ratio"] is None


def test_interleaved_pairs_calls_and_takes_the_median_ratio():
  calls, t_jax, t_torch = [], iter([1.0, 2.0, 1.0]), iter([3.0, 2.0, 1.5])
  once_jax = lambda: calls.append("jax") or next(t_jax)
  once_torch = lambda: calls.append("torch") or next(t_torch)
  pair = timing.interleaved(once_jax, once_torch, rounds=3)
  assert calls == ["jax", "torch"] * 3  # alternating, so a slow moment hits both sides of a pair
  assert (pair["ratio"], pair["ratio_min"], pair["ratio_max"]) == (1.5, 1.0, 3.0)
  assert "probe" not in pair


def test_interleaved_probe_runs_once_per_round_after_the_pair():
  calls, rates = [], iter([0.1, 0.2])
  pair = timing.interleaved(lambda: calls.append("a") or 1.0, lambda: calls.append("b") or 1.0, rounds=2,
                            probe=lambda: calls.append("probe") or next(rates))
  assert calls == ["a", "b", "probe"] * 2 and pair["probe"] == [0.1, 0.2]


def test_paired_fraction_of_matmul_uses_each_rounds_own_rate(monkeypatch):
  """Round i's TFLOP/s is divided by round i's matmul rate: a slow round with a slow machine is no lower."""
  rates = iter([0.1, 0.05, 0.1])  # the machine halves its speed in round 2 ...
  times = iter([1.0, 2.0, 2.0, 4.0, 1.0, 2.0])  # ... and both sides take twice as long in that round
  monkeypatch.setattr(timing, "matmul_probe", lambda *a, **k: lambda: next(rates))
  spec = types.SimpleNamespace(flops_per_call=0.08e12)
  args = types.SimpleNamespace(dry_run=True)
  out = cli._pairs(lambda: next(times), lambda: next(times), 3, spec, args, {"platform": "cpu"})
  assert out["matmul_tflops"] == [0.1, 0.05, 0.1]
  assert out["jax_frac_of_matmul"] == pytest.approx(0.8) and out["torch_frac_of_matmul"] == pytest.approx(0.4)
  assert out["ratio"] == pytest.approx(2.0)
  assert cli._pairs(lambda: 1.0, lambda: 1.0, 1, spec, args, {"platform": "gpu"}).get("matmul_tflops") is None


def _check_result(result: dict, names: list[str]) -> None:
  assert isinstance(result["device"], str) and result["platform"] == "cpu"
  assert result["peak_tflops"] > 0 and result["matmul_tflops"] > 0
  assert [c["name"] for c in result["cases"]] == names
  for c in result["cases"]:
    assert SIDE_KEYS <= set(c["jax"]), (c["name"], c["jax"])
    assert c["jax"]["finite"], c["name"]
    assert c["jax"]["items_per_s"] > 0 and c["jax"]["compile_s"] > 0 and c["jax"]["peak_bytes"] > 0
    assert SIDE_KEYS <= set(c["torch"]), (c["name"], c["torch"])
    assert c["ratio"] == pytest.approx(c["jax"]["items_per_s"] / c["torch"]["items_per_s"])
    assert c["flops_per_call"] > 0 and c["unit"] in ("images", "tokens")
    assert c["paired"]["rounds"] == 1 and len(c["paired"]["jax_s"]) == 1 and c["paired"]["ratio"] > 0
    p = c["paired"]
    assert len(p["matmul_tflops"]) == 1 and p["jax_frac_of_matmul"] == pytest.approx(
        c["flops_per_call"] / p["jax_s"][0] / 1e12 / p["matmul_tflops"][0])


@pytest.mark.slow
def test_dry_run_every_case_end_to_end(tmp_path, capsys):
  out, md = tmp_path / "bench.json", tmp_path / "bench.md"
  result = cli.main(["--dry-run", "--out", str(out), "--markdown", str(md)])
  _check_result(json.loads(out.read_text()), list(cases.CASES))
  assert result["dry_run"] and "| internvit_300m_fwd_224 |" in md.read_text()
  assert "JAX / PT" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_script_arguments_on_cpu(tmp_path):
  # The GPU script's own options (--cases gpu --isolate --torch-compile both --deadline-s ... --out ...) with one
  # cheap case overriding the case list: parses, spawns a worker per case, writes JSON and markdown.
  env = dict(os.environ, PYTHON=sys.executable, BENCH_OUT_DIR=str(tmp_path))
  env.pop("OUT", None)
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--dry-run", "--cases",
                         "internvit_6b_fwdbwd_224"], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "bench_gpu.json").read_text())
  _check_result(result, ["internvit_6b_fwdbwd_224"])
  assert result["cases"][0]["torch_compile"] == {"skipped": "torch.compile is benchmarked on GPU only"}
  assert (tmp_path / "bench_gpu.md").exists()
