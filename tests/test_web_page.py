"""The chat page (internvl_jax/web/index.html) in a real browser: headless Chromium from the system's packages,
driven by selenium. Skipped when chromium / chromedriver are not installed (.ci/run installs them where it can).

The page's mechanics run against tests/web_standin.py (the server's HTTP shape, an answer that is a fixed function
of the whole request, no model): what it sends (every turn, earlier images kept, typed newlines), that model
output is shown as text, Stop, New chat, a server error shown in the page and the next question still answered.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import browser
import web_standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def driver():
  d = browser.chrome()
  yield d
  d.quit()


@pytest.fixture(scope="module")
def standin():
  server = browser.ThreadServer(web_standin.create_app())
  yield server.url
  server.stop()


def picture(path: str, seed: int = 0, size=(96, 72)) -> str:
  """A small PNG: a colour gradient with a disc, different per seed."""
  w, h = size
  y, x = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(seed)
  a = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, rng.integers(0, 255))], -1)
  cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
  a[(x - cx) ** 2 + (y - cy) ** 2 < (h // 4) ** 2] = (250, 240, 60)
  Image.fromarray(a.astype(np.uint8)).save(path)
  return path


def user(text, *images):
  return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]
          + [{"type": "text", "text": text}]}


def test_conversation_is_sent_whole(driver, standin, tmp_path):
  img = picture(str(tmp_path / "a.png"))
  assert browser.open_page(driver, standin) == web_standin.MODEL
  browser.set_settings(driver, max_tokens=200, temperature=0, top_p=1)
  browser.attach(driver, img)
  browser.type_message(driver, "What is in the picture?")
  browser.press_enter(driver)
  state, first = browser.wait_answer(driver, 0, 30)
  assert state == "done"
  q2 = "And the colour?\nOne word."
  browser.type_message(driver, q2)
  browser.by_css(driver, "#send")[0].click()
  state, second = browser.wait_answer(driver, 1, 30)
  assert state == "done"

  # The stand-in's answer digests every turn and image it is sent: equal answers mean equal requests.
  m1 = [user("What is in the picture?", browser.data_url(img))]
  m2 = m1 + [{"role": "assistant", "content": first}, user(q2)]
  assert first == web_standin.fake_answer(m1)
  assert second == web_standin.fake_answer(m2)
  assert "Turn 2 of 3 messages with 1 image(s)" in second and "One word." in second
  # Model output is text: the stand-in's "<b>ok</b>" is shown as written, no element made from it.
  assert "<b>ok</b>" in second and not browser.by_css(driver, "#messages .answer b")
  # The user's image is shown in the conversation; the composer is empty again.
  assert len(browser.by_css(driver, "#messages .msg.user img")) == 1
  assert not browser.by_css(driver, "#attachments .thumb")
  assert browser.by_css(driver, "#input")[0].get_attribute("value") == ""


def test_error_stop_and_new_chat(driver, standin, tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png at all")
  browser.open_page(driver, standin)
  browser.set_settings(driver, max_tokens=500)
  browser.attach(driver, str(broken))
  browser.type_message(driver, "What is this?")
  browser.press_enter(driver)
  # The server's 4xx message is shown; the question goes back to the composer and out of the history.
  browser.wait_for(driver, lambda d: browser.by_css(d, "#error")[0].is_displayed(), 30, "the error message")
  assert "not a readable image" in browser.by_css(driver, "#error")[0].text
  assert browser.by_css(driver, "#input")[0].get_attribute("value") == "What is this?"
  assert len(browser.by_css(driver, "#attachments .thumb")) == 1
  assert not browser.answers(driver)

  # Remove the broken image, ask a long question, stop the answer while it streams.
  browser.by_css(driver, "#attachments .thumb button")[0].click()
  assert not browser.by_css(driver, "#attachments .thumb")
  browser.by_css(driver, "#input")[0].clear()
  long_q = " ".join(f"w{i}" for i in range(300))  # streamed over ~9 s: time to press Stop under load
  browser.type_message(driver, long_q)
  browser.press_enter(driver)
  browser.wait_for(driver, lambda d: len(browser.partial(d, 0)) > 5, 30, "the first pieces")
  assert not browser.by_css(driver, "#error")[0].is_displayed()
  browser.by_css(driver, "#stop")[0].click()
  state, partial = browser.wait_answer(driver, 0, 10)
  full = web_standin.fake_answer([user(long_q)])
  assert state == "stopped" and full.startswith(partial) and 0 < len(partial) < len(full)

  # The failed turn left no trace in the history: the next answer counts 2 user turns (long_q, this one), 0 images.
  browser.type_message(driver, "again")
  browser.press_enter(driver)
  state, text = browser.wait_answer(driver, 1, 30)
  assert state == "done" and text.startswith("Turn 2 of 3 messages with 0 image(s)")

  # New chat while an answer streams: nothing of the old conversation is sent afterwards.
  browser.type_message(driver, long_q)
  browser.press_enter(driver)
  browser.wait_for(driver, lambda d: len(browser.partial(d, 2)) > 5, 30, "the first pieces")
  browser.by_css(driver, "#new-chat")[0].click()
  assert not browser.by_css(driver, "#messages .msg")
  browser.wait_for(driver, lambda d: d.find_element("id", "send").is_displayed(), 10, "the Send button back")
  browser.type_message(driver, "fresh")
  browser.press_enter(driver)
  state, text = browser.wait_answer(driver, 0, 30)
  assert state == "done" and text.startswith("Turn 1 of 1 messages with 0 image(s)")


# A PNG file made in the page, handed over as a paste or a drop would (the clipboard and a drag cannot be driven
# from selenium; the events are the ones the browser fires, carrying a DataTransfer with the file).
HAND_OVER = """
  const [kind, name, type] = arguments;
  const png = Uint8Array.from(atob("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/" +
                                   "iZk9HQAAAABJRU5ErkJggg=="), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([png], name, {type}));
  const event = kind === "paste" ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true})
                                 : new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
  (kind === "paste" ? document.getElementById("input") : document.body).dispatchEvent(event);
