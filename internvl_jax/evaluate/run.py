"""The four evaluation tasks end to end on a loaded model (evaluate/models.py) and set (evaluate/datasets.py):
embed or generate in batches, score with the protocol modules, build the result JSON (report.py).

  result = run_retrieval(model, data, data_name, batch_size=64)   # likewise run_zeroshot / run_caption / run_vqa
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
from internvl_jax.evaluate import captioning, datasets, placement, report, retrieval, sources, vqa, zeroshot
from internvl_jax.evaluate.models import EvalModel

TASKS = ("retrieval", "zeroshot", "caption", "vqa")
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
             dynamic: bool = False, max_num: int = 6, stream=sys.stdout) -> dict:
  """Loads `data_spec` for `task`, evaluates, prints the markdown table, writes `out` (JSON) and, for retrieval
  and zeroshot, a PNG gallery beside it (same name, .png). Returns the result dict."""
  if task not in TASKS:
    raise ValueError(f"--task {task!r} is not one of {', '.join(TASKS)}")
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
