"""The trainer's whole loop on a small model against a plain PyTorch loop over the same files (BENCHMARKS.md).

  python -m internvl_jax.bench.trainer_overhead [--folder DIR] [--images 6000] [--steps 800] [--rounds 2]
      [--parts_rounds 5] [--skip_loops] [--skip_parts] [--before]

The case: a folder of PNGs (56 px, written once from the demo world) with a train.jsonl of captions; batch 64; a
64-wide, two-layer vision tower (InternViT block) and text tower (the contrastive 'tiny' decoder: SwiGLU, RoPE,
GQA, mean pooling). Two measurements, each side run in turn (interleaved) so that a machine shared with others
slows both alike; medians are reported:
- loops: `train.py` for --steps steps in a subprocess against a PyTorch loop (DataLoader + PIL decode, the
  transformers twin of torch_side.Contrastive, AdamW, symmetric InfoNCE) in this process; ms per step from the
  steady state (our metrics.jsonl windows after the first; PyTorch after its first 20 steps) and wall time of
  the whole run; retrieval R@1 of both on 256 demo eval images (the trainer's own final evaluation for ours).
- parts: on a fixed batch of the same data, one train step, then forward and forward+backward of each tower,
  and one batch from each input pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

# The trainer flags of the case (train.py --config.<key>=<value>), also applied in-process by `case_config`.
CASE_FLAGS = {
    "data.train.source": "jsonl", "batch_size": 64, "model.vision.hidden_size": 64, "model.vision.mlp_dim": 256,
    "model.vision.num_heads": 4, "model.text.hidden_size": 64, "model.text.mlp_dim": 256, "model.embed_dim": 64,
    "eval_every": 0, "eval_limit": 256, "checkpoint_every": 0, "progress": False, "log_every": 50,
}
IMAGE_SIZE = 56
TEXT_LEN = 32


def write_pngs(folder: str, n: int) -> str:
  """n demo-world images as PNGs under folder/img and folder/train.jsonl ({"image", "captions"} per line); kept
  when the folder already holds n records. Returns the jsonl path."""
  from PIL import Image
  from internvl_jax.data import demo
  path = os.path.join(folder, "train.jsonl")
  if os.path.exists(path) and sum(1 for _ in open(path)) == n:
    return path
  os.makedirs(os.path.join(folder, "img"), exist_ok=True)
  world = demo.DemoWorld("train", size=n, image_size=IMAGE_SIZE, cache=False)
  with open(path + ".tmp", "w") as f:
    for i in range(n):
      r = world[i]
      name = f"img/{i:05d}.png"
      Image.fromarray(r["image"]).save(os.path.join(folder, name))
      f.write(json.dumps({"image": name, "captions": r["captions"]}) + "\n")
  os.replace(path + ".tmp", path)
  return path


def case_config(jsonl: str, steps: int):
  """The trainer config of the case (configs/contrastive.py:model=tiny plus CASE_FLAGS)."""
  from internvl_jax.train import defaults
  cfg = defaults.base_config("contrastive", "tiny")
  for key, value in dict(CASE_FLAGS, **{"data.train.path": jsonl, "total_steps": steps}).items():
    *path, last = key.split(".")
    node = cfg
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


def run_ours(jsonl: str, steps: int, workdir: str) -> dict:
  """train.py in a subprocess. -> wall_s, ms_step (median of the logged windows after the first), i2t_r1, t2i_r1."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  flags = [f"--config.{k}={v}" for k, v in dict(CASE_FLAGS, **{"data.train.path": jsonl,
                                                              "total_steps": steps}).items()]
  cmd = [sys.executable, os.path.join(repo, "train.py"), "--config", os.path.join(repo, "configs/contrastive.py"),
         "--workdir", workdir] + flags
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  wall = time.perf_counter() - t0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  return dict(wall_s=wall, ms_step=1e3 * CASE_FLAGS["batch_size"] / statistics.median(rates),
              i2t_r1=final.get("i2t_r1"), t2i_r1=final.get("t2i_r1"))


