"""Benchmarks: JAX vs PyTorch `transformers` throughput, MFU, memory and compile time per case.

Run `python -m internvl_jax.bench --help`. One concern per file: cases.py (what runs, at which shapes),
flops.py (analytic FLOPs and device peaks), timing.py (timing and memory), jax_side.py / torch_side.py (the two
programs of each case), train_step.py (a local contrastive step), report.py (JSON and markdown), cli.py.
"""
