"""python -m internvl_jax.serve on a tiny InternVL2-1B-style folder (tests/release_folders.py): one request answers
what generate() + the chat format's answer extraction give (text, and with an image); a multi-turn conversation is
written as the released template writes it (the prompt string spelled out); 8 concurrent requests of different
lengths and max_tokens are each answered as generate() answers them, sooner in total than one after another (and
so are 10 on 8 rows, two of them sampled); rows joining a small cache that is rolled under them still decode
generate()'s tokens; streamed chunks reassemble to the answer; `stop` strings cut it as OpenAI does; bad requests
get a 4xx JSON error and the server keeps serving, also after a failure inside the engine; the compiled programs
stay fixed across prompt lengths of one bucket; a real uvicorn server on a free port answers an httpx client, and
a client that leaves mid-stream frees its row. Slow: the CLI (--quantize int8) through the throughput benchmark,
and the engine on a 2-device mesh."""

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import release_folders
from internvl_jax import serve, serve_engine, serve_requests
from internvl_jax.evaluate import models
from internvl_jax.generate import generate

CONTEXT = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The loaded model, its engine (8 rows) and a TestClient of the app; an 80 x 60 PNG (several 56 px tiles)."""
  root = tmp_path_factory.mktemp("serve")
  folder = release_folders.internvl2_1b(str(root / "model"))[0]
  m = models.load_hf(folder)
  engine = serve_engine.Engine(m.model, m.chat.stop_ids, max_batch=8, context=CONTEXT, max_new_tokens=64)
  limits = serve_requests.Limits(max_tokens=64, max_image_bytes=50_000)
  app = serve.make_app(engine, m.chat, model_name="tiny", limits=limits, page=str(root / "none.html"))
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(buf, "PNG")
  image = str(root / "image.png")
  with open(image, "wb") as f:
    f.write(buf.getvalue())
  with TestClient(app) as client:  # one event loop for all requests, as under uvicorn
    yield m, engine, client, image, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  engine.close()


def _want(m, question, images=(), max_new=16, history=()):
  inputs = m.chat.inputs(question, list(images), history=history)
  out = generate(m.model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=max_new,
                 eos_token_id=list(m.chat.stop_ids))
  return m.chat.answer(np.asarray(out)[0, inputs["input_ids"].shape[1]:])


def _ask(client, content, max_tokens=16, **kw):
  r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                 "max_tokens": max_tokens, **kw})
  assert r.status_code == 200, r.text
  return r.json()


def _image_message(url, text):
  return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def test_one_request_equals_generate(setup):
  m, engine, client, image, url = setup
  got = _ask(client, "Tell me a story.")
  assert got["object"] == "chat.completion" and got["model"] == "tiny" and got["id"].startswith("chatcmpl-")
  assert got["choices"][0]["message"] == {"role": "assistant", "content": _want(m, "Tell me a story.")}
  assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == 16
  n = len(m.chat.input_ids("Tell me a story."))
  assert got["usage"] == {"prompt_tokens": n, "completion_tokens": 16, "total_tokens": n + 16}
  got = _ask(client, _image_message(url, "Describe the image."))
  assert got["choices"][0]["message"]["content"] == _want(m, "Describe the image.", [image])


def test_multi_turn_prompt_is_the_templates(setup):
  """Assistant messages go into the history; the image of the first turn keeps its place (chat.py's layout)."""
  m, _, _, image, url = setup
  body = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": _image_message(url, "What is it?")},
                       {"role": "assistant", "content": "A square."}, {"role": "user", "content": "And then?"}]}
  req = serve_requests.parse(body, m.chat, serve_requests.Limits())
  fmt = serve_requests.dataclasses.replace(m.chat, system="Be brief.")
  want = fmt.inputs("And then?", [image], history=[("<image>\nWhat is it?", "A square.")])
  assert req.ids.tolist() == want["input_ids"][0].tolist()
  np.testing.assert_array_equal(req.pixels, want["pixel_values"])
  block = "<img>" + "<IMG_CONTEXT>" * (4 * len(req.pixels)) + "</img>"  # 4 tokens per 56 px tile
  written = (f"<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n{block}\nWhat is it?<|im_end|>"
             f"<|im_start|>assistant\nA square.<|im_end|><|im_start|>user\nAnd then?<|im_end|><|im_start|>assistant\n")
  assert req.ids.tolist() == m.chat.tokenizer.encode(written)


