"""An OpenAI-compatible HTTP server for a chat model, with continuous batching of concurrent requests.

  python -m internvl_jax.serve --hf FOLDER | --workdir DIR [--port 8000] [--host 127.0.0.1] [--dtype bfloat16]
                               [--mesh fsdp=N] [--quantize int8|int4] [--max_batch 8] [--context 4096]
                               [--max_new_tokens 512] [--max_image_bytes 20971520] [--system TEXT]

Endpoints: POST /v1/chat/completions (OpenAI's shape: messages with text and data-URL image parts, max_tokens,
temperature, top_p, stop, seed, stream as server-sent events), GET /v1/models, GET /health, GET / (the web page,
internvl_jax/web/index.html). Loading is chat.py's (chat.load_model: the same options), prompts are built by
serve_requests.py with the model's released template, and tokens come from serve_engine.Engine, which decodes up
to --max_batch requests together and lets a new request join a free row while the others go on. A bad request
gets a 4xx JSON error {"error": {"message", "type"}}; a failure inside one request ends that request only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from internvl_jax import chat as chat_lib
from internvl_jax import serve_engine
from internvl_jax import serve_requests as requests_lib

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
PLACEHOLDER_PAGE = ("<!doctype html><title>internvl_jax</title><p>The web page (internvl_jax/web/index.html) is not "
                    "installed; the API is at <code>POST /v1/chat/completions</code>.</p>")
POLL_S = 1.0  # how often a waiting non-streamed request checks that its client is still there


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
  return {"error": {"message": message, "type": kind}}


def make_app(engine: serve_engine.Engine, fmt, *, model_name: str = "internvl", limits=None, page: str = WEB_PAGE):
  """The FastAPI app over a running engine and the model's ChatFormat."""
  limits = limits or requests_lib.Limits()
  app = FastAPI(title="internvl_jax", docs_url=None, redoc_url=None)
  app.state.engine, app.state.started = engine, int(time.time())

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):  # 404 / 405 in the same JSON shape as our own errors
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "active": engine.active(), "queued": engine.queued(),
            "max_batch": engine.max_batch, "context": engine.context}

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": app.state.started,
                                        "owned_by": "internvl_jax"}]}

  @app.get("/")
  async def index():
    return FileResponse(page, media_type="text/html") if os.path.isfile(page) else HTMLResponse(PLACEHOLDER_PAGE)

  @app.post("/v1/chat/completions")
  async def completions(request: Request):
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return JSONResponse(error_body(f"the request body is not valid JSON ({e}); send a JSON object with "
                                     "'messages'"), status_code=400)
    try:  # tokenising and image tiling off the event loop
      req = await run_in_threadpool(requests_lib.parse, body, fmt, limits)
      engine.check(len(req.ids), req.pixels, req.max_tokens)
    except requests_lib.RequestError as e:
      return JSONResponse(error_body(str(e), e.kind), status_code=e.status)
    except ValueError as e:  # the prompt does not fit the context
      return JSONResponse(error_body(str(e)), status_code=400)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = serve_engine.Job(req.ids, req.pixels, req.max_tokens, lambda item: loop.call_soon_threadsafe(
        events.put_nowait, item), temperature=req.temperature, top_p=req.top_p,
                           repetition_penalty=req.repetition_penalty,
                           seed=secrets.randbelow(2**31) if req.seed is None else req.seed)
    text = requests_lib.AnswerText(fmt, req.stop)
    meta = dict(id=f"chatcmpl-{secrets.token_hex(12)}", created=int(time.time()), model=model_name)
    engine.submit(job)
    if req.stream:
      return StreamingResponse(_sse(engine, job, events, text, req, meta), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(engine, job, events, text, req, meta, request)

  return app


def _usage(req, text) -> dict:
  n = len(text.ids)
  return {"prompt_tokens": int(len(req.ids)), "completion_tokens": n, "total_tokens": int(len(req.ids)) + n}


def _on_event(item, engine, job, text) -> tuple[str, str | None]:
  """One event of the engine -> (new text to show, finish reason or None); RuntimeError for an engine error.
  A stop string ends the job early (its slot is freed)."""
  kind, value = item
  if kind == "token":
    piece = text.add(value)
    if text.stopped:
      engine.cancel(job)
      return piece, "stop"
    return piece, None
  if kind == "done":
    return "", "stop" if value == "stop" else "length"
  raise RuntimeError(value)


async def _complete(engine, job, events, text, req, meta, request):
  finish = None
  try:
    while finish is None:
      try:
        item = await asyncio.wait_for(events.get(), POLL_S)
      except TimeoutError:
        if await request.is_disconnected():
          engine.cancel(job)
          return JSONResponse(error_body("the client disconnected"), status_code=499)
        continue
      finish = _on_event(item, engine, job, text)[1]
  except RuntimeError as e:
    return JSONResponse(error_body(f"generation failed: {e}", "server_error"), status_code=500)
  return {**meta, "object": "chat.completion",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text.final()[1]},
                       "finish_reason": finish}],
          "usage": _usage(req, text)}


