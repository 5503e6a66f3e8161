"""The OpenAI chat-completions request for the server: checked, turned into a prompt (the model's released template
through data/chat_format.ChatFormat, as chat.py writes a conversation) and the answer's text cut at `stop` strings.

  req = parse(body, fmt, limits)      # RequestError (status, one-line message) for anything wrong
  req.ids [T] int32, req.pixels [N, S, S, 3] float32 | None, req.max_tokens, req.temperature, req.top_p, req.stop

Messages: an optional system (or developer) message first, then user and assistant messages alternating, the last
one a user message. Content is a string or a list of parts {"type": "text", "text": ...} and {"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}} (user messages only). A user message's images get placeholders
in front of its text as chat.py writes them (`<image>\\n`, or `Image-k: <image>\\n` for several) unless the text has
its own `<image>`; images of earlier turns count, in order. Assistant messages go into the history as written.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re

import numpy as np

from internvl_jax import chat as chat_lib
from internvl_jax.data import chat_format as chat_format_lib
from internvl_jax.data import transforms

ROLES = ("system", "developer", "user", "assistant")
DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.S)
MAX_STOP = 16


class RequestError(ValueError):
  """A client mistake: HTTP status, OpenAI error type and a one-line message naming the problem and the fix."""

  def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.kind = status, kind


@dataclasses.dataclass
class Limits:
  max_tokens: int = 512  # the server's --max_new_tokens: the default and the largest max_tokens a request may ask
  max_image_bytes: int = 20 * 2**20


@dataclasses.dataclass
class ChatRequest:
  ids: np.ndarray
  pixels: np.ndarray | None
  max_tokens: int
  temperature: float
  top_p: float
  repetition_penalty: float
  stop: list[str]
  stream: bool
  include_usage: bool
  seed: int | None


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
  value = body.get(name, default)
  if value is None:
    return default
  kind = "an integer" if integer else "a number"
  if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
    raise RequestError(f"'{name}' must be {kind}, got {value!r}")
  if value < lo or (lo_open and value == lo) or value > hi:
    raise RequestError(f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {value}")
  return value


def _stop_strings(body: dict) -> list[str]:
  stop = body.get("stop")
  if stop is None:
    return []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
    raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, "
                       f"got {body.get('stop')!r}")
  return stop


def decode_image(url, limits: Limits, where: str):
  """A data:image/...;base64 URL -> RGB PIL image; RequestError (400 / 413) naming the problem otherwise."""
  if not isinstance(url, str):
    raise RequestError(f"{where}: image_url.url must be a string 'data:image/png;base64,...'")
  match = DATA_URL.match(url)
  if not match:
    what = "http(s) URLs are not fetched" if url.startswith(("http://", "https://")) else "not a data URL"
    raise RequestError(f"{where}: {what}; send the image inline as 'data:image/png;base64,<base64 of the file>'")
  mime, params, payload = match.groups()
  if not mime.startswith("image/"):
    raise RequestError(f"{where}: the data URL holds {mime or 'text/plain'!r}, not an image; send data:image/...")
  if ";base64" not in params:
    raise RequestError(f"{where}: the data URL is not base64-encoded; send 'data:{mime};base64,...'")
  if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
    raise RequestError(f"{where}: the image (about {len(payload) * 3 // 4} bytes) is larger than the server's "
                       f"--max_image_bytes {limits.max_image_bytes}; send a smaller image", status=413)
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(f"{where}: the image's base64 is broken; encode the file's bytes with standard base64 "
                       "(A-Z a-z 0-9 + /, '=' padding)") from None
  if len(data) > limits.max_image_bytes:
    raise RequestError(f"{where}: the image ({len(data)} bytes) is larger than the server's --max_image_bytes "
                       f"{limits.max_image_bytes}; send a smaller image", status=413)
  try:
    return transforms.decode_image(data, where)
  except transforms.BadRecord:
    raise RequestError(f"{where}: the data URL's bytes are not an image PIL can decode; send a PNG / JPEG / WebP "
                       "file") from None


def _content(message: dict, k: int, role: str, limits: Limits) -> tuple[str, list]:
  """A message's content -> (text, images as PIL)."""
  content = message.get("content")
  if isinstance(content, str):
    return content, []
  if not isinstance(content, list):
    raise RequestError(f"messages[{k}].content must be a string or a list of parts, got {type(content).__name__}")
  texts, images = [], []
  for j, part in enumerate(content):
    where = f"messages[{k}].content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      texts.append(part["text"])
    elif kind == "image_url" and isinstance(part.get("image_url"), (dict, str)):
      if role != "user":
        raise RequestError(f"{where}: images go in user messages only, not in a {role} message")
      url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
      images.append(decode_image(url, limits, where))
    else:
      raise RequestError(f"{where} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': "
                         "{'url': 'data:image/...;base64,...'}}")
  return "\n".join(texts), images