class PngCaptions:
  """torch Dataset over train.jsonl: PIL decode + resize, ImageNet normalisation, a random caption tokenized with
  our tokenizer (same ids as the trainer's)."""

  def __init__(self, jsonl: str, tok):
    self.root = os.path.dirname(jsonl)
    self.records = [json.loads(line) for line in open(jsonl)]
    self.tok = tok

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    import torch
    from PIL import Image
    from internvl_jax.data import features, transforms
    r = self.records[i]
    img = Image.open(os.path.join(self.root, r["image"])).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
    x = transforms.normalize(img).transpose(2, 0, 1)
    caption = r["captions"][int(torch.randint(len(r["captions"]), ()))]
    ids, mask = features.caption_tokens(self.tok, caption, TEXT_LEN)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


def torch_model(cfg):
  """torch_side.Contrastive with the case's shapes (vocabulary from cfg, already sized to the tokenizer)."""
  import torch
  from internvl_jax.bench import torch_side
  torch.manual_seed(0)
  spec = types.SimpleNamespace(vision=cfg.model.vision, text=cfg.model.text, image_size=IMAGE_SIZE,
                               embed_dim=cfg.model.embed_dim)
  model = torch_side.Contrastive(spec).train()
  # The trainer's defaults (lr warmup / cosine do not change the speed; the peak lr and decay match).
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.b1, cfg.b2), weight_decay=cfg.weight_decay)
  return model, opt


def torch_loader(jsonl: str, tok, workers: int, seed: int = 0):
  import torch
  return torch.utils.data.DataLoader(PngCaptions(jsonl, tok), batch_size=CASE_FLAGS["batch_size"], shuffle=True,
                                     drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                     generator=torch.Generator().manual_seed(seed))


def torch_step(model, opt, batch):
  import torch
  x, ids, mask = batch
  opt.zero_grad(set_to_none=True)
  loss = model(x, ids, mask)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the trainer clips at 1.0 too
  opt.step()
  return loss