def _chunk(meta, delta: dict | None, finish=None, usage=None) -> str:
  body = {**meta, "object": "chat.completion.chunk",
          "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
  if usage is not None:
    body["usage"] = usage
  return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(engine, job, events, text, req, meta):
  """Server-sent events: the role, a chunk per new piece of text, a chunk with the finish reason, (a usage chunk
  with stream_options.include_usage), [DONE]. Leaving early (the client went away) cancels the job: its slot is
  freed."""
  over = False
  try:
    yield _chunk(meta, {"role": "assistant", "content": ""})
    try:
      finish = None
      while finish is None:
        pieces = []
        piece, finish = _on_event(await events.get(), engine, job, text)
        pieces.append(piece)
        while finish is None and not events.empty():  # tokens that queued up while we wrote: one chunk
          piece, finish = _on_event(events.get_nowait(), engine, job, text)
          pieces.append(piece)
        if "".join(pieces):
          yield _chunk(meta, {"content": "".join(pieces)})
      over = True
      rest = text.final()[0]
      if rest:
        yield _chunk(meta, {"content": rest})
      yield _chunk(meta, {}, finish)
    except RuntimeError as e:
      over = True
      yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error'))}\n\n"
    if req.include_usage:
      yield _chunk(meta, None, usage=_usage(req, text))
    yield "data: [DONE]\n\n"
  finally:
    if not over:
      engine.cancel(job)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m internvl_jax.serve", description=__doc__.split("\n\n")[0])
  chat_lib.add_model_args(p)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max_batch", type=int, default=8, help="requests decoded together (rows of the batch)")
  p.add_argument("--context", type=int, default=4096,
                 help="the longest prompt (padded to its power-of-two bucket) + max_tokens one request may take")
  p.add_argument("--max_new_tokens", type=int, default=512, help="default and largest max_tokens of a request")
  p.add_argument("--max_image_bytes", type=int, default=20 * 2**20, help="largest image a request may send")
  p.add_argument("--model_name", default=None, help="the model id the API reports (default: the folder's name)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    import uvicorn
    model, fmt = chat_lib.load_model(args)
    engine = serve_engine.Engine(model, fmt.stop_ids, max_batch=args.max_batch, context=args.context,
                                 max_new_tokens=args.max_new_tokens)
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  name = args.model_name or os.path.basename(os.path.normpath(args.hf or args.workdir))
  limits = requests_lib.Limits(max_tokens=args.max_new_tokens, max_image_bytes=args.max_image_bytes)
  app = make_app(engine, fmt, model_name=name, limits=limits)
  print(f"serving {name} on http://{args.host}:{args.port} (max_batch {args.max_batch}, context {args.context})",
        file=sys.stderr, flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  engine.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
