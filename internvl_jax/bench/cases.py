"""The benchmark cases: names, shapes and model configs, for the full run and for --dry-run.

A case is described once here (a `Spec`); jax_side.py and torch_side.py each build their own program from the
same Spec, and flops.py counts its FLOPs, so the two frameworks always run the same shapes.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from internvl_jax.bench import flops
from internvl_jax.models import presets


@dataclasses.dataclass
class Settings:
  """Run-wide choices that shape every case (from the command line)."""
  platform: str = "cpu"  # jax.default_backend(): cpu | gpu | tpu
  dry_run: bool = False
  batch: int | None = None  # overrides every case's batch
  dtype: str | None = None  # default: float32 on CPU, bfloat16 elsewhere
  attention_impl: str | None = None  # default: xla on CPU, auto (cuDNN flash where it can) on GPU
  remat: str | None = None  # overrides the remat policy of the training cases

  @property
  def compute_dtype(self) -> str:
    return self.dtype or ("float32" if self.platform == "cpu" else "bfloat16")

  @property
  def attention(self) -> str:
    return self.attention_impl or ("xla" if self.platform == "cpu" else "auto")


@dataclasses.dataclass
class Spec:
  """One case with its shapes resolved. kind: vit_fwd | vit_train | vit_fwdbwd | chat_prefill | chat_decode |
  moe_fwd | moe_fwdbwd (a Qwen3-MoE decoder stack, no embedding or LM head: `text` is its config, `text_len`
  its sequence length)."""
  name: str
  kind: str
  unit: str  # what items_per_s counts: images | tokens
  batch: int
  image_size: int
  vision: ml_collections.ConfigDict | None
  text: ml_collections.ConfigDict | None = None  # vit_train: the text tower
  chat: ml_collections.ConfigDict | None = None  # chat_*: the chat model config
  text_len: int = 0  # vit_train: caption tokens; chat_*: text tokens of the prompt besides the image tokens
  new_tokens: int = 0  # chat_decode: tokens generated per timed call
  embed_dim: int = 0  # vit_train: shared embedding width
  gpu_only: bool = False
  repeats: int = 5  # default timed repeats (the command line may override)

  @property
  def main_config(self) -> ml_collections.ConfigDict:
    """The config whose dtype / remat the case runs with (the vision tower's, or the decoder's for moe_*)."""
    return self.vision if self.vision is not None else self.text

  @property
  def prompt_len(self) -> int:
    """chat_*: prompt length in tokens (one tile of image tokens + text)."""
    return flops.chat_image_tokens(self.chat, self.image_size) + self.text_len

  @property
  def items_per_call(self) -> int:
    if self.kind == "chat_prefill":
      return self.batch * self.prompt_len
    if self.kind == "chat_decode":
      return self.batch * self.new_tokens
    if self.kind in ("moe_fwd", "moe_fwdbwd"):
      return self.batch * self.text_len
    return self.batch

  @property
  def flops_per_call(self) -> float:
    """Analytic model FLOPs of one timed call (flops.py conventions)."""
    if self.kind == "vit_fwd":
      return self.batch * flops.vit_forward_flops(self.vision, self.image_size)
    if self.kind == "vit_fwdbwd":
      return 3.0 * self.batch * flops.vit_forward_flops(self.vision, self.image_size)
    if self.kind == "vit_train":
      return 3.0 * self.batch * flops.contrastive_forward_flops(self.vision, self.image_size, self.text,
                                                                self.text_len, self.embed_dim)
    if self.kind == "chat_prefill":
      return self.batch * flops.chat_prefill_flops(self.chat, self.image_size, self.text_len)
    if self.kind == "chat_decode":
      return self.batch * flops.decode_flops(self.chat.language, self.prompt_len, self.new_tokens)
    if self.kind in ("moe_fwd", "moe_fwdbwd"):  # active parameters only (flops.decoder_matmul_params), causal
      fwd = self.batch * flops.decoder_sequence_flops(self.text, self.text_len, causal=True, logits_positions=0)
      return fwd if self.kind == "moe_fwd" else 3.0 * fwd
    raise ValueError(f"unknown case kind {self.kind!r}")


# name -> (kind, full-size parameters, gpu_only). Batches are (cpu, accelerator); on an accelerator the batch
# is sized so one call has ~32k ViT tokens (enough to fill an H100) and the whole GPU script stays under 8 min.
CASES = {
    "internvit_300m_fwd_224": dict(kind="vit_fwd", vision="internvit_300m", image=224, batch=(8, 128)),
    "internvit_300m_fwd_448": dict(kind="vit_fwd", vision="internvit_300m", image=448, batch=(2, 32)),
    "internvit_300m_train_224": dict(kind="vit_train", vision="internvit_300m", image=224, batch=(8, 128),
                                     repeats=3),
    "internvit_300m_train_448": dict(kind="vit_train", vision="internvit_300m", image=448, batch=(2, 32),
                                     gpu_only=True),
    "internvit_6b_fwdbwd_224": dict(kind="vit_fwdbwd", vision="internvit_6b", image=224, batch=(1, 16),
                                    gpu_only=True, remat="dots_no_batch"),
    "chat_tiny_prefill": dict(kind="chat_prefill", chat="tiny", text_len=32, batch=(8, 64)),
    "chat_tiny_decode": dict(kind="chat_decode", chat="tiny", text_len=32, new_tokens=32, batch=(8, 64)),
    "chat_1b_prefill": dict(kind="chat_prefill", chat="internvl2_1b_like", text_len=32, batch=(2, 32)),
    "chat_1b_decode": dict(kind="chat_decode", chat="internvl2_1b_like", text_len=32, new_tokens=32,
                           batch=(4, 64)),
    # InternVL3.5-30B-A3B's language model (Qwen3-30B-A3B) cut to a few decoder layers: (cpu, accelerator) layers,
    # experts and sequence length. On CPU 16 of the 128 experts (each the real shape; top-8, so the same active
    # FLOPs per token): XLA:CPU runs ragged_dot as a dense masked matmul over every expert (models/moe.py), and
    # with 128 experts one 8-token layer took 18 s there.
    "qwen3_moe_30b_a3b_fwd": dict(kind="moe_fwd", language="qwen3_30b_a3b", layers=(1, 4), experts=(16, 128),
                                  seq=(32, 2048), batch=(1, 8)),
    "qwen3_moe_30b_a3b_fwdbwd": dict(kind="moe_fwdbwd", language="qwen3_30b_a3b", layers=(1, 2),
                                     experts=(16, 128), seq=(32, 2048), batch=(1, 4), gpu_only=True, repeats=3),
}

# The contrastive train step's text tower: BERT-base-sized (the seed_300m preset's), bidirectional, 32 tokens.
TEXT_TOWER, TEXT_LEN, EMBED_DIM = "bert_base", 32, 768

# Case groups accepted by --cases.
GROUPS = {
    "all": list(CASES),
    "cpu": [n for n, c in CASES.items() if not c.get("gpu_only")],
    # Priority order: the H100 targets first, so a deadline cuts the least important cases.
    "gpu": ["internvit_300m_train_448", "internvit_6b_fwdbwd_224", "internvit_300m_fwd_224", "internvit_300m_fwd_448",
            "internvit_300m_train_224", "qwen3_moe_30b_a3b_fwd", "qwen3_moe_30b_a3b_fwdbwd", "chat_1b_decode",
            "chat_1b_prefill", "chat_tiny_decode", "chat_tiny_prefill"],
}
assert sorted(GROUPS["gpu"]) == sorted(CASES), "the GPU group must list every case"


def resolve_names(requested: list[str] | None, platform: str, dry_run: bool) -> list[str]:
  """Expands groups and checks names. Default: every case in a dry run, the GPU group (priority order) on an
  accelerator, the CPU group on CPU (the 6B tower does not fit a CPU run's time)."""
  if not requested:
    requested = ["all"] if dry_run else (["cpu"] if platform == "cpu" else ["gpu"])
  names: list[str] = []
  for item in requested:
    for name in item.split(","):
      name = name.strip()
      if not name:
        continue
      expanded = GROUPS.get(name, [name])
      for n in expanded:
        if n not in CASES:
          raise ValueError(f"unknown case {n!r}; choose from {sorted(CASES)} or a group {sorted(GROUPS)}")
        if n not in names:
          names.append(n)
  return names


def _vision(name: str, settings: Settings, image_size: int, remat: str) -> ml_collections.ConfigDict:
  if settings.dry_run:
    # Tiny tower; the 6B case keeps the 6B block type (RMSNorm, QK-norm, no qkv bias) to exercise that path.
    cfg = presets.vision("tiny")
    if name.startswith("internvit_6b"):
      cfg.norm_type, cfg.qkv_bias, cfg.qk_norm = "rms_norm", False, True
  else:
    cfg = presets.vision(name)
  cfg.image_size = image_size  # position table at the benchmark size on both sides: no resize in the timed path
  cfg.dtype, cfg.attention_impl = settings.compute_dtype, settings.attention
  cfg.remat = settings.remat or remat
  return cfg


def _language(name: str, settings: Settings) -> ml_collections.ConfigDict:
  cfg = presets.language("tiny" if settings.dry_run else name)
  cfg.dtype, cfg.attention_impl = settings.compute_dtype, settings.attention
  return cfg


def _moe_language(c: dict, settings: Settings, gpu: bool) -> ml_collections.ConfigDict:
  """The case's MoE decoder: `layers` layers of the preset (tiny with 8 experts, top-2, QK-norm in a dry run),
  no LM head, a 16-token vocabulary (the embedding is never used: inputs are embeddings)."""
  if settings.dry_run:
    cfg = presets.language("tiny")
    cfg.update(num_layers=1, num_experts=8, num_experts_per_tok=2, moe_mlp_dim=16, norm_topk_prob=True,
               qk_norm=True, norm_eps=1e-6)
  else:
    cfg = presets.language(c["language"])
    cfg.update(num_layers=c["layers"][1 if gpu else 0], num_experts=c["experts"][1 if gpu else 0])
  cfg.update(lm_head=False, tie_embeddings=False, vocab_size=16)
  cfg.dtype, cfg.attention_impl = settings.compute_dtype, settings.attention
  cfg.remat = settings.remat or "none"
  return cfg


def build_spec(name: str, settings: Settings) -> Spec:
  """Resolves a case name into shapes and configs for this platform (full size, or tiny with --dry-run)."""
  c = CASES[name]
  gpu = settings.platform != "cpu"
  batch = settings.batch or (2 if settings.dry_run else c["batch"][1 if gpu else 0])
  repeats = 1 if settings.dry_run else c.get("repeats", 5 if not gpu else 10)
  common = dict(name=name, kind=c["kind"], batch=batch, gpu_only=c.get("gpu_only", False), repeats=repeats)
  if c["kind"] in ("moe_fwd", "moe_fwdbwd"):
    return Spec(unit="tokens", image_size=0, vision=None, text=_moe_language(c, settings, gpu),
                text_len=8 if settings.dry_run else c["seq"][1 if gpu else 0], **common)
  if c["kind"] in ("vit_fwd", "vit_train", "vit_fwdbwd"):
    image = (56 if c["image"] == 224 else 112) if settings.dry_run else c["image"]
    vision = _vision(c["vision"], settings, image, c.get("remat", "none"))
    spec = Spec(unit="images", image_size=image, vision=vision, **common)
    if c["kind"] == "vit_train":
      text = _language(TEXT_TOWER, settings)
      text.causal, text.lm_head = False, False
      spec.text, spec.text_len = text, (8 if settings.dry_run else TEXT_LEN)
      spec.embed_dim = 16 if settings.dry_run else EMBED_DIM
    return spec
  chat = presets.chat("tiny" if settings.dry_run else c["chat"])
  for sub in (chat.vision, chat.language):
    sub.dtype, sub.attention_impl = settings.compute_dtype, settings.attention
  new_tokens = min(c.get("new_tokens", 0), 4) if settings.dry_run else c.get("new_tokens", 0)
  text_len = min(c["text_len"], 8) if settings.dry_run else c["text_len"]
  return Spec(unit="tokens", image_size=chat.vision.image_size, vision=chat.vision, chat=chat, text_len=text_len,
              new_tokens=new_tokens, **common)
