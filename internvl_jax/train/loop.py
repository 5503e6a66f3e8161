"""The training loop of one stage: setup, resume, steps, metrics, evaluation, checkpoints, preemption.

run(cfg, workdir) -> final metrics. Rerunning with the same workdir resumes from the latest checkpoint, with the
data iterator where it was, so the losses continue exactly as in an uninterrupted run. SIGTERM makes the loop
save a checkpoint at the current step and return (train.py then exits 0).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from internvl_jax.data import features as features_lib
from internvl_jax.data import packing, pipeline, sources
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.train import checkpoint as checkpoint_lib
from internvl_jax.train import config_checks, evaluation, freezing, init_from, memory_check, metrics as metrics_lib
from internvl_jax.train import state as state_lib
from internvl_jax.train import steps as steps_lib
from internvl_jax.train import workdir as workdir_lib


class TrainingStopped(RuntimeError):
  """Training cannot go on (too many non-finite steps); the last good checkpoint is kept."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. under some test runners): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def caption_prefix(cfg: ml_collections.ConfigDict) -> str:
  """The text prepended to image-text captions (the model's text_prefix, as evaluation uses); none for instruct."""
  return cfg.model.get("text_prefix", "") if cfg.task != "instruct" else ""


def feature_spec(cfg: ml_collections.ConfigDict, *, train: bool) -> features_lib.FeatureSpec:
  return features_lib.FeatureSpec(
      task=cfg.task, image_size=config_checks.input_size(cfg), max_text_len=cfg.data.max_text_len,
      tokens_per_tile=config_checks.tokens_per_tile(cfg) if cfg.task == "instruct" else 0,
      max_tiles=cfg.data.get("max_tiles", 1), template=cfg.data.get("template", "plain"),
      system=cfg.data.get("system_message", None),
      default_system_block=bool(cfg.data.get("default_system_block", True)),
      max_dynamic_patch=cfg.data.get("max_dynamic_patch", 0) or None,
      min_num_frame=cfg.data.get("min_num_frame", 8), max_num_frame=cfg.data.get("max_num_frame", 32),
      augment=train and cfg.data.get("augment", False),
      text_prefix=caption_prefix(cfg), packed=train and packing_on(cfg))


def packing_on(cfg: ml_collections.ConfigDict) -> bool:
  return cfg.task == "instruct" and bool(cfg.data.get("packing", False))


PACK_SAMPLE = 32  # records featurised to derive data.tiles_per_batch = 0 (the same ones on every host)


