"""Command line:

  python -m internvl_jax.convert import <hf_dir> <out_dir> [--dtype float32] [--overwrite] [--strict]
      a Hugging Face folder (any family load_pretrained reads) -> our Orbax checkpoint (layout: orbax_io.py),
      which train.py accepts as config.init.path and `export` turns back into a transformers folder. A non-empty
      out_dir is refused unless --overwrite, which replaces it whole once the new checkpoint is complete;
      tensors holding NaN / Inf are named in a warning, or refused with --strict.
  python -m internvl_jax.convert export <src> <out_dir> [--layout native|opengvlab] [--dtype bfloat16]
      a train.py workdir, our checkpoint, or any folder load_pretrained reads (e.g. an OpenGVLab remote-code one)
      -> a complete folder (release.py): weights + config, tokenizer files, chat template, generation_config.json
      and the image processor's files; transformers-native (default) or OpenGVLab's InternVLChatModel layout.
      A LoRA run is written with its adapters merged, or with --adapter_only as a peft adapter folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from internvl_jax.convert import orbax_io, release
from internvl_jax.convert.configs import ConversionError
from internvl_jax.convert.loader import load_pretrained


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.isfile(out_dir):
    raise ConversionError(f"{out_dir} is a file; give a folder to write the checkpoint in")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ConversionError(f"{out_dir} is not empty; give a new folder, or pass --overwrite to replace it")


def _replace_dir(out_dir: str, write) -> str:
  """Runs write(tmp) into a sibling temporary folder, then puts it in place of out_dir: out_dir holds either its
  old content or the complete new one, never a mix, and the old content is kept if writing fails."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.new-", dir=parent)
  try:
    where = write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    os.rename(out_dir, os.path.join(old, "x"))
  os.rename(tmp, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return os.path.join(out_dir, os.path.relpath(where, tmp))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m internvl_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face folder -> our Orbax checkpoint")
  imp.add_argument("src")
  imp.add_argument("out_dir")
  imp.add_argument("--dtype", default="float32", help="parameter and compute dtype (default float32)")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty out_dir (the old folder is removed only after the new one is written)")
  imp.add_argument("--strict", action="store_true", help="refuse a checkpoint with NaN / Inf weights")
  exp = sub.add_parser("export", help="a train.py workdir, our checkpoint or a model folder -> a complete folder")
  exp.add_argument("src")
  exp.add_argument("out_dir")
  exp.add_argument("--layout", default="native", choices=release.LAYOUTS,
                   help="native: transformers (InternVLForConditionalGeneration, ...); opengvlab: InternVLChatModel")
  exp.add_argument("--adapter_only", action="store_true",
                   help="a LoRA run as a peft adapter (adapter_model.safetensors + adapter_config.json) for the "
                        "transformers model of its base; default: the adapters merged into the weights")
  exp.add_argument("--dtype", default=None, help="cast tensors (float32 | bfloat16 | float16); default: as stored")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      if not os.path.isdir(args.src):  # the source first: a typo there matters more than a full OUT
        raise ConversionError(f"{args.src} does not exist or is not a folder; give a Hugging Face model folder")
      _check_out_dir(args.out_dir, args.overwrite)
      model = load_pretrained(args.src, dtype=args.dtype, strict=args.strict)
      where = _replace_dir(args.out_dir, lambda tmp: orbax_io.save_checkpoint(model, tmp))
      print(f"wrote {orbax_io.model_kind(model)} checkpoint {where}")
    else:
      model, tok, chat, run_config = release.load_source(args.src)
      written = release.write_release(model, args.out_dir, tokenizer=tok, chat=chat, layout=args.layout,
                                      dtype=args.dtype, adapter_only=args.adapter_only, run_config=run_config)
      print(f"wrote {args.out_dir} ({args.layout} layout): {', '.join(written)}")
      if tok is None:
        print("note: the source holds no tokenizer files; add the tokenizer before using the folder")
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
