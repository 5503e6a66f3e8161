"""Tensor transforms between PyTorch checkpoint layouts and ours, one small object per kind of change.

Each transform knows three things, so that one definition serves loading, saving and error messages:
  load(*sources) -> ours        source tensors (PyTorch layout, numpy) -> our array (one layer)
  save(ours) -> tuple(sources)  the inverse (None where a layout is read-only, e.g. InternLM2's wqkv)
  source_shapes(ours_shape)     the shapes the checkpoint must hold for a given target shape
All functions work on numpy arrays of any dtype (including ml_dtypes.bfloat16) and never copy more than needed.
"""

from __future__ import annotations

import numpy as np


class Identity:
  """Same layout (norm scales, biases, layer scales, embeddings)."""
  arity = 1

  def load(self, x):
    return x

  def save(self, y):
    return (y,)

  def source_shapes(self, shape):
    return (tuple(shape),)


class Linear:
  """torch Linear weight [out, in] <-> our kernel [in, out]."""
  arity = 1

  def load(self, w):
    return np.ascontiguousarray(w.T)

  def save(self, k):
    return (np.ascontiguousarray(k.T),)

  def source_shapes(self, shape):
    return (tuple(shape[::-1]),)


class Conv:
  """torch Conv2d weight [out, in, kh, kw] <-> our kernel [kh, kw, in, out]."""
  arity = 1

  def load(self, w):
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))

  def save(self, k):
    return (np.ascontiguousarray(k.transpose(3, 2, 0, 1)),)

  def source_shapes(self, shape):
    kh, kw, cin, cout = shape
    return ((cout, cin, kh, kw),)