def pack_spec(cfg: ml_collections.ConfigDict, tok, source=None) -> packing.PackSpec | None:
  """The global packing budgets of a packed instruct run (data.packing), else None; tiles_per_batch = 0 is
  derived from PACK_SAMPLE records evenly spaced over the source (every dataset of a meta file has its share),
  see packing.default_tiles_per_batch."""
  if not packing_on(cfg):
    return None
  per_tile, tiles = config_checks.tokens_per_tile(cfg), cfg.data.get("tiles_per_batch", 0)
  if not tiles:
    fn = features_lib.make_feature_fn(feature_spec(cfg, train=True), tok)
    sample = []
    n = len(source) if hasattr(source, "__len__") else 0  # an iterable source (wds) is not sampled
    for i in sorted({j * n // PACK_SAMPLE for j in range(PACK_SAMPLE)} if n else ()):
      try:
        sample.append(fn(source[i], None))
      except features_lib.BadRecord:
        continue
    tiles = packing.default_tiles_per_batch(cfg.batch_size, cfg.data.max_text_len, cfg.data.get("max_tiles", 1),
                                            per_tile, sample, jax.process_count())
    logging.info("data.tiles_per_batch=0: %d tiles per batch (from %d sampled records)", tiles, len(sample))
  return packing.PackSpec(rows=cfg.batch_size, max_len=cfg.data.max_text_len, tiles=tiles,
                          image_size=config_checks.input_size(cfg), tokens_per_tile=per_tile,
                          image_token_id=tok.image_token_id, pad_id=tok.pad_id if tok.pad_id is not None else 0)


def _tokenizer(cfg, workdir: str, train_source):
  """config.tokenizer if set; else the workdir's (a resumed run); else the init workdir's (a later stage); else
  one built from the training texts. Returns (tokenizer, whether it sizes the model's vocabulary): a tokenizer
  named in the config belongs to a pretrained model whose vocabulary is fixed; any other is ours and sets it."""
  named = cfg.get("tokenizer", "")
  init_dir = cfg.init.get("path", "") or ""
  path = named or ("" if tokenizer_lib.saved_in(workdir) or not tokenizer_lib.saved_in(init_dir) else init_dir)
  prefix = caption_prefix(cfg)
  texts = (lambda: itertools.chain([prefix], train_source.texts())) if prefix else train_source.texts
  tok = tokenizer_lib.load_or_build(path, workdir, texts)  # a built tokenizer knows the caption prefix too
  if path and jax.process_index() == 0:  # eval.py looks for the tokenizer (files and settings) in the workdir
    tok.save(workdir)
  return tok, not named


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains one stage in workdir. Returns the last logged metrics (with the final evaluation). One trainer per
  workdir: a second one stops with workdir.WorkdirError naming the first."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise workdir_lib.WorkdirError(f"--workdir {workdir} is a file; give a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise workdir_lib.WorkdirError(f"cannot create --workdir {workdir} ({e.strerror}); give a writable "
                                   "folder") from None
  if not os.access(workdir, os.W_OK):
    raise workdir_lib.WorkdirError(f"--workdir {workdir} is not writable; give a writable folder")
  with workdir_lib.RunLock(workdir, enabled=jax.process_index() == 0):
    return _run(cfg, workdir)


def _has_checkpoint(workdir: str) -> bool:
  root = checkpoint_lib.checkpoint_dir(workdir)
  return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def _template_of_release(cfg: ml_collections.ConfigDict) -> None:
  """An instruct run started from a released chat folder (init.path) with the default 'plain' template takes the
  folder's conversation template (and system behaviour): the prompts it trains on are then the release's own."""
  folder = cfg.init.get("path", "")
  if (cfg.task != "instruct" or cfg.data.get("template", "plain") != "plain"
      or not init_from.is_release_folder(folder)):
    return
  from internvl_jax.data import template_match  # local: only for runs from a released folder

  found = template_match.folder_template(folder)
  cfg.data.template = found["template"]
  cfg.data.default_system_block = found["default_system_block"]
  if found["system_message"] is not None and cfg.data.get("system_message") is None:
    cfg.data.system_message = found["system_message"]
  print(f"data.template={found['template']} (from {folder}"
        f"{'; no default system block' if not found['default_system_block'] else ''})", flush=True)


def _run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # a private, mutable copy
  _template_of_release(cfg)
  mesh = config_checks.make_checked_mesh(cfg)
  image_size = config_checks.input_size(cfg)
  train_source = sources.make_train_source(cfg.data, image_size)
  tok, from_scratch = _tokenizer(cfg, workdir, train_source)
  config_checks.adapt_model_to_tokenizer(cfg, tok, built=from_scratch)
  config_checks.validate(cfg, mesh)
  state_lib.prepare(cfg)  # config.json then records the model as built (LoRA, freeze_vision, logit bias)
  # before config.json is rewritten: eval.py reads the model from it, so it must keep matching the checkpoints
  workdir_lib.check_same_model(workdir, cfg, _has_checkpoint(workdir))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))

  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  if jax.process_index() == 0:
    table = freezing.parameter_table(setup.abstract["params"], setup.abstract["frozen"], setup.layer_masks)
    print(table, flush=True)
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(table + "\n")
  tracker = pipeline.BadRecordTracker(cfg.data.get("max_bad_fraction", 0.05), name="train")
  train_features = features_lib.make_feature_fn(feature_spec(cfg, train=True), tok)
  dataset = pipeline.train_dataset(train_source, train_features, global_batch=cfg.batch_size, seed=cfg.seed,
                                   tracker=tracker, num_threads=cfg.data.get("num_threads", 2),
                                   packing=pack_spec(cfg, tok, train_source))
  data_iter = iter(dataset)
  lora = freezing.uses_lora(cfg)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints,
                                     save_frozen=not lora)  # a LoRA run saves adapters + optimizer state only

  restored = ckpt.restore_latest_good(setup.abstract_with_shardings())
  if restored is not None:
    latest, state, data_state, skipped = restored
    for line in skipped:
      print(f"warning: checkpoint {line}: it does not restore; resuming from step {latest}", flush=True)
    if lora:  # the base as at the start: seeded init, then config.init.path
      state = dict(state, frozen=init_from.rebuild_frozen(setup, cfg.init))
    data_iter.set_state(_restore_records(data_state, tracker))
    logging.info("resumed from step %d of %s", latest, workdir)
  else:
    state = setup.create()
    if cfg.init.get("path"):
      state, rows = init_from.initialize(state, setup, cfg.init)
      table = init_from.format_table(rows)
      print(table, flush=True)
      with open(os.path.join(workdir, "init_table.txt"), "w") as f:
        f.write(table + "\n")

  final_path = os.path.join(workdir, "final_metrics.json")
  if int(state["step"]) >= cfg.total_steps and os.path.exists(final_path):
    ckpt.close()
    print(f"{workdir} already finished {int(state['step'])} steps; raise config.total_steps to train on")
    with open(final_path) as f:
      return dict(json.load(f), step=int(state["step"]), preempted=0.0)

  train_step = steps_lib.make_train_step(setup, cfg)
  evaluate = _make_evaluator(cfg, setup, tok, mesh)
  log = metrics_lib.MetricsLog(workdir, resume_step=int(state["step"]))
  batch_sh = steps_lib.batch_sharding(mesh)
  step = int(state["step"])
  total = cfg.total_steps
  last: dict = {}
  t_last, n_last = time.time(), step
  bar = tqdm(total=total, initial=step, desc=os.path.basename(os.path.normpath(workdir)) or "train",
             disable=jax.process_index() != 0 or not cfg.get("progress", True), dynamic_ncols=True,
             mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a log file gets a line every 30 s, not 10 a second
  first = None
  limit = memory_check.device_bytes_limit()
  if limit and step < total:  # an accelerator: compile now and compare with its memory before any step runs
    first = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in next(data_iter).items()}
    compiled = train_step.lower(state, first).compile()
    try:
      need = memory_check.check_fits(compiled, cfg, limit)
    except config_checks.ConfigError:
      ckpt.close()
      raise
    logging.info("train step: %.2f GiB of %.2f GiB per device", need / 2 ** 30, limit / 2 ** 30)
    train_step = compiled  # the same executable: no second compilation at the first call
  with _Preemption() as preempt:
    while step < total:
      if first is not None:
        batch, first = first, None
      else:
        batch = next(data_iter)
        batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}
      state, m = train_step(state, batch)
      step += 1
      bar.update(1)
      log_now = (cfg.log_every and step % cfg.log_every == 0) or step == total
      eval_now = (cfg.eval_every and step % cfg.eval_every == 0) or step == total
      if log_now or eval_now:
        record = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.time()
        record["images_per_s"] = (step - n_last) * cfg.batch_size / max(now - t_last, 1e-9)
        record["skipped_steps"] = float(state["skipped"])
        record.update(tracker.summary())
        t_last, n_last = now, step
        if eval_now:
          record.update(evaluate(state))
        log.write(step, record)
        last = record
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr", "images_per_s", "i2t_r1", "t2i_r1",
                                                          "exact_match") if k in record}, refresh=False)
        if int(state["bad_steps"]) >= cfg.max_bad_steps:
          bar.close()
          ckpt.close()
          data_iter.close()
          raise TrainingStopped(f"{int(state['bad_steps'])} steps in a row had a non-finite loss or gradient "
                                f"(config.max_bad_steps={cfg.max_bad_steps}); lower config.lr or check the data. "
                                f"The last good checkpoint in {checkpoint_lib.checkpoint_dir(workdir)} is kept")
      if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total or preempt.requested:
        ckpt.save(step, state, _with_records(data_iter.get_state(), tracker), force=True)
      if preempt.requested:
        logging.warning("SIGTERM: saved step %d, stopping", step)
        print(f"preempted: checkpoint saved at step {step} in {workdir}; rerun the same command to resume",
              flush=True)
        break
  bar.close()
  ckpt.close()
  data_iter.close()  # stops the batch-prefetch thread (no shutdown-time noise from a thread left running)
  log.close()
  if jax.process_index() == 0 and log.history:
    metrics_lib.plot_curves(log.history, os.path.join(workdir, "curves.png"))
  if step >= total and jax.process_index() == 0:
    with open(final_path, "w") as f:
      json.dump(last, f, indent=2)
  return dict(last, step=step, preempted=float(step < total))


