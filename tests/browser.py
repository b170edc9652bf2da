"""A real browser for the report tests: headless Chromium driven over the DevTools protocol
on a pipe (``--remote-debugging-pipe``: JSON messages ending in a NUL byte, commands on the
browser's fd 3, answers and events on its fd 4), so no websocket client is needed.

:func:`load` opens a page by ``file://`` in a fresh profile, waits for it to load, and
returns what it logged as errors (console, exceptions, CSP and other browser log errors),
every network request it made, its DOM structure, and a full-page screenshot (PNG).
:func:`chromium` is None when Chromium is not installed (``scripts/install-chromium.sh``
installs Debian's ``chromium``); tests then skip with that reason.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--hide-scrollbars", "--window-size=1200,900")
#: What the page is asked about its structure (returned as JSON).
DOM_QUERY = """JSON.stringify({
  title: document.title,
  h1: [...document.querySelectorAll('h1')].map(e => e.textContent.trim()),
  h2: [...document.querySelectorAll('h2')].map(e => e.textContent.trim()),
  tables: document.querySelectorAll('table').length,
  rows: document.querySelectorAll('tbody tr').length,
  svgs: document.querySelectorAll('svg').length,
  images: [...document.images].map(i => ({loaded: i.complete && i.naturalWidth > 0,
                                          src: i.getAttribute('src').slice(0, 22)})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  text: document.body.innerText,
})"""
TIMEOUT = 60.0


def chromium() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Loaded:
    """What a page did in the browser: error messages, the URLs it requested, its DOM
    structure (see :data:`DOM_QUERY`) and where its screenshot was written."""

    errors: list[str]
    requests: list[str]
    dom: dict[str, Any]
    screenshot: Path


class _DevTools:
    """The DevTools protocol over the browser's pipe: commands and the events they cause."""

    def __init__(self, to_browser: int, from_browser: int) -> None:
        self.write_fd, self.read_fd = to_browser, from_browser
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Run ``method`` and return its result; events meanwhile go to ``events``."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params,
                   **({"sessionId": session} if session else {})}
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page."""
        return self.send("Runtime.evaluate", session, expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait_loaded(self, session: str, url: str) -> None:
        """Wait until the page shows ``url``, completely loaded (the blank page the tab
        opened with may fire load events of its own, so events alone do not tell)."""
        deadline = time.monotonic() + TIMEOUT
        check = "document.readyState === 'complete' ? location.href : ''"
        while self.evaluate(session, check) != url:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in time")
            time.sleep(0.1)


def load(page: Path, screenshot: Path) -> Loaded:
    """Open ``page`` in headless Chromium (a fresh profile), wait for its load event and a
    moment more, and return what it did; its full-page screenshot goes to ``screenshot``."""
    executable = chromium()
    if executable is None:
        raise RuntimeError("chromium is not installed")
    commands, browser_in = os.pipe()
    browser_out, answers = os.pipe()
    # The browser's ends, moved above 3 and 4 so that placing them there clobbers neither.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, answers)]
    os.close(commands)
    os.close(answers)

    def pipes() -> None:  # in the child: fd 3 reads the commands, fd 4 writes the answers
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)

    # The profile lives beside the screenshot (the caller's folder), not in a temporary
    # directory removed on exit: Chromium's helper processes can still be writing to it
    # after the browser itself has exited, and the removal then fails.
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=Path(screenshot).parent)
    process = subprocess.Popen(
        [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        preexec_fn=pipes, pass_fds=(3, 4),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for fd in high:
        os.close(fd)
    tools = _DevTools(browser_in, browser_out)
    try:
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        session = tools.send("Target.attachToTarget", targetId=target,
                             flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable", session)
        url = Path(page).resolve().as_uri()
        tools.send("Page.navigate", session, url=url)
        tools.wait_loaded(session, url)
        time.sleep(0.5)  # late console messages and requests
        size = tools.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = tools.send("Page.captureScreenshot", session, format="png",
                          captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"],
                                "height": size["height"], "scale": 1})
        dom = json.loads(tools.evaluate(session, DOM_QUERY))
        tools.send("Browser.close")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        os.close(browser_in)
        os.close(browser_out)
    Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
    return Loaded(_errors(tools.events), _requests(tools.events, url), dom, Path(screenshot))


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params["type"] in (
                "error", "assert"):
            out.append(" ".join(str(a.get("value", a.get("description"))) for a in
                                params.get("args", [])))
        elif event.get("method") == "Runtime.exceptionThrown":
            out.append(params["exceptionDetails"].get("text", "exception"))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            out.append(params["entry"]["text"])
    return out


def _requests(events: list[dict[str, Any]], page: str) -> list[str]:
    """Every URL the page requested besides itself (``data:`` URLs are no request)."""
    return [e["params"]["request"]["url"] for e in events
            if e.get("method") == "Network.requestWillBeSent"
            and e["params"]["request"]["url"] != page
            and not e["params"]["request"]["url"].startswith("data:")]
