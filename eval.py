"""Evaluate a checkpoint with the published protocols (docs/eval.md):

  python eval.py --task {retrieval,zeroshot,caption,vqa} (--workdir DIR | --hf DIR) --data SOURCE [--out FILE.json]
                 [--batch_size N] [--image_size N] [--classnames FILE] [--templates FILE]
                 [--dtype bfloat16] [--mesh fsdp=N[,tensor=M][,data=K]]
  python eval.py --task {linear_probe,attention_probe} (--workdir DIR | --hf DIR) --train_data SOURCE --data SOURCE
                 [--weight_decays 1e-4,1e-3] [--probe_epochs N] [--probe_batch_size N] [--probe_lr LR] ...

SOURCE: demo[:N] | jsonl:PATH | tfds:NAME[:SPLIT] | flickr30k:ROOT | coco:ROOT | a folder of class sub-folders.
--workdir: a train.py workdir (its latest checkpoint; for a multi-stage run such as the demo, the stage whose
model fits the task). --hf: a local Hugging Face folder as released (config.json, safetensors, its tokenizer files).
The probes train a classifier on the frozen vision tower's features of --train_data (the demo's train split for
`demo`) and score it on --data.
Prints a markdown table; --out writes the JSON (and, for retrieval / zeroshot, a PNG gallery beside it).
--mesh lays the weights out over all devices as they are read (docs/eval.md, "Big models").
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", None, ["retrieval", "zeroshot", "caption", "vqa", "linear_probe", "attention_probe"],
                  "what to evaluate")
flags.DEFINE_string("workdir", None, "a train.py workdir (latest checkpoint, config.json, tokenizer.json)")
flags.DEFINE_string("hf", None, "a local Hugging Face checkpoint folder, as released (weights, config, tokenizer)")
flags.DEFINE_string("data", None, "demo[:N] | jsonl:PATH | tfds:NAME[:SPLIT] | flickr30k:ROOT | coco:ROOT | FOLDER")
flags.DEFINE_string("train_data", None, "linear_probe / attention_probe: the train split, a label set as --data "
                    "(jsonl:PATH | FOLDER | tfds:NAME[:SPLIT], split default train | demo[:N], the demo's train split)")
flags.DEFINE_list("weight_decays", None, "linear_probe: L2 penalties to choose from on 20% of the train split "
                  "(default 1e-6 .. 1 in half decades; one value: no sweep)")
flags.DEFINE_integer("probe_epochs", 10, "attention_probe: epochs over the cached train tokens (official: 10)")
flags.DEFINE_integer("probe_batch_size", 1024, "attention_probe: batch size (official: 1024; the train split when "
                     "smaller)")
flags.DEFINE_float("probe_lr", 0.1, "attention_probe: SGD learning rate per 512 images (official: 0.1)")
flags.DEFINE_string("out", None, "result JSON path (a .png gallery is written beside it for retrieval / zeroshot)")
flags.DEFINE_integer("batch_size", 64, "images (or texts) per model call")
flags.DEFINE_integer("image_size", 0, "input size; 0 = the checkpoint's (a different size resizes position "
                     "embeddings only where the model supports it: use with care)")
flags.DEFINE_string("classnames", None, "zeroshot: class names, one per line (default: the data's, else ImageNet-1k)")
flags.DEFINE_string("templates", None, "zeroshot: prompt templates with {}, one per line (default: CLIP's 80)")
flags.DEFINE_string("vqa_suffix", None, "vqa: text after the question (default: InternVL's short-answer "
                    "instruction; none for the demo)")
flags.DEFINE_integer("max_new_tokens", None, "caption / vqa: tokens to generate (default 30 / 10)")
flags.DEFINE_bool("dynamic", False, "caption / vqa: InternVL's dynamic tiling (--max_num tiles + thumbnail) instead "
                  "of one squashed tile, as the official scripts' --dynamic")
flags.DEFINE_integer("max_num", 6, "caption / vqa with --dynamic: most tiles per image (the official default, 6)")
flags.DEFINE_string("cache_dir", None, "where demo / tfds images are written as PNG (default: the temp folder)")
flags.DEFINE_bool("progress", True, "show progress bars")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and compute dtype")
flags.DEFINE_enum("quantize", None, ["int8", "int4"], "caption / vqa: weight-only quantization of the chat model's "
                  "language model with qwix (int8 per channel, int4 in groups of 128): saves memory; accuracy drops a little")
flags.DEFINE_bool("quantize_vision", False, "with --quantize: the vision tower and projector too")
flags.DEFINE_string("mesh", None, "e.g. fsdp=8 or fsdp=4,tensor=2 (axes data, fsdp, expert, tensor; sizes multiply "
                    "to the device count); default: one device")


def main(argv):
  del argv
  if FLAGS.task is None or FLAGS.data is None or (FLAGS.workdir is None) == (FLAGS.hf is None):
    raise app.UsageError("give --task, --data and exactly one of --workdir DIR or --hf DIR")
  probe = FLAGS.task in ("linear_probe", "attention_probe")
  if probe != (FLAGS.train_data is not None):
    raise app.UsageError(f"--train_data SOURCE is {'needed' if probe else 'only'} for --task linear_probe / "
                         "attention_probe (their train split)")
  if FLAGS.quantize and FLAGS.task not in ("caption", "vqa"):
    raise app.UsageError(f"--quantize is for the generating tasks caption / vqa, not --task {FLAGS.task}; drop it")
  from internvl_jax.evaluate import datasets, models, placement, run

  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    datasets.check(FLAGS.data, FLAGS.task)  # before minutes of model loading
    if probe:
      datasets.check(FLAGS.train_data, FLAGS.task)
    try:
      wds = [float(w) for w in FLAGS.weight_decays] if FLAGS.weight_decays else None
    except ValueError:
      raise ValueError(f"--weight_decays {','.join(FLAGS.weight_decays)}: give numbers, e.g. 1e-4,1e-3") from None
    if wds is not None and any(w < 0 for w in wds):
      raise ValueError(f"--weight_decays {','.join(FLAGS.weight_decays)}: penalties must be >= 0")
    mesh = placement.make_mesh(FLAGS.mesh)
    model = (models.load_hf(FLAGS.hf, dtype=FLAGS.dtype, mesh=mesh) if FLAGS.hf
             else models.load_workdir(FLAGS.workdir, FLAGS.task, dtype=FLAGS.dtype, mesh=mesh))
    if FLAGS.quantize:
      from internvl_jax import quantize
      if model.kind != "chat":
        raise ValueError(f"--quantize needs a chat model; {model.name} is {model.kind}")
      model.model = quantize.quantize(model.model, FLAGS.quantize, vision=FLAGS.quantize_vision)
      model.name += f" [{FLAGS.quantize}{' +vision' if FLAGS.quantize_vision else ''}]"  # recorded in the JSON
    info = placement.describe(model.model, model.mesh)
    print(f"loaded {model.name}: {info['dtype']} parameters, {placement.gib(info['param_bytes_total'])} in all, "
          f"{placement.gib(info['param_bytes_per_device'])} per device ({info['devices']} device(s), mesh "
          f"{FLAGS.mesh or 'none'})", flush=True)
    if FLAGS.image_size:
      model.image_size = FLAGS.image_size
    run.run_task(FLAGS.task, model, FLAGS.data, out=FLAGS.out, batch_size=FLAGS.batch_size,
                 classnames=FLAGS.classnames, templates=FLAGS.templates, vqa_suffix=FLAGS.vqa_suffix,
                 max_new_tokens=FLAGS.max_new_tokens, cache_dir=FLAGS.cache_dir, progress=FLAGS.progress,
                 dynamic=FLAGS.dynamic, max_num=FLAGS.max_num, train_data=FLAGS.train_data, weight_decays=wds,
                 probe_epochs=FLAGS.probe_epochs, probe_batch_size=FLAGS.probe_batch_size, probe_lr=FLAGS.probe_lr)
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