def _with_records(iterator_state: dict, tracker: pipeline.BadRecordTracker) -> dict:
  """The data slot of a checkpoint: the iterator's state and the bad-record counters (so the max_bad_fraction
  budget carries across resumes instead of restarting at 0)."""
  seen, bad = tracker.counts()
  return {"iterator": iterator_state, "records": {"seen": seen, "bad": bad}}


def _restore_records(data_state: dict, tracker: pipeline.BadRecordTracker) -> dict:
  """Inverse of _with_records; checkpoints written before the counters were saved hold the iterator state alone."""
  if set(data_state) == {"iterator", "records"}:
    tracker.restore(int(data_state["records"]["seen"]), int(data_state["records"]["bad"]))
    return data_state["iterator"]
  return data_state


def _make_evaluator(cfg, setup, tok, mesh):
  """state -> eval metrics dict ({} when there is no eval split)."""
  if not cfg.data.eval.get("source"):
    return lambda state: {}
  source = sources.make_source(cfg.data.eval, config_checks.input_size(cfg))
  feats = features_lib.make_feature_fn(feature_spec(cfg, train=False), tok)
  kw = dict(batch_size=cfg.eval_batch_size, mesh=mesh, limit=cfg.get("eval_limit", None) or None)
  if cfg.task == "instruct":
    eval_step = steps_lib.make_lm_eval_step(setup, cfg)
    return lambda state: evaluation.evaluate_lm(eval_step, state, source, feats, **kw)
  embed_step = steps_lib.make_embed_step(setup)
  return lambda state: evaluation.evaluate_retrieval(embed_step, state, source, feats, **kw)


def summarize(name: str, result: dict, seconds: float) -> str:
  keys = ("loss", "i2t_r1", "t2i_r1", "exact_match", "eval_loss")
  cells = "  ".join(f"{k}={result[k]:.4f}" for k in keys if k in result)
  return f"{name:<10} steps={int(result.get('step', 0)):<6} time={seconds:6.1f}s  {cells}"


def np_tree_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