"""


def test_paste_and_drop_attach(driver, standin):
  browser.open_page(driver, standin)
  driver.execute_script(HAND_OVER, "paste", "pasted.png", "image/png")
  driver.execute_script(HAND_OVER, "drop", "dropped.png", "image/png")
  browser.wait_for(driver, lambda d: len(browser.by_css(d, "#attachments .thumb")) == 2, 10, "two thumbnails")
  assert [i.get_attribute("alt") for i in browser.by_css(driver, "#attachments img")] == ["pasted.png", "dropped.png"]
  driver.execute_script(HAND_OVER, "drop", "notes.txt", "text/plain")
  browser.wait_for(driver, lambda d: browser.error(d), 10, "the error")
  assert "notes.txt is not an image" in browser.error(driver)
  assert len(browser.by_css(driver, "#attachments .thumb")) == 2
  browser.by_css(driver, "#attachments .thumb button")[0].click()  # remove the pasted one
  assert [i.get_attribute("alt") for i in browser.by_css(driver, "#attachments img")] == ["dropped.png"]
  browser.type_message(driver, "Two?")
  browser.press_enter(driver)
  state, text = browser.wait_answer(driver, 0, 30)
  assert state == "done" and text.startswith("Turn 1 of 1 messages with 1 image(s)")
  assert not browser.error(driver)  # a new question clears the old error


def test_page_is_self_contained():
  """No external asset: nothing fetched from another origin, no innerHTML assignment (model text stays text)."""
  from importlib import resources
  html = resources.files("internvl_jax").joinpath("web/index.html").read_text(encoding="utf-8")
  for needle in ("http://", "https://", "@import", "<link", "url(", "innerHTML", "outerHTML", "insertAdjacentHTML",
                 "document.write", "new EventSource"):
    assert needle not in html, needle
  assert os.path.getsize(str(resources.files("internvl_jax").joinpath("web/index.html"))) < 60_000


# ---- the real server on a tiny released-style model -----------------------------------------------------------------
NEW = 12  # max tokens per answer: the tiny model decodes fast, and 12 random words fill a line of the screenshot


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """`python -m internvl_jax.serve` on a tiny InternVL2-1B-style folder (random weights), started as a person
  starts it, on a free port."""
  import release_folders
  root = tmp_path_factory.mktemp("web_served")
  folder = release_folders.internvl2_1b(str(root / "internvl2-tiny"))[0]
  port = browser.free_port()
  log = root / "serve.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "internvl_jax.serve", "--hf", folder, "--port", str(port),
                             "--max_batch", "2", "--context", "1024"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    browser.wait_until_up(url, proc, log, timeout=180)
    yield url
  finally:
    proc.terminate()
    proc.wait(30)


def test_page_answers_as_the_api(driver, served, tmp_path):
  """The streamed answers shown in the page equal the API's non-streamed answers to the same conversation (greedy),
  over two turns, the first with an image; then a screenshot (INTERNVL_JAX_SCREENSHOT=PATH keeps it there)."""
  img = picture(str(tmp_path / "photo.png"), seed=3, size=(168, 112))
  name = browser.open_page(driver, served)
  browser.set_settings(driver, max_tokens=NEW, temperature=0, top_p=1)
  browser.by_css(driver, "#settings-toggle")[0].click()  # closed again: the conversation is what is looked at
  browser.attach(driver, img)
  q1, q2 = "What is in this picture?", "What colour is the circle?\nAnswer in one word."
  browser.type_message(driver, q1)
  browser.press_enter(driver)
  state, first = browser.wait_answer(driver, 0)
  assert state == "done"
  browser.type_message(driver, q2)
  browser.press_enter(driver)
  state, second = browser.wait_answer(driver, 1)
  assert state == "done"

  def api(messages):
    status, body = browser.post(served + "/v1/chat/completions", {"model": name, "messages": messages,
                                                                  "max_tokens": NEW, "temperature": 0, "top_p": 1})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]

  m1 = [user(q1, browser.data_url(img))]
  want1 = api(m1)
  assert want1 and first == want1
  want2 = api(m1 + [{"role": "assistant", "content": want1}, user(q2)])
  assert want2 and second == want2
  browser.by_css(driver, "#input")[0].click()  # the pointer off the Settings button for the picture
  shot = os.environ.get("INTERNVL_JAX_SCREENSHOT") or str(tmp_path / "serve_page.png")
  assert driver.save_screenshot(shot)

  # The server's 4xx (max_tokens above its cap) is shown in the page; fixed and sent again, the question is answered
  # as the API answers it, the refused attempt left out of the history.
  browser.set_settings(driver, max_tokens=10**6)
  browser.type_message(driver, "Thanks!")
  browser.press_enter(driver)
  browser.wait_for(driver, lambda d: browser.error(d), 60, "the server's error")
  assert "max_tokens" in browser.error(driver) and len(browser.answers(driver)) == 2
  browser.set_settings(driver, max_tokens=NEW)
  browser.press_enter(driver)  # the question is back in the message box
  state, third = browser.wait_answer(driver, 2)
  assert state == "done"
  assert third == api(m1 + [{"role": "assistant", "content": want1}, user(q2), {"role": "assistant", "content": want2},
                            user("Thanks!")])

