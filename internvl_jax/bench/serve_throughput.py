"""Throughput of `python -m internvl_jax.serve` at 1, 4 and 16 concurrent clients.

  python -m internvl_jax.bench.serve_throughput --hf FOLDER | --tiny [--concurrency 1,4,16] [--requests 32]
      [--max_tokens 64] [--max_batch 16] [--context 1024] [--image] [--dtype bfloat16] [--quantize int8]

The server runs for real (`python -m internvl_jax.serve` as a child process on a free local port), and
`c` client threads each send requests one after another over HTTP (streamed, so the first token's arrival is seen)
until `--requests` have been answered. Each request has its own text prompt (and with --image a random 80 x 60 PNG);
every prompt bucket is compiled before timing. Reported per concurrency: requests/s and generated tokens/s over
the wall time, mean latency (request sent -> [DONE]) and mean time to first token (request sent -> the first chunk
with text; a chunk can hold back a partial character or stop string, so this is an upper bound).

--tiny builds a random tiny chat model (models/presets.py 'tiny': 2-layer InternViT and decoder of width 32) with a
word-level tokenizer and the 'plain' template, writes it as a transformers-native release folder
(convert/release.write_release) and serves that folder, so the whole loading path runs. Its numbers measure the
server's overhead (HTTP, scheduling, one decode step per token), not a model's arithmetic.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

WORDS = "the a red blue cat dog sees runs on under near big small house tree sky water and".split()


def tiny_folder(out: str) -> str:
  """A random tiny chat model written as a release folder (see the module docstring)."""
  from flax import nnx

  from internvl_jax.convert import release
  from internvl_jax.data import chat_format, tokenizer
  from internvl_jax.models import internvl, presets
  rng = np.random.default_rng(0)
  tok = tokenizer.build_word_level([" ".join(rng.choice(WORDS, 12)) for _ in range(50)])
  cfg = presets.chat("tiny")
  cfg.language.vocab_size, cfg.image_token_id = tok.vocab_size, tok.image_token_id
  model = internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))
  fmt = chat_format.ChatFormat(tok, cfg.vision.image_size, chat_format.tokens_per_tile(
      cfg.vision.image_size, cfg.vision.patch_size, cfg.downsample_ratio), template="plain", max_num=4)
  release.write_release(model, out, tokenizer=tok, chat=fmt, layout="native")
  return out


def _image_url(seed: int) -> str:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), np.uint8)).save(buf, "PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(k: int, max_tokens: int, image: bool) -> dict:
  text = f"Question {k}: " + " ".join(WORDS[(k + i) % len(WORDS)] for i in range(3 + k % 5))
  content = text if not image else [{"type": "image_url", "image_url": {"url": _image_url(k)}},
                                    {"type": "text", "text": text}]
  return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": True,
          "stream_options": {"include_usage": True}}


def _one(client, url: str, body: dict) -> dict:
  """One streamed request -> {latency, ttft, tokens} (seconds, seconds, completion tokens)."""
  start, first, tokens = time.perf_counter(), None, 0
  with client.stream("POST", url, json=body, timeout=600) as r:
    if r.status_code != 200:
      raise RuntimeError(f"the server answered {r.status_code}: {r.read().decode()[:300]}")
    for line in r.iter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if "error" in chunk:
        raise RuntimeError(f"the server failed a request: {chunk['error']['message']}")
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        first = time.perf_counter()
  end = time.perf_counter()
  return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process so far (Linux /proc; nan elsewhere)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return float("nan")


def measure(base: str, concurrency: int, requests: int, max_tokens: int, image: bool, server_pid: int = 0) -> dict:
  """`concurrency` client threads share `requests` requests -> the row of the table (with the CPU seconds the
  server process and this (client) process spent meanwhile)."""
  import httpx2 as httpx
  url, results, lock = f"{base}/v1/chat/completions", [], threading.Lock()
  todo = iter(range(requests))

  def client_loop():
    with httpx.Client() as client:
      while True:
        with lock:
          k = next(todo, None)
        if k is None:
          return
        row = _one(client, url, _body(k, max_tokens, image))
        with lock:
          results.append(row)

  start, cpu_server, cpu_client = time.perf_counter(), _cpu_seconds(server_pid), time.process_time()
  threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  return {"server_cpu_s": _cpu_seconds(server_pid) - cpu_server, "client_cpu_s": time.process_time() - cpu_client,
          "concurrency": concurrency, "requests": len(results), "wall_s": wall,
          "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
          "mean_latency_s": float(np.mean([r["latency"] for r in results])),
          "mean_ttft_s": float(np.mean([r["ttft"] for r in results])),
          "tokens": sum(r["tokens"] for r in results)}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _server_command(args, port: int) -> list[str]:
  cmd = [sys.executable, "-m", "internvl_jax.serve", "--port", str(port), "--max_batch", str(args.max_batch),
         "--context", str(args.context), "--max_new_tokens", str(args.max_tokens), "--dtype", args.dtype,
         "--model_name", "bench"]
  cmd += ["--hf", args.hf] if args.hf else ["--workdir", args.workdir]
  for flag in ("mesh", "quantize", "system"):
    if getattr(args, flag) is not None:
      cmd += [f"--{flag}", getattr(args, flag)]
  return cmd


def run(args) -> list[dict]:
  """Starts `python -m internvl_jax.serve` as a child process (its own interpreter: the clients' threads here do
  not compete with it for the GIL), waits for /health, measures each concurrency, stops it."""
  import httpx2 as httpx
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  proc = subprocess.Popen(_server_command(args, port), env=env)
  try:
    start = time.perf_counter()
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"the server exited with code {proc.returncode} before answering /health")
      try:
        if httpx.get(f"{base}/health", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.2)
    print(f"server up in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    measure(base, 4, 8, 2, args.image)  # compiles every prompt bucket the timed requests use
    print(f"warm-up (compiling) {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, commit {_commit()}",
          flush=True)
    rows = []
    for c in args.concurrency:
      rows.append(measure(base, c, args.requests, args.max_tokens, args.image, proc.pid))
      r = rows[-1]
      print(f"concurrency {c}: {r['requests']} requests, {r['tokens']} tokens in {r['wall_s']:.2f} s (CPU seconds: "
            f"server {r['server_cpu_s']:.2f}, clients {r['client_cpu_s']:.2f})", flush=True)
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  print("\n| concurrent clients | requests/s | generated tokens/s | mean latency (s) | mean time to first token (s) |"
        "\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['mean_latency_s']:.3f} | "
          f"{r['mean_ttft_s']:.3f} |")
  return rows


def parser() -> argparse.ArgumentParser:
  from internvl_jax import chat as chat_lib
  p = argparse.ArgumentParser(prog="python -m internvl_jax.bench.serve_throughput",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="build and serve a random tiny model (no --hf needed)")
  chat_lib.add_model_args(p)
  p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
  p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
  p.add_argument("--max_tokens", type=int, default=64)
  p.add_argument("--max_batch", type=int, default=16)
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--image", action="store_true", help="each request carries an 80 x 60 image")
  return p


def main(argv=None) -> None:
  p = parser()
  argv = sys.argv[1:] if argv is None else list(argv)
  with tempfile.TemporaryDirectory() as tmp:
    if "--tiny" in argv:  # the model source group wants --hf / --workdir: the tiny folder is one
      argv = [a for a in argv if a != "--tiny"] + ["--hf", tiny_folder(os.path.join(tmp, "tiny"))]
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    run(args)


if __name__ == "__main__":
  main()
