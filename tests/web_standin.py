"""A stand-in for internvl_jax.serve with the same HTTP shape and no model (a helper for the web page's tests):
GET / (the page), GET /v1/models, GET /health, POST /v1/chat/completions (OpenAI's shape, `stream: true` as
server-sent events). Its answer is a fixed function of the request, so a test can tell whether the page sent the
whole conversation: it names the number of user turns, messages and images, a digest of the decoded image bytes
and the last question, and is streamed a word at a time.
"""

import base64
import binascii
import hashlib
import io
import json
import time
from importlib import resources

import PIL.Image

MODEL = "standin-tiny"


def fake_answer(messages: list[dict]) -> str:
  """The stand-in's answer to an OpenAI messages list; raises ValueError on what the real server rejects too."""
  if not messages:
    raise ValueError("messages is empty: send at least one user message")
  digest, images, users, last = hashlib.sha256(), 0, 0, ""
  for m in messages:
    content = m.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    users += m.get("role") == "user"
    for p in parts:
      if p.get("type") == "image_url":
        url = p["image_url"]["url"]
        head, _, data = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
          raise ValueError("image_url must be a data:image/...;base64, URL")
        try:
          raw = base64.b64decode(data, validate=True)
        except binascii.Error as e:
          raise ValueError(f"image_url holds broken base64 ({e})") from e
        try:
          PIL.Image.open(io.BytesIO(raw)).verify()
        except Exception as e:
          raise ValueError(f"image_url is not a readable image ({type(e).__name__})") from e
        digest.update(raw)
        images += 1
      elif p.get("type") == "text" and m.get("role") == "user":
        last = p["text"]
  return (f"Turn {users} of {len(messages)} messages with {images} image(s) {digest.hexdigest()[:10]}: "
          f"you asked \u201c{last}\u201d <b>ok</b>.")


def create_app():
  from fastapi import FastAPI, Request
  from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

  app = FastAPI()
  page = resources.files("internvl_jax").joinpath("web/index.html").read_text(encoding="utf-8")

  @app.get("/", response_class=HTMLResponse)
  def index():
    return page

  @app.get("/health")
  def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  def models():
    return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "internvl_jax"}]}

  @app.post("/v1/chat/completions")
  async def completions(request: Request):
    body = await request.json()
    try:
      answer = fake_answer(body.get("messages") or [])
    except ValueError as e:
      return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
    words = answer.split(" ")[: int(body.get("max_tokens") or 10**6)]
    answer = " ".join(words)
    base = {"id": "chatcmpl-standin", "created": int(time.time()), "model": MODEL}
    if not body.get("stream"):
      return {**base, "object": "chat.completion", "choices": [
          {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}

    def events():
      for i, w in enumerate(words):
        piece = w if i == 0 else " " + w
        yield "data: " + json.dumps({**base, "object": "chat.completion.chunk",
                                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        yield "\n\n"
        time.sleep(0.03)
      yield "data: " + json.dumps({**base, "object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  return app