def run_torch(jsonl: str, cfg, tok, steps: int, workers: int) -> dict:
  """The plain PyTorch loop. -> wall_s (model build to last step), ms_step (after the first 20 steps), r1s."""
  t0 = time.perf_counter()
  model, opt = torch_model(cfg)
  loader, done, t_warm = torch_loader(jsonl, tok, workers), 0, None
  warm = min(20, steps // 4)
  while done < steps:
    for batch in loader:
      torch_step(model, opt, batch)
      done += 1
      if done == warm:
        t_warm = time.perf_counter()
      if done == steps:
        break
  end = time.perf_counter()
  out = dict(wall_s=end - t0, ms_step=1e3 * (end - t_warm) / (steps - warm))
  out.update(torch_retrieval(model, cfg, tok))
  return out


def torch_retrieval(model, cfg, tok) -> dict:
  """R@1 both ways on the trainer's eval set (demo eval split, first caption, cfg.eval_limit images)."""
  import torch
  from internvl_jax.data import features, sources, transforms
  from internvl_jax.train import evaluation
  source = sources.make_source(cfg.data.eval, IMAGE_SIZE)
  recs = [source[i] for i in range(min(cfg.eval_limit, len(source)))]
  x = torch.from_numpy(np.stack([transforms.normalize(r["image"]).transpose(2, 0, 1) for r in recs]))
  toks = [features.caption_tokens(tok, r["captions"][0], TEXT_LEN) for r in recs]
  ids = torch.from_numpy(np.stack([t[0] for t in toks])).long()
  mask = torch.from_numpy(np.stack([t[1] for t in toks])).long()
  model.eval()
  with torch.no_grad():
    img = model.image_projection(model.vision(pixel_values=x).last_hidden_state[:, 0])
    hidden = model.text(input_ids=ids, attention_mask=mask).last_hidden_state
    w = mask[..., None].to(hidden.dtype)
    txt = model.text_projection((hidden * w).sum(1) / w.sum(1).clamp(min=1.0))
  img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
  model.train()
  return evaluation.retrieval_r1(img.numpy(), txt.numpy(), [r.get("key", r.get("id")) for r in recs])


def pin(cores: int) -> None:
  """This process (and the train.py it starts, which inherits it) on the first `cores` cores, PyTorch with as
  many threads; XLA CPU single-threaded Eigen for cores == 1. Before JAX starts its backend."""
  import torch
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  torch.set_num_threads(cores)
  if cores == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def _median_ms(fn, sync, n: int) -> float:
  sync(fn())
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  sync(out)
  return 1e3 * (time.perf_counter() - t) / n


def parts(jsonl: str, workdir: str, rounds: int, calls: int = 5) -> tuple[dict, dict]:
  """Per-piece times (ms, median over `rounds` interleaved rounds of `calls` calls each) of both sides on one
  fixed batch: 'step', 'image fwd', 'image fwd+bwd', 'text fwd', 'text fwd+bwd', 'data' (one batch from the
  input pipeline). Returns (ours, torch) and leaves the tokenizer in workdir."""
  import jax
  import torch
  from flax import nnx
  from internvl_jax.data import features as features_lib, pipeline, sources
  from internvl_jax.train import config_checks, loop, state as state_lib, steps as steps_lib

  cfg = case_config(jsonl, 100)
  mesh = config_checks.make_checked_mesh(cfg)
  src = sources.make_source(cfg.data.train, IMAGE_SIZE)
  tok, built = loop._tokenizer(cfg, workdir, src)
  config_checks.adapt_model_to_tokenizer(cfg, tok, built=built)
  config_checks.validate(cfg, mesh)
  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  state = setup.create()
  feature_fn = features_lib.make_feature_fn(loop.feature_spec(cfg, train=True), tok)
  ds = iter(pipeline.train_dataset(src, feature_fn, global_batch=cfg.batch_size, seed=0,
                                   tracker=pipeline.BadRecordTracker(), num_threads=cfg.data.num_threads))
  sharding = steps_lib.batch_sharding(mesh)
  host = next(ds)
  batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
  step = steps_lib.make_train_step(setup, cfg)
  box = {"state": state}

  def our_step():
    box["state"], m = step(box["state"], batch)
    return m

  from internvl_jax.models import internvl
  model = internvl.InternVLContrastive(cfg.model, rngs=nnx.Rngs(0))
  g, p, r = nnx.split(model, nnx.Param, ...)
  pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
  img = lambda p: nnx.merge(g, p, r).encode_image(pv).sum()
  txt = lambda p: nnx.merge(g, p, r).encode_text(ids, am).sum()
  jit = {"image fwd": jax.jit(img), "image fwd+bwd": jax.jit(jax.grad(img)),
         "text fwd": jax.jit(txt), "text fwd+bwd": jax.jit(jax.grad(txt))}
  ours = {"step": our_step, "data": lambda: next(ds)}
  ours.update({k: (lambda f=f: f(p)) for k, f in jit.items()})

  tmodel, opt = torch_model(cfg)
  loader = iter(torch_loader(jsonl, tok, workers=cfg.data.num_threads))
  tb = tuple(torch.from_numpy(np.asarray(host[k])).long() if k != "pixel_values" else
             torch.from_numpy(np.ascontiguousarray(np.asarray(host[k]).transpose(0, 3, 1, 2)))
             for k in ("pixel_values", "input_ids", "attention_mask"))
  tx, tids, tmask = tb

  def t_img():
    return tmodel.image_projection(tmodel.vision(pixel_values=tx).last_hidden_state[:, 0]).sum()

  def t_txt():
    hidden = tmodel.text(input_ids=tids, attention_mask=tmask).last_hidden_state
    w = tmask[..., None].to(hidden.dtype)
    return tmodel.text_projection((hidden * w).sum(1) / w.sum(1).clamp(min=1.0)).sum()

  def fwd(f):
    def call():
      with torch.no_grad():
        return f()
    return call

  def fwdbwd(f):
    def call():
      tmodel.zero_grad(set_to_none=True)
      loss = f()
      loss.backward()
      return loss
    return call

  theirs = {"step": lambda: torch_step(tmodel, opt, tb), "data": lambda: next(loader),
            "image fwd": fwd(t_img), "image fwd+bwd": fwdbwd(t_img), "text fwd": fwd(t_txt),
            "text fwd+bwd": fwdbwd(t_txt)}
  jsync, tsync = jax.block_until_ready, lambda out: out
  times = {side: {k: [] for k in ours} for side in ("ours", "torch")}
  for _ in range(rounds):
    for k in ours:
      times["ours"][k].append(_median_ms(ours[k], jsync, calls))
      times["torch"][k].append(_median_ms(theirs[k], tsync, calls))
  med = lambda d: {k: statistics.median(v) for k, v in d.items()}
  return med(times["ours"]), med(times["torch"])


def table(rows: list[tuple[str, float, float]], note: str = "") -> str:
  """Markdown table of (what, ours ms, PyTorch ms) with the ratio."""
  out = ["| what | ours (ms) | PyTorch (ms) | ours / PyTorch |", "|---|---:|---:|---:|"]
  out += [f"| {w} | {a:.1f} | {b:.1f} | {a / b:.2f} |" for w, a, b in rows]
  return "\n".join(out) + (f"\n{note}" if note else "")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--folder", default="", help="PNG folder (written once; default: a temp folder)")
  ap.add_argument("--images", type=int, default=6000)
  ap.add_argument("--steps", type=int, default=800, help="steps of each whole loop")
  ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each whole loop")
  ap.add_argument("--parts_rounds", type=int, default=5, help="interleaved rounds of the per-piece timings")
  ap.add_argument("--skip_loops", action="store_true", help="per-piece timings only")
  ap.add_argument("--skip_parts", action="store_true", help="whole loops only")
  ap.add_argument("--before", action="store_true", help="our side without the CPU arrangements of "
                  "models/cpu_layout.py (INTERNVL_JAX_NO_CPU_LAYOUT=1, inherited by train.py): the 'before' numbers")
  ap.add_argument("--cores", type=int, default=0, help="pin this process and train.py to the first N cores, "
                  "one compute thread per core on both sides (0: as the machine is). 1 keeps PyTorch's and XLA's "
                  "thread barriers out of the comparison on a machine loaded by others")
  args = ap.parse_args(argv)
  if args.before:
    os.environ["INTERNVL_JAX_NO_CPU_LAYOUT"] = "1"
  if args.cores:
    pin(args.cores)
  tmp = tempfile.mkdtemp(prefix="trainer_overhead_")
  try:
    _run(args, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # run folders (and the PNGs unless --folder named a folder)


def _run(args, tmp: str) -> None:
  folder = args.folder or os.path.join(tmp, "data")
  jsonl = write_pngs(folder, args.images)
  import torch
  print(f"# {'before' if args.before else 'after'}: {args.images} PNGs in {folder}; torch threads "
        f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; pinned to "
        f"{args.cores or 'all'} cores", flush=True)
  if not args.skip_parts:
    ours, theirs = parts(jsonl, os.path.join(tmp, "parts"), args.parts_rounds)
    print(table([(k, ours[k], theirs[k]) for k in ours], "(fixed batch; median of interleaved rounds)"),
          flush=True)
  if args.skip_loops:
    return
  from internvl_jax.data import tokenizer as tokenizer_lib
  from internvl_jax.train import config_checks
  res = {"ours": [], "torch": []}
  for i in range(args.rounds):
    wd = os.path.join(tmp, f"run{i}")
    res["ours"].append(run_ours(jsonl, args.steps, wd))
    cfg = case_config(jsonl, args.steps)
    tok = tokenizer_lib.load(wd)
    config_checks.adapt_model_to_tokenizer(cfg, tok, built=True)
    res["torch"].append(run_torch(jsonl, cfg, tok, args.steps, workers=cfg.data.num_threads))
    print(f"round {i}: ours {res['ours'][-1]}, torch {res['torch'][-1]}", flush=True)
  med = {s: {k: statistics.median(r[k] for r in v) for k in ("wall_s", "ms_step")} for s, v in res.items()}
  ratios = [o["ms_step"] / t["ms_step"] for o, t in zip(res["ours"], res["torch"])]
  print(table([(f"{args.steps}-step loop, ms/step (steady)", med["ours"]["ms_step"], med["torch"]["ms_step"])],
              f"paired ms/step ratios per round: {[round(x, 2) for x in ratios]}; steps/s ours "
              f"{1e3 / med['ours']['ms_step']:.2f}, PyTorch {1e3 / med['torch']['ms_step']:.2f}; wall s (start to "
              f"end: ours incl. process start, compile and final eval) ours {med['ours']['wall_s']:.1f}, PyTorch "
              f"{med['torch']['wall_s']:.1f}"))
  for side in res:
    print(side, "retrieval R@1 (i2t, t2i) per round:", [(r["i2t_r1"], r["t2i_r1"]) for r in res[side]])


if __name__ == "__main__":
  main()
