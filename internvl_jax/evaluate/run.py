"""The evaluation tasks end to end on a loaded model (evaluate/models.py) and set (evaluate/datasets.py): embed,
generate or probe in batches, score with the protocol modules, build the result JSON (report.py).

  result = run_retrieval(model, data, data_name, batch_size=64)   # likewise run_zeroshot / run_caption / run_vqa
  result = run_linear_probe(model, train, test, data_name, train_name)   # likewise run_attention_probe
  run_task(task, model, data_spec, out=FILE.json)                 # load the data, run, print table, write JSON/PNG

eval.py is a thin CLI over run_task; train.py's in-loop evaluation uses retrieval.evaluate_retrieval directly
(see train/evaluation.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from internvl_jax.data import chat_format
from internvl_jax.evaluate import (attention_probe, captioning, datasets, linear_probe, placement, report, retrieval,
                                   sources, vqa, zeroshot)
from internvl_jax.evaluate.models import PROBE_TASKS, EvalModel

TASKS = ("retrieval", "zeroshot", "caption", "vqa") + PROBE_TASKS
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # InternVL's COCO caption prompt
VQA_SUFFIX = "Answer the question using a single word or phrase."  # InternVL's VQAv2 short-answer prompt
NUM_SAMPLES = 20  # generated captions / answers kept in the JSON


def _embed_images(model: EvalModel, paths: Sequence[str], batch_size: int, progress: bool,
                  resize: str = "squash") -> np.ndarray:
  batches = sources.image_batches(paths, model.image_size, batch_size, resize=resize)
  return retrieval.compute_embeddings(model.embed_images, batches, total=-(-len(paths) // batch_size),
                                      pad_to=batch_size, desc="images", progress=progress)


def _embed_texts(model: EvalModel, texts: Sequence[str], batch_size: int, progress: bool) -> np.ndarray:
  tokens = model.tokenize(list(texts))  # [M, T] each; tokenising is cheap next to the model
  batches = ({k: v[i:i + batch_size] for k, v in tokens.items()} for i in range(0, len(texts), batch_size))
  return retrieval.compute_embeddings(model.embed_tokens, batches, total=-(-len(texts) // batch_size),
                                      pad_to=batch_size, desc="texts", progress=progress)


def run_retrieval(model: EvalModel, data: sources.ImageTextSet, data_name: str, *, batch_size: int = 64,
                  progress: bool = True) -> tuple[dict, retrieval.RetrievalResult, list[str]]:
  """DESIGN §7 retrieval: captions preprocessed (lowercase, .!"()*#:;~ -> space, 50 words), images squashed
  bicubic to the model size, cosine top-k both ways. Returns (result JSON, the ranked lists, processed texts)."""
  model.require("retrieval")
  texts = [retrieval.preprocess_caption(t) for t in data.texts]
  image_emb = _embed_images(model, data.image_paths, batch_size, progress)
  text_emb = _embed_texts(model, texts, batch_size, progress)
  res = retrieval.evaluate_retrieval(image_emb, text_emb, data.txt2img, image_groups=data.groups)
  extra = {"model": model.name, "text_prefix": model.text_prefix, "preprocessing": "resize to S x S (squash)"}
  if data.groups is not None:
    extra["hit_rule"] = "same group (interchangeable images, e.g. the demo's scenes)"
  return (report.retrieval_result(data_name, len(data.image_paths), len(texts), res.metrics, **extra), res, texts)


def run_zeroshot(model: EvalModel, data: sources.LabelSet, data_name: str, *, classnames: list[str] | None = None,
                 templates: list[str] | None = None, batch_size: int = 64,
                 progress: bool = True) -> tuple[dict, np.ndarray, np.ndarray, list[str], np.ndarray]:
  """Template-ensemble zero-shot classification. classnames default: the set's own, else ImageNet-1k; templates
  default: the 80 CLIP ones. Returns (result JSON, top-5 classes int32 [N, 5], their logits, classnames,
  labels int64 [N])."""
  model.require("zeroshot")
  classnames = classnames or data.classnames or zeroshot.load_classnames()
  templates = templates or zeroshot.load_templates()
  labels = (np.asarray(data.labels, np.int64) if data.classnames and classnames == data.classnames
            else zeroshot.labels_to_indices(data.labels, classnames))
  class_emb = zeroshot.class_embeddings(lambda b: _embed_texts(model, b, batch_size, False), classnames, templates,
                                        batch_size=batch_size, progress=progress)
  # the classification transform of the published evaluation: short side to S, centred S x S crop
  image_emb = _embed_images(model, data.image_paths, batch_size, progress, resize="center_crop")
  logits, top = zeroshot.predict_topk(image_emb, class_emb, k=min(5, len(classnames)))
  acc = zeroshot.topk_accuracy(top, labels, ks=(1, min(5, len(classnames))))
  top5 = acc.get("top5", acc[f"top{min(5, len(classnames))}"])
  per_class = zeroshot.per_class_accuracy(top[:, 0], labels, classnames)
  result = report.zeroshot_result(data_name, len(labels), acc["top1"], top5, per_class, model=model.name,
                                  num_classes=len(classnames), num_templates=len(templates),
                                  text_prefix=model.text_prefix, preprocessing="resize short side + center crop")
  return result, top, logits, classnames, labels


def _vision_outputs(fn, paths: Sequence[str], image_size: int, batch_size: int, progress: bool,
                    desc: str) -> np.ndarray:
  """fn(pixels [batch_size, S, S, 3]) -> [batch_size, ...] over the images (short side to S + centre crop, the
  official probe test transform), a short last batch padded so one program serves; stacked into one host array
  [N, ...] allocated once (token caches are large)."""
  out = None
  batches = sources.image_batches(paths, image_size, batch_size, resize="center_crop")
  for i, batch in enumerate(tqdm(batches, total=-(-len(paths) // batch_size), desc=desc, disable=not progress,
                                 leave=False)):
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, 0)])
    y = np.asarray(fn(batch))[:n]
    if out is None:
      out = np.empty((len(paths),) + y.shape[1:], y.dtype)
    out[i * batch_size:i * batch_size + n] = y
  return out


def _sorted_labels(labels) -> list[str]:
  """Distinct raw labels in a stable order: numerically when all are integers, else alphabetically."""
  distinct = {str(x) for x in labels}
  return sorted(distinct, key=int) if all(x.lstrip("-").isdigit() for x in distinct) else sorted(distinct)


def probe_labels(train: sources.LabelSet, test: sources.LabelSet,
                 classnames: list[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
  """One class list for both splits and int64 labels [N], [M] into it: `classnames` when given; else the train
  set's own (class folders, the demo), test classes matched to it by name; else (JSONL) the distinct train
  labels, integers in numeric order and names alphabetically. A test class the train split lacks is an error.
  Integer labels index `classnames` only when it is given and does not name them (zeroshot's rule); otherwise
  they are names ("3" is the class called 3, not the fourth)."""
  by_index = classnames is not None
  if classnames is None and train.classnames:
    classnames = list(train.classnames)
  if classnames is None:
    classnames = _sorted_labels(train.labels)

  def index(data: sources.LabelSet, split: str) -> np.ndarray:
    if data.classnames and list(data.classnames) == classnames:
      return np.asarray(data.labels, np.int64)
    raw = [data.classnames[i] for i in data.labels] if data.classnames else [str(x) for x in data.labels]
    known = set(classnames)
    unknown = sorted({x for x in raw if x not in known and not (by_index and x.isdigit() and int(x) < len(classnames))})
    if unknown:
      raise ValueError(f"{split} class {unknown[0]!r} is not one of the {len(classnames)} classes of the train "
                       "split (give both splits the same classes, or pass --classnames FILE)")
    return zeroshot.labels_to_indices(raw, classnames)

  return classnames, index(train, "train"), index(test, "test")


def run_linear_probe(model: EvalModel, train: sources.LabelSet, test: sources.LabelSet, data_name: str,
                     train_name: str, *, classnames: list[str] | None = None,
                     weight_decays: Sequence[float] | None = None, batch_size: int = 64,
                     progress: bool = True) -> dict:
  """Linear probe (evaluate/linear_probe.py): the class token + mean patch token of the vision tower's last block
  for both splits, then logistic regression with the weight decay picked on 20% of the train split, refit on all
  of it; top-1 / top-5 on the test split."""
  names, ytr, yte = probe_labels(train, test, classnames)
  ftr = _vision_outputs(model.probe_features, train.image_paths, model.image_size, batch_size, progress,
                        "train features")
  fte = _vision_outputs(model.probe_features, test.image_paths, model.image_size, batch_size, progress,
                        "test features")
  res = linear_probe.linear_probe(ftr, ytr, fte, yte, len(names), weight_decays or linear_probe.DEFAULT_WEIGHT_DECAYS,
                                  progress=progress)
  per_class = zeroshot.per_class_accuracy(res.logits.argmax(1), yte, names)
  return report.probe_result("linear_probe", data_name, train_name, len(ytr), len(yte), len(names), res.top1,
                             res.top5, weight_decay=res.weight_decay, sweep=res.sweep, per_class=per_class,
                             model=model.name, feature="cls_patch_concat (class token ; mean patch token, last "
                             "block)", feature_dim=int(ftr.shape[1]),
                             preprocessing="resize short side + center crop")


def run_attention_probe(model: EvalModel, train: sources.LabelSet, test: sources.LabelSet, data_name: str,
                        train_name: str, *, classnames: list[str] | None = None, batch_size: int = 64,
                        epochs: int = attention_probe.EPOCHS, probe_batch_size: int = attention_probe.BATCH_SIZE,
                        base_lr: float = attention_probe.BASE_LR, progress: bool = True) -> dict:
  """Attention-pooling probe (evaluate/attention_probe.py): the last block's tokens of both splits cached in host
  memory, the official attention_pooling head trained on the train split's; top-1 (top-5) on the test split."""
  names, ytr, yte = probe_labels(train, test, classnames)
  ttr = _vision_outputs(model.vision_tokens, train.image_paths, model.image_size, batch_size, progress,
                        "train tokens")
  heads = int(model.model.vision.config.num_heads)
  probe, log = attention_probe.train_attention_probe(ttr, ytr, len(names), heads, epochs=epochs,
                                                     batch_size=probe_batch_size, base_lr=base_lr, progress=progress)
  del ttr  # the train cache is the big one
  tte = _vision_outputs(model.vision_tokens, test.image_paths, model.image_size, batch_size, progress, "test tokens")
  logits = attention_probe.predict(probe, tte)
  k5 = len(names) > 5
  top1 = linear_probe.topk_accuracy(logits, yte, 1)
  top5 = linear_probe.topk_accuracy(logits, yte, 5) if k5 else None
  per_class = zeroshot.per_class_accuracy(logits.argmax(1), yte, names)
  return report.probe_result("attention_probe", data_name, train_name, len(ytr), len(yte), len(names), top1, top5,
                             per_class=per_class, model=model.name, num_heads=heads, epochs=epochs, **log,
                             tokens=f"{tte.shape[1]} x {tte.shape[2]} (last block, class token included)",
                             preprocessing="resize short side + center crop")


def _generate_all(model: EvalModel, paths: Sequence[str], questions: Sequence[str], batch_size: int,
                  max_new_tokens: int, min_new_tokens: int, progress: bool, dynamic: bool = False,
                  max_num: int = 6) -> list[str]:
  """Greedy answers for (image, question) pairs in fixed-shape batches.

  Without `dynamic` each image is one tile squashed to the model size (InternVL's evaluation scripts without
  --dynamic); with it, InternVL's dynamic tiling up to max_num tiles (+ thumbnail). One compile: the prompt length
  is the longest prompt's and each batch's tiles are padded to one fixed count (unused tiles feed no token); a
  short last batch is padded by repeating its last row."""
  geometry = model.chat
  if dynamic:
    tiles = []
    for p in paths:
      with Image.open(p) as im:  # the header is enough for the grid
        tiles.append(chat_format.num_dynamic_tiles(*im.size, geometry.image_size, max_num, geometry.use_thumbnail))
  else:
    tiles = [1] * len(paths)
  prompts = [model.prompt_ids(q, n) for q, n in zip(questions, tiles)]
  prompt_len = max(len(p) for p in prompts)
  tile_budget = batch_size * max(tiles)
  answers: list[str] = []
  for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
    batch = prompts[start:start + batch_size]
    batch_paths = list(paths[start:start + batch_size])
    n = len(batch)
    if n < batch_size:
      batch = batch + [batch[-1]] * (batch_size - n)
      batch_paths += [batch_paths[-1]] * (batch_size - n)
    if dynamic:
      with ThreadPoolExecutor(4) as pool:  # PIL releases the GIL while decoding and resizing
        pixels = np.concatenate(list(pool.map(lambda p: chat_format.preprocess_image(
            sources.decode_image(p), geometry.image_size, max_num=max_num, use_thumbnail=geometry.use_thumbnail),
            batch_paths)))
    else:  # one squashed tile each: the evaluation loader (threaded)
      pixels = sources.load_images(batch_paths, geometry.image_size)
    if len(pixels) < tile_budget:  # fixed shapes; the model fills image tokens from the first tiles only
      pixels = np.concatenate([pixels, np.zeros((tile_budget - len(pixels),) + pixels.shape[1:], pixels.dtype)])
    answers += model.generate(pixels, batch, max_new_tokens, prompt_len, min_new_tokens=min_new_tokens)[:n]
  return answers


def run_caption(model: EvalModel, data: sources.ImageTextSet, data_name: str, *, batch_size: int = 16,
                max_new_tokens: int = 30, min_new_tokens: int = 8, prompt: str = CAPTION_PROMPT,
                tokenizer: str | None = None, dynamic: bool = False, max_num: int = 6,
                progress: bool = True) -> dict:
  """Greedy captions (InternVL's evaluate_caption.py: its prompt, 8 to 30 new tokens), scored with CIDEr-D and
  BLEU-4 (x100) against every reference caption of the image."""
  model.require("caption")
  tokenizer = tokenizer or captioning.default_tokenizer()  # PTB (Java) whenever it can run, as published
  refs = data.references()
  preds = _generate_all(model, data.image_paths, [prompt] * len(data.image_paths), batch_size, max_new_tokens,
                        min_new_tokens, progress, dynamic, max_num)
  keys = [str(i) for i in range(len(preds))]
  # an empty generation still has to be scored (as a miss): the scorers need a token
  scores = captioning.caption_scores(dict(zip(keys, refs)), {k: p or "<empty>" for k, p in zip(keys, preds)},
                                     tokenizer)
  picks = report.query_indices(len(preds), NUM_SAMPLES)
  samples = [{"image": data.image_paths[i], "prediction": preds[i], "references": refs[i]} for i in picks]
  return report.caption_result(data_name, len(preds), scores["CIDEr"], scores["BLEU-4"], samples,
                               tokenizer=tokenizer, model=model.name, prompt=prompt,
                               **_chat_protocol(model, min_new_tokens, max_new_tokens, dynamic, max_num))


def run_vqa(model: EvalModel, data: sources.VqaSet, data_name: str, *, batch_size: int = 16,
            max_new_tokens: int = 10, min_new_tokens: int = 1, suffix: str = VQA_SUFFIX, dynamic: bool = False,
            max_num: int = 6, progress: bool = True) -> dict:
  """Greedy short answers (InternVL's evaluate_vqa.py: the question, a space and the short-answer instruction;
  1 to 10 new tokens), scored with the official VQAv2 accuracy (percent)."""
  model.require("vqa")
  questions = [f"{q} {suffix}" if suffix else q for q in data.questions]
  preds = _generate_all(model, data.image_paths, questions, batch_size, max_new_tokens, min_new_tokens, progress,
                        dynamic, max_num)
  acc = vqa.vqa_accuracy(preds, data.answers)
  picks = report.query_indices(len(preds), NUM_SAMPLES)
  samples = [{"image": data.image_paths[i], "question": questions[i], "prediction": preds[i],
              "answers": data.answers[i]} for i in picks]
  return report.vqa_result(data_name, len(preds), acc, samples, model=model.name, prompt_suffix=suffix,
                           **_chat_protocol(model, min_new_tokens, max_new_tokens, dynamic, max_num))


def _chat_protocol(model: EvalModel, min_new: int, max_new: int, dynamic: bool, max_num: int) -> dict:
  """What the result JSON records of how a chat model was prompted and stopped."""
  fmt = model.chat
  return {"template": fmt.template or "chat_template (Jinja)", "system_message": fmt.system,
          "default_system_block": fmt.default_system_block if fmt.template else None,
          "stop_ids": list(fmt.stop_ids), "min_new_tokens": min_new, "max_new_tokens": max_new,
          "dynamic": dynamic, "max_num": max_num if dynamic else 1, "image_size": fmt.image_size}


def run_task(task: str, model: EvalModel, data_spec: str, *, out: str | None = None, batch_size: int = 64,
             classnames: str | None = None, templates: str | None = None, vqa_suffix: str | None = None,
             max_new_tokens: int | None = None, cache_dir: str | None = None, progress: bool = True,
             dynamic: bool = False, max_num: int = 6, train_data: str | None = None,
             weight_decays: Sequence[float] | None = None, probe_epochs: int = attention_probe.EPOCHS,
             probe_batch_size: int = attention_probe.BATCH_SIZE, probe_lr: float = attention_probe.BASE_LR,
             stream=sys.stdout) -> dict:
  """Loads `data_spec` for `task` (and, for the probes, `train_data`: their train split), evaluates, prints the
  markdown table, writes `out` (JSON) and, for retrieval and zeroshot, a PNG gallery beside it (same name, .png).
  Returns the result dict."""
  if task not in TASKS:
    raise ValueError(f"--task {task!r} is not one of {', '.join(TASKS)}")
  if task in PROBE_TASKS and not train_data:
    raise ValueError(f"--task {task} trains on --train_data SOURCE (its train split) and scores --data")
  model.require(task)
  start = time.time()
  data = datasets.load(data_spec, task, model.image_size, cache_dir)
  is_demo = datasets.parse(data_spec)[0] == "demo"
  gallery = os.path.splitext(out)[0] + ".png" if out else None
  if task == "retrieval":
    result, res, texts = run_retrieval(model, data, data_spec, batch_size=batch_size, progress=progress)
    if gallery:
      report.retrieval_gallery(gallery, data.image_paths, texts, data.txt2img, res.i2t_topk, res.t2i_topk,
                               image_groups=data.groups)
  elif task == "zeroshot":
    # the demo's classes are its captions: the model never saw photo-style templates, so the bare name is its prompt
    tmpl = zeroshot.load_templates(templates) if templates else (["{}"] if is_demo else None)
    names = zeroshot.load_classnames(classnames) if classnames else None
    result, top, logits, names, labels = run_zeroshot(model, data, data_spec, classnames=names, templates=tmpl,
                                                      batch_size=batch_size, progress=progress)
    if gallery:
      report.zeroshot_gallery(gallery, data.image_paths, labels, names, top, logits)
  elif task in PROBE_TASKS:
    train = datasets.load(train_data, task, model.image_size, cache_dir, split="train")
    names = zeroshot.load_classnames(classnames) if classnames else None
    if task == "linear_probe":
      result = run_linear_probe(model, train, data, data_spec, train_data, classnames=names,
                                weight_decays=weight_decays, batch_size=batch_size, progress=progress)
    else:
      result = run_attention_probe(model, train, data, data_spec, train_data, classnames=names,
                                   batch_size=batch_size, epochs=probe_epochs, probe_batch_size=probe_batch_size,
                                   base_lr=probe_lr, progress=progress)
  elif task == "caption":
    kw = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if max_new_tokens is not None and max_new_tokens < 8:  # the published minimum cannot exceed the maximum
      kw["min_new_tokens"] = max_new_tokens
    result = run_caption(model, data, data_spec, batch_size=batch_size, progress=progress, dynamic=dynamic,
                         max_num=max_num, **kw)
  else:
    # the demo's questions were trained without InternVL's short-answer instruction
    suffix = vqa_suffix if vqa_suffix is not None else ("" if is_demo else VQA_SUFFIX)
    kw = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    result = run_vqa(model, data, data_spec, batch_size=batch_size, suffix=suffix, progress=progress,
                     dynamic=dynamic, max_num=max_num, **kw)
  result["seconds"] = round(time.time() - start, 2)
  result.update(placement.describe(model.model, model.mesh))  # dtype, mesh, parameter bytes per device
  report.validate_result(result)
  print(report.result_table(result), file=stream, flush=True)
  if out:
    report.write_json(out, result)
    print(f"wrote {out}" + (f" and {gallery}" if gallery and task in ("retrieval", "zeroshot") else ""),
          file=stream, flush=True)
  return result
