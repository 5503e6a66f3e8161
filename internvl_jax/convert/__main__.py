"""Command line:

  python -m internvl_jax.convert import <hf_dir> <out_dir> [--dtype float32]
      a Hugging Face folder (any family load_pretrained reads) -> our Orbax checkpoint (layout: orbax_io.py),
      which train.py accepts as config.init.path and `export` turns back into a transformers folder.
  python -m internvl_jax.convert export <src> <out_dir> [--layout native|opengvlab] [--dtype bfloat16]
      a train.py workdir, our checkpoint, or any folder load_pretrained reads (e.g. an OpenGVLab remote-code one)
      -> a complete folder (release.py): weights + config, tokenizer files, chat template, generation_config.json
      and the image processor's files; transformers-native (default) or OpenGVLab's InternVLChatModel layout.
      A LoRA run is written with its adapters merged, or with --adapter_only as a peft adapter folder.
"""

from __future__ import annotations

import argparse
import sys

from internvl_jax.convert import orbax_io, release
from internvl_jax.convert.configs import ConversionError
from internvl_jax.convert.loader import load_pretrained


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m internvl_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face folder -> our Orbax checkpoint")
  imp.add_argument("src")
  imp.add_argument("out_dir")
  imp.add_argument("--dtype", default="float32", help="parameter and compute dtype (default float32)")
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
      model = load_pretrained(args.src, dtype=args.dtype)
      where = orbax_io.save_checkpoint(model, args.out_dir)
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