QUESTIONS = [f"Question {k}: " + "why " * (3 * k) for k in range(8)]  # prompts of 3 length buckets
NEW = [40, 33, 40, 25, 40, 38, 31, 40]


@pytest.fixture(scope="module")
def reference(setup):
  """generate() on QUESTIONS left-padded into one batch (a padded row decodes as it would alone): the new ids
  [8, 40] and each answer cut at NEW[k] tokens."""
  m = setup[0]
  ids = [m.chat.input_ids(q) for q in QUESTIONS]
  t = max(map(len, ids))
  batch, mask = np.zeros((8, t), np.int32), np.zeros((8, t), np.int32)
  for k, row in enumerate(ids):
    batch[k, t - len(row):], mask[k, t - len(row):] = row, 1
  out = np.asarray(generate(m.model, batch, attention_mask=mask, max_new_tokens=max(NEW),
                            eos_token_id=list(m.chat.stop_ids)))[:, t:]
  return out, [m.chat.answer(out[k, :NEW[k]]) for k in range(8)]


def test_concurrent_requests_match_and_are_faster(setup, reference):
  m, engine, client, _, _ = setup
  want = reference[1]
  assert len(set(want)) > 1
  ask = lambda k: _ask(client, QUESTIONS[k], NEW[k])["choices"][0]["message"]["content"]
  ask(0), ask(7)  # compile the buckets first: the timings below are decoding only
  start = time.perf_counter()
  sequential = [ask(k) for k in range(8)]
  t_seq = time.perf_counter() - start
  steps = engine.steps
  start = time.perf_counter()
  with ThreadPoolExecutor(8) as pool:
    concurrent = list(pool.map(ask, range(8)))
  t_conc = time.perf_counter() - start
  assert sequential == want and concurrent == want
  assert engine.steps - steps < sum(NEW)  # rows were decoded together
  print(f"8 requests: sequential {t_seq:.2f} s, concurrent {t_conc:.2f} s")
  assert t_conc < t_seq, (t_conc, t_seq)
  # 10 at once on 8 rows (two wait for a free row), two of them sampled: the greedy ones are unchanged
  sampled = lambda k: _ask(client, QUESTIONS[k], 30, temperature=1.0, top_p=0.9, seed=k)
  with ThreadPoolExecutor(10) as pool:
    futures = [pool.submit(ask, k) for k in range(8)] + [pool.submit(sampled, k) for k in (1, 2)]
    assert [f.result() for f in futures[:8]] == want and all(f.result() is not None for f in futures[8:])


def test_rows_join_and_the_cache_rolls(setup, reference):
  """A small cache (2 rows, context 168 + 40 new: 208 slots) and 24 staggered requests: the shared index runs out
  of room and the cache is rolled under live rows several times; every answer is still generate()'s tokens."""
  m = setup[0]
  engine = serve_engine.Engine(m.model, m.chat.stop_ids, max_batch=2, context=168, max_new_tokens=40)
  try:
    order = list(range(8)) * 3
    got = [[] for _ in order]
    done = threading.Semaphore(0)
    emit = lambda j: lambda item: got[j].append(item[1]) if item[0] == "token" else done.release()
    for j, k in enumerate(order):
      engine.submit(serve_engine.Job(np.asarray(m.chat.input_ids(QUESTIONS[k]), np.int32), None, NEW[k], emit(j)))
      time.sleep(0.01 * (j % 3))
    for _ in order:
      assert done.acquire(timeout=120)
    stops = set(m.chat.stop_ids)
    for j, k in enumerate(order):
      want = reference[0][k, :NEW[k]].tolist()
      assert got[j] == next((want[:i + 1] for i, x in enumerate(want) if x in stops), want), (j, k)
    print(f"cache rolls: {engine.shifts}")
    assert engine.shifts >= 2, engine.shifts
  finally:
    engine.close()