def _turns(messages, limits: Limits):
  """-> (system text or None, [(user text, [PIL images]), ...] , [assistant answers]) in order."""
  if not isinstance(messages, list) or not messages:
    raise RequestError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
  system, users, answers = None, [], []
  for k, message in enumerate(messages):
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
      raise RequestError(f"messages[{k}].role must be one of {', '.join(ROLES)}, got {role!r}")
    text, images = _content(message, k, role, limits)
    if role in ("system", "developer"):
      if k != 0:
        raise RequestError(f"messages[{k}]: a {role} message may only come first")
      system = text
    elif role == "user":
      if len(users) != len(answers):
        raise RequestError(f"messages[{k}]: two user messages in a row; join them into one, or put the assistant's "
                           "answer between them")
      users.append((text, images))
    else:
      if len(users) != len(answers) + 1:
        raise RequestError(f"messages[{k}]: an assistant message must follow a user message")
      answers.append(text)
  if not users or len(answers) == len(users):
    raise RequestError("the last message must be a user message (the one to answer)")
  return system, users, answers


def prompt(fmt: chat_format_lib.ChatFormat, system, users, answers) -> tuple[list[int], np.ndarray | None]:
  """The conversation -> (prompt ids, tiles of every image in order [N, S, S, 3] float32 or None)."""
  if system is not None:
    fmt = dataclasses.replace(fmt, system=system)
  tiles, written = [], []
  for k, (text, images) in enumerate(users):
    if images and fmt.jinja is not None and k:
      raise RequestError(f"user message {k + 1} has an image, but this model's chat template (a transformers-native "
                         "-hf folder) places images in the first user message only; send them there")
    tiles += [chat_format_lib.preprocess_image(im, fmt.image_size, max_num=fmt.max_num,
                                               use_thumbnail=fmt.use_thumbnail) for im in images]
    written.append(chat_lib.place_images(text, [("image", 1)] * len(images)))
  try:
    ids = fmt.input_ids(written[-1], [len(t) for t in tiles], list(zip(written[:-1], answers)))
  except ValueError as e:  # e.g. more <image> placeholders written than images sent
    raise RequestError(str(e)) from None
  return ids, np.concatenate(tiles) if tiles else None


def parse(body, fmt: chat_format_lib.ChatFormat, limits: Limits) -> ChatRequest:
  """A decoded JSON body -> ChatRequest; RequestError for anything a client should change."""
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object with 'messages'")
  if body.get("n", 1) != 1:
    raise RequestError("'n' must be 1 (one answer per request); send several requests for several answers")
  system, users, answers = _turns(body.get("messages"), limits)
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
    raise RequestError(f"'max_tokens' {max_tokens} is above this server's cap of {limits.max_tokens}; ask for fewer "
                       "or start the server with a larger --max_new_tokens")
  max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", limits.max_tokens, 1, limits.max_tokens,
                       integer=True)
  temperature = float(_number(body, "temperature", 0.0, 0.0, 2.0))
  top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
  penalty = float(_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True))
  seed = _number(body, "seed", None, 0, 2**31 - 1, integer=True)
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise RequestError(f"'stream' must be true or false, got {stream!r}")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise RequestError("'stream_options' must be an object such as {'include_usage': true}")
  ids, pixels = prompt(fmt, system, users, answers)
  return ChatRequest(np.asarray(ids, np.int32), pixels, int(max_tokens), temperature, top_p, penalty,
                     _stop_strings(body), stream, bool(options.get("include_usage", False)), seed)


class AnswerText:
  """Generated ids -> the answer's text as it grows: pieces safe to show (whole characters, no partial template
  stop string, no partial `stop` string) and where a `stop` string ends it (the text before it is the answer, as
  OpenAI cuts it)."""

  def __init__(self, fmt: chat_format_lib.ChatFormat, stop: list[str]):
    self.fmt, self.stop = fmt, stop
    self.ids: list[int] = []
    self.shown = ""
    self.stopped = False  # a stop string was met

  def _cut(self, text: str) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)

  def _piece(self, text: str) -> str:
    if text.startswith(self.shown) and len(text) > len(self.shown):
      piece, self.shown = text[len(self.shown):], text
      return piece
    return ""

  def add(self, token: int) -> str:
    """One more generated id -> the new text to show ('' when none yet); sets .stopped at a stop string."""
    self.ids.append(int(token))
    text, self.stopped = self._cut(chat_lib.showable(self.fmt, self.ids))
    if not self.stopped:
      for s in self.stop:  # hold back a partial stop string at the end
        for k in range(min(len(s) - 1, len(text)), 0, -1):
          if text.endswith(s[:k]):
            text = text[:-k]
            break
    return self._piece(text)

  def final(self) -> tuple[str, str]:
    """(the rest not shown yet, the whole answer)."""
    text, self.stopped = self._cut(self.fmt.answer(self.ids))
    return self._piece(text), text
