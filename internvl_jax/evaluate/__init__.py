"""Evaluators with the published protocols (DESIGN §7), as plain functions over arrays and callables:

  retrieval   caption preprocessing, batched embedding, blocked top-k cosine search, recall@1/5/10 both ways
  zeroshot    CLIP prompt templates + ImageNet-1k class names (package data), template-ensemble classifier, top-k
  captioning  CIDEr-D and BLEU-4 (pycocoevalcap scorers, Java-free tokenisation)
  vqa         VQAv2 answer normalisation and the 10-choose-9 annotator accuracy
  report      JSON result schemas, markdown tables, PNG galleries
  sources     readers for Flickr30K / COCO Karpathy test sets, class folders and JSONL records; image loading

Wiring (eval.py; train.py's in-loop retrieval calls retrieval directly):

  models      load a train.py workdir or an HF folder; jitted embeddings, greedy chat answers
  datasets    eval.py's --data strings (demo, jsonl, tfds, flickr30k, coco, class folders) -> the sets above
  run         the four tasks end to end: result JSON, markdown table, galleries
"""