def test_stream_reassembles_and_stop_strings_cut(setup):
  m, _, client, _, url = setup
  content = _image_message(url, "Say something.")
  full = _ask(client, content, 24)["choices"][0]["message"]["content"]
  with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                     "max_tokens": 24, "stream": True, "stream_options": {"include_usage": True}}) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.iter_lines() if line]
  assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
  chunks = [json.loads(line[6:]) for line in lines[:-1]]
  assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
  assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == full
  assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
  assert chunks[-1]["usage"]["completion_tokens"] == 24 and chunks[-1]["choices"] == []
  stop = full[len(full) // 2:len(full) // 2 + 2]  # a string in the middle of the answer
  assert stop and full.find(stop) > 0
  got = _ask(client, content, 24, stop=[stop, "never-seen"])
  assert got["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": full[:full.find(stop)]},
                               "finish_reason": "stop"}
  with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                     "max_tokens": 24, "stream": True, "stop": stop}) as r:
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
  assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full[:full.find(stop)]
  assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_bad_requests_get_4xx_and_the_server_goes_on(setup):
  m, engine, client, _, url = setup
  user = lambda content: {"messages": [{"role": "user", "content": content}]}
  big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(60_000)).decode()
  cases = [({}, 400, "'messages'"), ({"messages": []}, 400, "'messages'"),
           ({"messages": [{"role": "bot", "content": "x"}]}, 400, "role"),
           (user(_image_message("data:image/png;base64,@@@", "x")), 400, "base64"),
           (user(_image_message("data:text/plain;base64,aGVsbG8=", "x")), 400, "not an image"),
           (user(_image_message("https://example.com/a.png", "x")), 400, "not fetched"),
           (user(_image_message("data:image/png;base64,aGVsbG8=", "x")), 400, "PIL can decode"),
           (user(_image_message(big, "x")), 413, "--max_image_bytes"),
           (user("why " * 300), 400, "--context"),
           ({**user("hi"), "max_tokens": 65}, 400, "--max_new_tokens"),
           ({**user("hi"), "max_tokens": "many"}, 400, "integer"),
           ({**user("hi"), "temperature": -1}, 400, "temperature"),
           ({**user("hi"), "stop": [""]}, 400, "'stop'"),
           ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "assistant"),
           ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "in a row"),
           ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "content[0]"),
           (user("<image>\n<image>\nTwo?"), 400, "placeholders")]
  for body, status, words in cases:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, (body, r.text)
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"] and error["type"], (body, error)
  r = client.post("/v1/chat/completions", content=b"{not json")
  assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
  assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
  # a failure inside the engine (pixels a prompt cannot take) ends that job only
  events = []
  engine.submit(serve_engine.Job(np.asarray(m.chat.input_ids("hi"), np.int32), np.zeros((1, 9, 9, 3), np.float32),
                                 4, events.append))
  for _ in range(600):
    if events:
      break
    time.sleep(0.05)
  assert events and events[-1][0] == "error"

  def gone(item):  # a receiver that fails (e.g. its event loop closed): the job is dropped, the engine goes on
    raise RuntimeError("event loop is closed")
  engine.submit(serve_engine.Job(np.asarray(m.chat.input_ids("hi"), np.int32), None, 4, gone))
  assert _ask(client, "Tell me a story.")["choices"][0]["message"]["content"] == _want(m, "Tell me a story.")
  assert client.get("/health").json()["status"] == "ok"


