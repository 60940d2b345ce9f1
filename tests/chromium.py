"""Render a local HTML file in headless Chromium and report what happened (stdlib only).

Chromium speaks the DevTools protocol over two pipes (``--remote-debugging-pipe``: it reads
commands on fd 3 and writes replies/events on fd 4, NUL-separated JSON), so no websocket
client is needed. ``render(path)`` returns console errors, uncaught exceptions, every request
the page made that is not ``file:``/``data:``/``blob:``/``about:``, facts from the DOM and a
screenshot. DNS is mapped to nowhere, so even a request the page tries cannot leave the
machine (it is still reported).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CORELENS_CHROMIUM", "/usr/bin/chromium")  # override for tests
INSTALL_HINT = ("headless Chromium is needed for this test: install Debian's chromium with "
                "`apt-get update && apt-get install -y chromium` (it must be at /usr/bin/chromium)")
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")

DOM_PROBE = """(() => {
  const imgs = [...document.querySelectorAll('img')];
  const cv = [...document.querySelectorAll('[id^="circuits-vis-"]')];
  return JSON.stringify({
    images: imgs.length,
    images_loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    image_sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight]),
    circuitsvis: cv.length,
    circuitsvis_rendered: cv.filter(d => d.childElementCount > 0).length,
    text: document.body ? document.body.innerText : '',
    external: [...document.querySelectorAll('script[src],link[href],img[src],iframe[src]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !/^(data:|blob:|#)/.test(u)),
  });
})()"""


READY = """(() => {
  const cv = [...document.querySelectorAll('[id^="circuits-vis-"]')];
  const imgs = [...document.querySelectorAll('img')];
  return cv.every(d => d.childElementCount > 0) && imgs.every(i => i.complete);
})()"""


@dataclass
class RenderResult:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # non-local URLs the page asked for
    dom: dict[str, Any] = field(default_factory=dict)
    probe: Any = None  # what ``render(probe=...)`` returned
    screenshot: bytes = b""


def available() -> bool:
    return os.path.exists(CHROMIUM)


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_chrome: int, from_chrome: int) -> None:
        self.proc, self.w, self.r = proc, to_chrome, from_chrome
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == mid:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    def wait_for(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            try:
                self.events.append(self._read_message(deadline))
            except TimeoutError:
                return False
        return True


def render(path: str | Path, width: int = 1280, height: int = 2000,
           settle: float = 1.0, timeout: float = 90.0, probe: str | None = None) -> RenderResult:
    """Open ``path`` (a local HTML file) in a fresh headless Chromium profile; wait until it
    has loaded and every circuitsvis view has rendered (or ``timeout``), then ``settle``.
    ``probe``: a JS expression returning a JSON string, evaluated last (``RenderResult.probe``)."""
    url = Path(path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="corelens-chromium-")
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    def child_fds() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
        import fcntl

        a = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)  # dup2 makes them inheritable: they survive the exec
        os.dup2(b, 4)

    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", "--disable-default-apps",
            "--disable-extensions", "--mute-audio", "--disable-dev-shm-usage",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}", f"--window-size={width},{height}",
            "--remote-debugging-pipe", "about:blank"]
    proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    out = RenderResult()
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                            )["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  session=session)
        pipe.call("Page.navigate", {"url": url}, session=session)
        if not pipe.wait_for("Page.loadEventFired", timeout):
            raise TimeoutError(f"{url} did not finish loading in {timeout}s")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # React renders asynchronously
            ready = pipe.call("Runtime.evaluate", {"expression": READY, "returnByValue": True},
                              session=session)
            if ready.get("result", {}).get("value"):
                break
            pipe.pump(0.25)
        pipe.pump(settle)  # any late request or error shows up
        dom = pipe.call("Runtime.evaluate", {"expression": DOM_PROBE, "returnByValue": True},
                        session=session)
        out.dom = json.loads(dom["result"]["value"])
        if probe is not None:
            found = pipe.call("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                              session=session)
            out.probe = json.loads(found["result"]["value"])
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
        out.screenshot = base64.b64decode(shot["data"])
        for e in pipe.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.console_errors.append(" ".join(str(a.get("value", a.get("description")))
                                                   for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.exceptions.append(str(d.get("exception", {}).get("description")
                                          or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                out.console_errors.append(f"{entry.get('source')}: {entry.get('text')} "
                                          f"{entry.get('url', '')}")
            elif m == "Network.requestWillBeSent":
                req_url = p.get("request", {}).get("url", "")
                if not req_url.startswith(LOCAL_SCHEMES):
                    out.requests.append(req_url)
    finally:
        try:
            pipe.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_w)
        os.close(from_r)
        shutil.rmtree(profile, ignore_errors=True)
    return out
