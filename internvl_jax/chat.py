"""Chat with a model in the terminal, the answer printed as it is generated.

  python -m internvl_jax.chat --hf FOLDER | --workdir DIR [--image PATH ...] [--system TEXT] [--prompt TEXT]
                              [--max_new_tokens N] [--temperature T] [--top_p P] [--repetition_penalty R]
                              [--video PATH [--num_frames 8]] [--dtype bfloat16] [--mesh fsdp=N]
                              [--quantize int8|int4] [--seed S]

With --prompt: one answer, printed to stdout, then exit. Without: a conversation read from stdin, one message per
line, the history kept as the model's released template writes it; commands `/image PATH` (attach an image to
the next message), `/video PATH` (a video: --num_frames frames, one tile each), `/reset` (forget history and
images), `/quit` (or end of input).

Everything model-specific is the existing machinery: loading (evaluate/models.py: a released folder or a train.py
workdir), the prompt, image tiles, stop ids and answer extraction (data/chat_format.ChatFormat, as the official
chat() does), token-by-token generation (stream.py, generate.py's sampler). Images attached to a message get
`<image>\\n` in front of it (`Image-1: <image>\\n...` for several, `Frame-1: <image>\\n...` for a video's frames,
as the official multi-image and video examples write), unless the message writes its own `<image>` placeholders.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterator

import jax
import numpy as np

from internvl_jax import stream as stream_lib
from internvl_jax.data import chat_format as chat_format_lib
from internvl_jax.data import templates

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete multi-byte character


class Conversation:
  """A chat with one model: history (question as written into the template, answer), the images so far (in the
  order their placeholders appear) and those attached to the next message."""

  def __init__(self, model, fmt: chat_format_lib.ChatFormat, *, max_new_tokens: int = 512, temperature: float = 0.0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0):
    self.model, self.fmt = model, fmt
    self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         repetition_penalty=repetition_penalty)
    self.seed = seed
    self.reset()

  def reset(self) -> None:
    self.history: list[tuple[str, str]] = []
    self.tiles: list[np.ndarray] = []  # per image of the conversation (a video frame is one image), in order
    self.pending: list[tuple[str, list[np.ndarray]]] = []  # ('image' | 'video', tiles per image) for the next message
    self.last_input_ids = None  # the last prompt's ids [1, T] (for inspection)
    self.last_num_tokens, self.tokens_per_second = 0, 0.0  # of the last answer (prefill and compiling included)

  def _check_attach(self, path: str, what: str) -> None:
    if not (os.path.isfile(path) if what == "image" else os.path.exists(path)):
      raise FileNotFoundError(f"{what} {path} does not exist; give the path of an {what} file"
                              + (" or a folder of frame images" if what == "video" else ""))
    if self.fmt.jinja is not None and self.history:
      raise ValueError("this model's chat template (a transformers-native -hf folder) places images in the first "
                       "message only; /reset and attach the image before the first message")

  def attach(self, path: str) -> None:
    """Attaches an image file to the next message: dynamic tiles [N, S, S, 3] as the release's chat() makes them."""
    self._check_attach(path, "image")
    fmt = self.fmt
    self.pending.append(("image", [chat_format_lib.preprocess_image(path, fmt.image_size, max_num=fmt.max_num,
                                                                    use_thumbnail=fmt.use_thumbnail)]))

  def attach_video(self, path: str, num_frames: int = 8) -> None:
    """Attaches a video (a file PyAV decodes, or a folder of frame images) to the next message: num_frames frames
    from the middles of equal segments (the official data reader's 'middle' rule, data/visual.py; the chat
    example's get_index can pick a frame one earlier or later), one tile each as that example makes them."""
    from internvl_jax.data import transforms, visual  # local: video decoding is needed only here
    self._check_attach(path, "video")
    try:
      frames, _ = visual.video_frames(path, num_frames, None)
    except transforms.BadRecord as e:
      raise ValueError(str(e)) from None
    self.pending.append(("video", [chat_format_lib.preprocess_image(np.asarray(f), self.fmt.image_size, max_num=1)
                                   for f in frames]))

  def _written(self, question: str) -> str:
    return place_images(question, [(kind, len(tiles)) for kind, tiles in self.pending])

  def ask(self, question: str) -> Iterator[str]:
    """Yields the answer's text in pieces as tokens arrive (multi-byte characters whole, the answer stripped as
    ChatFormat.answer strips it); then adds the turn to the history."""
    written = self._written(question)
    tiles = self.tiles + [t for _, group in self.pending for t in group]
    input_ids = np.asarray([self.fmt.input_ids(written, [len(t) for t in tiles], self.history)], np.int32)
    self.last_input_ids = input_ids
    pixels = np.concatenate(tiles) if tiles else None
    key = jax.random.key(self.seed + len(self.history))
    ids, shown = [], ""
    start = time.perf_counter()
    for tok in stream_lib.stream(self.model, input_ids[0], pixels, stop_ids=list(self.fmt.stop_ids), key=key,
                                 **self.settings):
      ids.append(tok)
      text = self._showable(ids)
      if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
        shown = text
    self.last_num_tokens, self.tokens_per_second = len(ids), len(ids) / max(time.perf_counter() - start, 1e-9)
    answer = self.fmt.answer(ids)
    if answer.startswith(shown) and len(answer) > len(shown):
      yield answer[len(shown):]
    self.history.append((written, answer))
    self.tiles, self.pending = tiles, []

  def _showable(self, ids: list[int]) -> str:
    return showable(self.fmt, ids)