class FuseLinear:
  """n equal torch Linear weights [out/n, in] (e.g. q, k, v) <-> one fused kernel [in, out] (q, k, v columns)."""

  def __init__(self, n: int):
    self.arity = n

  def load(self, *ws):
    return np.ascontiguousarray(np.concatenate(ws, axis=0).T)

  def save(self, k):
    return tuple(np.ascontiguousarray(p.T) for p in np.split(k, self.arity, axis=1))

  def source_shapes(self, shape):
    d_in, d_out = shape
    return ((d_out // self.arity, d_in),) * self.arity


class FuseBias:
  """n equal bias vectors [out/n] <-> one fused bias [out]."""

  def __init__(self, n: int):
    self.arity = n

  def load(self, *bs):
    return np.concatenate(bs, axis=0)

  def save(self, b):
    return tuple(np.split(b, self.arity, axis=0))

  def source_shapes(self, shape):
    return ((shape[0] // self.arity,),) * self.arity


class SliceRows:
  """One part of a fused torch Linear weight [n*out, in] -> our kernel [in, out] (read only).

  Used for OpenGVLab InternViT's fused `qkv` when our model keeps q, k, v apart (qkv_fused=False)."""
  arity = 1

  def __init__(self, part: int, parts: int, bias: bool = False):
    self.part, self.parts, self.bias = part, parts, bias
    self.save = None

  def load(self, w):
    piece = np.split(w, self.parts, axis=0)[self.part]
    return piece if self.bias else np.ascontiguousarray(piece.T)

  def source_shapes(self, shape):
    if self.bias:
      return ((shape[0] * self.parts,),)
    return ((shape[1] * self.parts, shape[0]),)


class InternLM2QKV:
  """InternLM2's fused `wqkv` -> our q, k or v kernel (read only).

  wqkv is [num_kv * (g + 2) * hd, D] with rows grouped per KV head: for KV head j, the g query heads
  j*g .. j*g+g-1, then k_j, then v_j (g = num_heads / num_kv). Query head h = j*g + i therefore sits in group j,
  slot i, which is also the head order our grouped-query attention expects (head h reads KV head h // g).
  """
  arity = 1

  def __init__(self, part: str, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False):
    if part not in ("q", "k", "v"):
      raise ValueError(f"InternLM2 wqkv part {part!r} is not 'q', 'k' or 'v'")
    self.part, self.num_heads, self.num_kv, self.hd, self.bias = part, num_heads, num_kv_heads, head_dim, bias
    self.groups = num_heads // num_kv_heads
    self.save = None

  def load(self, w):
    g = self.groups
    grouped = w.reshape((self.num_kv, g + 2, self.hd) + w.shape[1:])
    piece = {"q": grouped[:, :g], "k": grouped[:, g], "v": grouped[:, g + 1]}[self.part]
    piece = piece.reshape((-1,) + w.shape[1:])  # [heads * hd, D] or [heads * hd]
    return piece if self.bias else np.ascontiguousarray(piece.T)

  def source_shapes(self, shape):
    rows = self.num_kv * (self.groups + 2) * self.hd
    return ((rows,),) if self.bias else ((rows, shape[0]),)


def fuse_internlm2_wqkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, num_kv_heads: int,
                        head_dim: int) -> np.ndarray:
  """torch q [H*hd, D], k, v [Hkv*hd, D] -> InternLM2 `wqkv` [Hkv*(g+2)*hd, D]; the inverse of InternLM2QKV.
  Used by tests (and anyone writing an InternLM2 checkpoint) to build the interleaved layout."""
  g = num_heads // num_kv_heads
  rest = q.shape[1:]
  qs = q.reshape((num_kv_heads, g, head_dim) + rest)
  ks = k.reshape((num_kv_heads, 1, head_dim) + rest)
  vs = v.reshape((num_kv_heads, 1, head_dim) + rest)
  return np.concatenate([qs, ks, vs], axis=1).reshape((-1,) + rest)


class Rows:
  """Rows [start, stop) of a fused torch Linear weight [total, in] <-> our kernel [in, stop - start] (Phi-3's
  qkv_proj: q, k, v rows of unequal sizes; gate_up_proj: gate then up).

  Loading slices one part; saving is done by the saver, which gathers every Rows rule of one source tensor and
  writes the parts in row order (`fused_save` below), so `save` is None here."""
  arity = 1

  def __init__(self, start: int, stop: int, total: int):
    self.start, self.stop, self.total = start, stop, total
    self.save = None

  def load(self, w):
    return np.ascontiguousarray(w[self.start:self.stop].T)

  def source_shapes(self, shape):
    return ((self.total, shape[0]),)


class Interleaved:
  """Columns part, part + parts, ... (the last axis) of a fused tensor <-> one of our tensors: GPT-OSS's
  experts.gate_up_proj [E, D, 2I] holds gate in columns 0::2 and up in 1::2 (and its bias [E, 2I] alike), already
  [in, out] per expert. Like Rows, saving is the saver's (`fused_save` below puts the parts back in turn)."""
  arity = 1

  def __init__(self, part: int, parts: int):
    self.part, self.parts = part, parts
    self.save = None

  def load(self, w):
    return np.ascontiguousarray(w[..., self.part::self.parts])

  def source_shapes(self, shape):
    return (tuple(shape[:-1]) + (shape[-1] * self.parts,),)


# e2m1 (FP4) values by their 4-bit code: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP Microscaling formats)
FP4_VALUES = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                        np.float32)


class MXFP4:
  """GPT-OSS experts stored MXFP4 (openai/gpt-oss-*): `{name}_blocks` [E, R, G, 16] uint8 holding two FP4 codes
  per byte (low nibble first) and `{name}_scales` [E, R, G] uint8, a power of two per 32 values (exponent bias
  127), for the weight [E, R, G * 32] whose transpose [E, G * 32, R] is the unquantized `{name}` that `inner`
  reads. Read-only: saving writes the unquantized layout."""
  arity = 2

  def __init__(self, inner):
    self.inner = inner
    self.save = None

  def load(self, blocks, scales):
    b = np.asarray(blocks, np.uint8)
    values = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.float32)
    values[..., 0::2] = FP4_VALUES[b & 0x0F]
    values[..., 1::2] = FP4_VALUES[b >> 4]
    values = np.ldexp(values, np.asarray(scales).astype(np.int32)[..., None] - 127)
    w = values.reshape(b.shape[:-2] + (-1,))  # [..., R, G * 32]
    return self.inner.load(np.ascontiguousarray(np.swapaxes(w, -1, -2)))

  def source_shapes(self, shape):
    (full,) = self.inner.source_shapes(shape)  # [..., G * 32, R]
    *lead, cols, rows = full
    return tuple(lead) + (rows, cols // 32, 16), tuple(lead) + (rows, cols // 32)


FUSED = (Rows, Interleaved)  # transforms whose source tensor holds several of our parameters


def fused_save(parts: list[tuple[Rows | Interleaved, np.ndarray]]) -> np.ndarray:
  """(Rows, our kernel [in, rows]) for every part of one fused tensor -> the torch weight [total, in];
  (Interleaved, our piece [..., n]) for every part -> the fused tensor [..., n * parts]."""
  if isinstance(parts[0][0], Interleaved):
    parts = sorted(parts, key=lambda p: p[0].part)
    if [p[0].part for p in parts] != list(range(parts[0][0].parts)):
      raise ValueError(f"interleaved parts {[p[0].part for p in parts]} do not cover {parts[0][0].parts} parts")
    stacked = np.stack([np.asarray(x) for _, x in parts], axis=-1)  # [..., n, parts]: column c * parts + part
    return stacked.reshape(stacked.shape[:-2] + (-1,))
  parts = sorted(parts, key=lambda p: p[0].start)
  total = parts[0][0].total
  if [p[0].start for p in parts] != [0] + [p[0].stop for p in parts[:-1]] or parts[-1][0].stop != total:
    raise ValueError(f"fused parts {[(p[0].start, p[0].stop) for p in parts]} do not tile {total} rows")
  return np.concatenate([np.asarray(k).T for _, k in parts], axis=0)