def test_compiled_programs_stay_fixed(setup):
  m, engine, client, _, _ = setup
  _ask(client, "a", 5)  # the 64-token bucket is compiled (the system prompt alone is ~56 tokens)
  before = engine.programs.cache_size()
  questions = ["b", "two words", "x y z", "hi there you"]
  lengths = [len(m.chat.input_ids(q)) for q in questions]
  assert len(set(lengths)) > 1 and {serve_engine.prompt_bucket(n) for n in lengths} == {64}
  # powers of two (stream.py's) up to 1024, then multiples of 512
  assert [serve_engine.prompt_bucket(t) for t in (1, 17, 1000, 1025, 3400)] == [16, 32, 1024, 1536, 3584]
  for k, question in enumerate(questions):
    _ask(client, question, 3 + 2 * k, temperature=0.5 * (k % 2), top_p=0.9, seed=k)
  assert engine.programs.cache_size() == before


def test_models_health_and_page(setup):
  _, _, client, _, _ = setup
  assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
  assert client.get("/health").json()["max_batch"] == 8
  page = client.get("/")
  assert page.status_code == 200 and "web/index.html" in page.text  # the placeholder: no page file given


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_real_server_and_client_disconnect(setup):
  import uvicorn
  m, engine, client, _, _ = setup
  port = _free_port()
  server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  try:
    for _ in range(200):
      if server.started:
        break
      time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me a story."}],
                                                        "max_tokens": 16}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == _want(m, "Tell me a story.")
    long = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64}).json()
    assert long["usage"]["completion_tokens"] == 64  # no stop id before 64 tokens
    steps = engine.steps
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64,
                            "stream": True}) as r:
      lines = r.iter_lines()
      for _ in range(3):
        next(lines)
    for _ in range(200):  # the client left: its row is freed (it would run 64 tokens otherwise)
      if engine.active() == 0:
        break
      time.sleep(0.05)
    assert engine.active() == 0 and engine.steps - steps < 40  # (the answer alone runs all 64: see above)
  finally:
    server.should_exit = True
    thread.join(timeout=30)


@pytest.mark.slow
def test_cli_and_throughput_benchmark(capsys):
  """The benchmark builds a tiny folder, starts `python -m internvl_jax.serve --quantize int8` on it and prints the
  table; the CLI's own errors are one line."""
  import subprocess
  import sys
  from internvl_jax.bench import serve_throughput
  serve_throughput.main(["--tiny", "--quantize", "int8", "--concurrency", "1,3", "--requests", "3",
                         "--max_tokens", "8", "--context", "128"])
  table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
  assert len(table) == 3 and table[1].startswith("| 1 |") and table[2].startswith("| 3 |")
  assert all(float(cell) > 0 for row in table[1:] for cell in row.strip("| ").split(" | "))
  proc = subprocess.run([sys.executable, "-m", "internvl_jax.serve", "--hf", "/nonexistent/folder"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --hf folder")


MESH_SCRIPT = """
import sys, threading, numpy as np
from internvl_jax import chat, serve_engine
from internvl_jax.evaluate import models
from internvl_jax.generate import generate
model, fmt = chat.load_model(chat.parser().parse_args(["--hf", sys.argv[1], "--mesh", "fsdp=2"]))
ids = np.asarray(fmt.input_ids("Tell me a story."), np.int32)
plain = models.load_hf(sys.argv[1]).model
want = np.asarray(generate(plain, ids[None], max_new_tokens=12, eos_token_id=list(fmt.stop_ids)))[0, len(ids):]
engine = serve_engine.Engine(model, fmt.stop_ids, max_batch=2, context=256, max_new_tokens=64)
got, over = [], threading.Event()
engine.submit(serve_engine.Job(ids, None, 12, lambda e: got.append(e[1]) if e[0] == "token" else over.set()))
assert over.wait(300)
engine.close()
print("EQUAL" if got == want.tolist()[:len(got)] and got else f"DIFFERENT {got} {want.tolist()}")
"""


@pytest.mark.slow
def test_engine_on_a_mesh(tmp_path):
  """Weights laid out over two (forced host) devices with --mesh fsdp=2: the engine answers generate()'s tokens."""
  import os
  import subprocess
  import sys
  folder = release_folders.internvl2_1b(str(tmp_path / "model"))[0]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, folder], capture_output=True, text=True, timeout=600,
                        env=env)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("EQUAL"), proc.stdout + proc.stderr[-2000:]