def place_images(question: str, attached: list[tuple[str, int]]) -> str:
  """The question as it goes into the template, with placeholders in front for the images and videos attached to
  it: attached lists ('image' | 'video', number of images: 1 for an image, frames for a video) in order ->
  `<image>\\n` for one image, `Image-k: <image>\\n` for several, `Frame-k: <image>\\n` per video frame (the official
  multi-image and video examples). A question that writes its own `<image>` placeholders is left as it is."""
  if not attached or templates.IMAGE_PLACEHOLDER in question:
    return question
  images = sum(kind == "image" for kind, _ in attached)
  prefix, k = "", 0
  for kind, count in attached:
    if kind == "video":
      prefix += "".join(f"Frame-{i + 1}: {templates.IMAGE_PLACEHOLDER}\n" for i in range(count))
    else:
      k += 1
      prefix += f"{templates.IMAGE_PLACEHOLDER}\n" if images == 1 else f"Image-{k}: {templates.IMAGE_PLACEHOLDER}\n"
  return prefix + question


def showable(fmt: chat_format_lib.ChatFormat, ids: list[int]) -> str:
  """The answer of generated ids so far, minus what may still change: an incomplete character at the end, a
  partial template stop string."""
  text = fmt.answer(ids).rstrip(REPLACEMENT)
  if fmt.template is not None:
    stop = templates.stop_string(fmt.template)
    for k in range(len(stop) - 1, 0, -1):
      if text.endswith(stop[:k]):
        return text[:-k]
  return text


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The model-loading options shared by chat and serve: --hf | --workdir, --system, --dtype, --mesh, --quantize."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf", help="a local Hugging Face chat folder, as released (OpenGVLab or -hf layout)")
  src.add_argument("--workdir", help="a train.py workdir with a stage-3 (instruct) run")
  p.add_argument("--system", default=None, help="system message (default: the model's)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--mesh", default=None, help="lay the weights out over all devices, e.g. fsdp=8 or fsdp=4,tensor=2 "
                 "(axes data, fsdp, expert, tensor; as eval.py)")
  p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                 help="weight-only quantization of the language model (quantize.py: less memory, not more accuracy)")


def load_model(args):
  """(model, chat format) from --hf / --workdir as eval.py's chat tasks load them, laid out on --mesh, the
  language model's weights quantized with --quantize, the system message replaced by --system."""
  from internvl_jax import quantize as quantize_lib  # local: pulls in qwix
  from internvl_jax.evaluate import models, placement  # local: pulls in the converters
  mesh = placement.make_mesh(args.mesh)
  m = (models.load_hf(args.hf, dtype=args.dtype, mesh=mesh) if args.hf
       else models.load_workdir(args.workdir, "vqa", dtype=args.dtype, mesh=mesh))
  m.require("vqa")  # a chat model, or one line naming what it is
  fmt = m.chat if args.system is None else dataclasses.replace(m.chat, system=args.system)
  model = m.model if args.quantize is None else quantize_lib.quantize(m.model, args.quantize)
  return model, fmt


def load(args) -> Conversation:
  """The Conversation of load_model(args) with the sampling settings of the command line."""
  model, fmt = load_model(args)
  return Conversation(model, fmt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _say(conv: Conversation, question: str, out) -> None:
  for piece in conv.ask(question):
    out.write(piece)
    out.flush()
  out.write("\n")
  out.flush()


def interact(conv: Conversation, stdin, stdout, stderr, num_frames: int = 8) -> None:
  """Reads messages and /commands from stdin until /quit or its end; answers go to stdout, notes to stderr."""
  tty = stdin.isatty()
  while True:
    if tty:
      stdout.write("> ")
      stdout.flush()
    line = stdin.readline()
    if not line:
      return
    line = line.strip()
    if not line:
      continue
    if line == "/quit":
      return
    if line == "/reset":
      conv.reset()
      print("(history and images cleared)", file=stderr)
    elif line.split()[0] in ("/image", "/video"):
      command, _, path = line.partition(" ")
      try:
        conv.attach(path.strip()) if command == "/image" else conv.attach_video(path.strip(), num_frames)
        print(f"({command[1:]} {path.strip()} attached to the next message)", file=stderr)
      except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=stderr)
    elif line.startswith("/"):
      print(f"error: unknown command {line.split()[0]}; the commands are /image PATH, /video PATH, /reset, /quit",
            file=stderr)
    else:
      _say(conv, line, stdout)
      if tty:
        print(f"({conv.last_num_tokens} tokens, {conv.tokens_per_second:.1f} tokens/s)", file=stderr)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m internvl_jax.chat", description=__doc__.split("\n\n")[0])
  add_model_args(p)
  p.add_argument("--image", action="append", default=[], help="an image for the first message (repeatable)")
  p.add_argument("--video", default=None, help="a video file (or a folder of frames) for the first message")
  p.add_argument("--num_frames", type=int, default=8, help="frames sampled from --video / /video (official: 8)")
  p.add_argument("--prompt", default=None, help="answer this one message and exit")
  p.add_argument("--max_new_tokens", type=int, default=512)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0 = off (transformers' rule)")
  p.add_argument("--seed", type=int, default=0, help="sampling key (with --temperature > 0)")
  return p


def run(args, stdin=None, stdout=None, stderr=None) -> Conversation:
  """Loads the model and answers --prompt, or converses over stdin; returns the conversation."""
  stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
  conv = load(args)
  for path in args.image:
    conv.attach(path)
  if args.video:
    conv.attach_video(args.video, args.num_frames)
  if args.prompt is not None:
    _say(conv, args.prompt, stdout)
  else:
    interact(conv, stdin, stdout, stderr, args.num_frames)
  return conv


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    run(args)
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
