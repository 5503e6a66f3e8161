"""Helpers for driving the web page in a real browser (headless Chromium from the system's packages through
selenium), for tests: a driver fixture's factory that skips when the browser is absent, a server run in a thread,
and the page actions a person takes (attach, type, send, wait for the streamed answer)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"


def chrome(width: int = 1000, height: int = 760):
  """A headless Chromium driven by the system chromedriver (never a downloaded one: the Service path is given, so
  selenium-manager is not run). Skips the test when selenium, chromium or chromedriver is missing."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-test.txt)")
  browser = next((p for p in CHROMIUM if os.path.exists(p)), None) or shutil.which("chromium")
  if browser is None or not os.path.exists(CHROMEDRIVER):
    pytest.skip("chromium / chromedriver not installed (Debian: apt-get install -y chromium chromium-driver)")
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = browser
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
    opts.add_argument(arg)
  return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ThreadServer:
  """uvicorn serving an ASGI app on 127.0.0.1 in a daemon thread; `url` once started, `stop()` to end it."""

  def __init__(self, app):
    import uvicorn
    self.port = free_port()
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      if time.time() > deadline or not self.thread.is_alive():
        raise RuntimeError("the test server did not start")
      time.sleep(0.05)
    self.url = f"http://127.0.0.1:{self.port}"

  def stop(self):
    self.server.should_exit = True
    self.thread.join(10)


def wait_until_up(url: str, proc, log, timeout: float = 180) -> None:
  """Wait for a server process's GET /health to answer 200; fails with its log if it exits or times out."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"the server exited ({proc.returncode}):\n{open(log).read()[-3000:]}")
    try:
      with urllib.request.urlopen(url + "/health", timeout=5) as r:
        if r.status == 200:
          return
    except OSError:
      pass
    time.sleep(0.25)
  pytest.fail(f"the server did not answer /health in {timeout:.0f} s:\n{open(log).read()[-3000:]}")


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
  """POST JSON, return (status, decoded JSON body) for 2xx and 4xx alike."""
  req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def data_url(path: str, mime: str = "image/png") -> str:
  """What the page's FileReader.readAsDataURL makes of a file."""
  with open(path, "rb") as f:
    return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


# ---- page actions ---------------------------------------------------------------------------------------------------
def by_css(driver, css):
  from selenium.webdriver.common.by import By
  return driver.find_elements(By.CSS_SELECTOR, css)


def wait_for(driver, condition, timeout: float = 120, what: str = "condition"):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), f"timed out: {what}")


def open_page(driver, url: str) -> str:
  """Load the page and wait for the model's name (from /v1/models) in the header; returns it."""
  driver.get(url + "/")
  wait_for(driver, lambda d: by_css(d, "#model")[0].text not in ("", "loading…"), 30, "the model name")
  return by_css(driver, "#model")[0].text


def set_settings(driver, **values) -> None:
  """Open the settings panel and type values, e.g. max_tokens=8, temperature=0, top_p=1."""
  panel = by_css(driver, "#settings")[0]
  if "open" not in panel.get_attribute("class").split():
    by_css(driver, "#settings-toggle")[0].click()
  for name, v in values.items():
    box = by_css(driver, "#" + name.replace("_", "-"))[0]
    box.clear()
    box.send_keys(str(v))


def attach(driver, path: str) -> None:
  """Attach a file through the (hidden) file input, as the file picker does; waits for its thumbnail."""
  n = len(by_css(driver, "#attachments .thumb"))
  by_css(driver, "#file")[0].send_keys(os.path.abspath(path))
  wait_for(driver, lambda d: len(by_css(d, "#attachments .thumb")) == n + 1, 10, "the thumbnail")


def type_message(driver, text: str) -> None:
  """Type into the message box; newlines in `text` are typed as Shift+Enter (Enter alone would send)."""
  from selenium.webdriver.common.keys import Keys
  box = by_css(driver, "#input")[0]
  for i, line in enumerate(text.split("\n")):
    if i:
      box.send_keys(Keys.SHIFT, Keys.ENTER, Keys.SHIFT)  # press and release Shift around Enter
    box.send_keys(line)


def press_enter(driver) -> None:
  from selenium.webdriver.common.keys import Keys
  by_css(driver, "#input")[0].send_keys(Keys.ENTER)


def answers(driver):
  return by_css(driver, "#messages .msg.assistant")


def wait_answer(driver, index: int, timeout: float = 300) -> tuple[str, str]:
  """Wait until assistant message `index` has stopped streaming; returns (state, its exact text)."""
  def finished(d):
    if error(d):
      raise AssertionError(f"the page shows an error: {error(d)}")
    msgs = answers(d)
    return len(msgs) > index and msgs[index].get_attribute("data-state") != "streaming"

  wait_for(driver, finished, timeout, f"answer {index}")
  msg = answers(driver)[index]
  return msg.get_attribute("data-state"), text_of(driver, msg, ".answer")


def partial(driver, index: int) -> str:
  """The text of assistant message `index` so far ('' before it exists)."""
  msgs = answers(driver)
  return text_of(driver, msgs[index], ".answer") if len(msgs) > index else ""


def error(driver) -> str:
  """The error message the page shows, '' when none."""
  box = by_css(driver, "#error")[0]
  return box.text if box.is_displayed() else ""


def text_of(driver, node, css: str) -> str:
  """The exact textContent (selenium's .text trims and folds whitespace)."""
  return driver.execute_script("return arguments[0].querySelector(arguments[1]).textContent", node, css)
