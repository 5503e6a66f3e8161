"""Checkpoint folders on disk: config.json, safetensors (single file or sharded with an index), nothing else.

Reading keeps one `safe_open` handle per file and hands out one tensor at a time (memory-mapped by safetensors),
so converting a model never holds more than the tensor in flight. Pickled weights (.bin / .pt / .pth) are refused:
unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from internvl_jax.convert.configs import ConversionError

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size ("5GB")


def read_config(folder: str) -> dict:
  """config.json of a checkpoint folder, with one-line errors for the usual mistakes."""
  if not os.path.isdir(folder):
    raise ConversionError(f"checkpoint folder {folder!r} does not exist (load_pretrained reads local folders only)")
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{folder!r} has no config.json; a Hugging Face-format folder needs one")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path} is not valid JSON: {e}") from None


def safetensors_files(folder: str) -> list[str]:
  """The safetensors files of a folder (from the index when there is one); refuses pickle-only folders."""
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
      raise ConversionError(f"{INDEX} lists files that are not in {folder!r}: {missing[:3]}")
    return [os.path.join(folder, n) for n in names]
  files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  if files:
    return [os.path.join(folder, n) for n in files]
  pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise ConversionError(
        f"{folder!r} holds only pickled weights ({', '.join(pickles[:3])}); they are not read because unpickling "
        "runs code stored in the file. Convert them once, in an environment you trust, with transformers: "
        "AutoModel.from_pretrained(folder).save_pretrained(out_dir, safe_serialization=True)")
  raise ConversionError(f"{folder!r} has no *.safetensors files")


class Checkpoint:
  """The tensors of a folder under canonical names (see keymaps.canonical_name).

  `shape(name)` reads the header only; `read(name)` returns one numpy array (bfloat16 via ml_dtypes)."""

  def __init__(self, folder: str, canonical: Callable[[str], str] = lambda n: n):
    self.folder = folder
    self._handles = {}
    self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file, name in file)
    for path in safetensors_files(folder):
      try:
        handle = safe_open(path, framework="numpy")
      except Exception as e:  # SafetensorError: a truncated or corrupt file (a download cut short)
        raise ConversionError(f"{path} cannot be read ({' '.join(str(e).split())}); the file is truncated or "
                              "corrupt: download it again") from None
      self._handles[path] = handle
      for name in handle.keys():
        key = canonical(name)
        if key in self._where:
          raise ConversionError(f"tensor {name!r} appears twice in {folder!r} (as {self._where[key][1]!r} too)")
        self._where[key] = (path, name)

  def names(self) -> set[str]:
    return set(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def disk_name(self, name: str) -> str:
    return self._where[name][1]

  def shape(self, name: str) -> tuple[int, ...]:
    path, disk = self._where[name]
    return tuple(self._handles[path].get_slice(disk).get_shape())

  def read(self, name: str) -> np.ndarray:
    # A fresh handle per tensor: safe_open memory-maps its file, and mapped pages that were read count as this
    # process's resident memory until the handle goes away. Reopening (a header parse) keeps the peak near one
    # tensor instead of growing to the whole checkpoint while a model loads.
    path, disk = self._where[name]
    try:
      with safe_open(path, framework="numpy") as f:
        return f.get_tensor(disk)
    except Exception as e:  # a data region cut short after a header that parsed
      raise ConversionError(f"tensor {disk!r} of {path} cannot be read ({' '.join(str(e).split())}); the file is "
                            "truncated or corrupt: download it again") from None

  def close(self) -> None:
    self._handles.clear()  # safe_open handles release their mmap when garbage collected

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_safetensors(out_dir: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `model.safetensors`, or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` when the
  total exceeds max_shard_bytes. `tensors`: (name, shape, dtype, make) with `make()` producing the array, called
  only while its shard is written, so memory holds at most one shard. Returns the files written."""
  entries = list(tensors)
  shards: list[list] = [[]]
  size = 0
  total = 0
  for entry in entries:
    nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
    total += nbytes
  os.makedirs(out_dir, exist_ok=True)
  n = len(shards)
  names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  weight_map = {}
  for fname, shard in zip(names, shards):
    arrays = {}
    for name, shape, dtype, make in shard:
      arr = np.asarray(make(), order="C")  # not ascontiguousarray: it turns 0-d scalars into [1]
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, planned {shape} {dtype}")
      arrays[name] = arr
      weight_map[name] = fname
    save_file(arrays, os.path.join(out_dir, fname), metadata={"format": "pt"})
    del arrays
  if n > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
  return [os.path.join(out_dir, f) for f in names]
