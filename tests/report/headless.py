"""Open a page in headless Chromium and ask it what it rendered, over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes Chromium read protocol messages (JSON, NUL-terminated) from file
descriptor 3 and write its answers and events to descriptor 4: no port, no websocket client, no driver
binary, nothing installed but Debian's ``chromium`` package. What the report tests need from it:
console errors and uncaught exceptions (Runtime/Log events), every network request the page made
(Network events: a self-contained page makes none), the rendered size of each section's plot
(Runtime.evaluate), the load time, and a PNG screenshot (Page.captureScreenshot).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def find_chromium() -> str | None:
    """``$CALIBRA_CHROMIUM``, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("CALIBRA_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, binary: str, *, width: int = 1200, height: int = 1000, timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="calibra-chromium-")
        self._log = open(Path(self._profile.name) / "stderr.log", "wb")  # noqa: SIM115 - closed in close()
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def wire():  # in the child: the protocol's fds 3 (commands in) and 4 (answers out)
            a, b = os.dup(to_r), os.dup(from_w)  # above 4 first: the pipe's own fds may be 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # root in CI containers; the page is our own file
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--user-data-dir={self._profile.name}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # a file, not a pipe: a chatty browser would fill a pipe nobody reads and stall
            stderr=self._log,
            preexec_fn=wire,
            pass_fds=(3, 4, to_r, from_w),
        )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session = None
        self.width, self.height = width, height

    # -- protocol ----------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        for i, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read()
            if m.get("method") == method:
                return m
            self.events.append(m)

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_r, 1 << 16)
            if not chunk:
                err = (Path(self._profile.name) / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()}): {err[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    # -- one page ----------------------------------------------------------------------------------
    def open(self, path: Path) -> float:
        """Load ``path``; return the seconds from navigation start to the load event (the page's own
        navigation timing, so the protocol's round trips are not counted)."""
        if self.session is None:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
                "sessionId"
            ]
            for domain in ("Runtime", "Log", "Page", "Network"):
                self.send(f"{domain}.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
            )
        self.send("Page.navigate", {"url": Path(path).absolute().as_uri()})
        self.wait_event("Page.loadEventFired")
        t = self.evaluate(
            "(() => { const n = performance.getEntriesByType('navigation')[0]; "
            "return n.loadEventEnd || n.duration; })()"
        )
        return float(t) / 1000.0

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (a blocked or failed load, a CSP
        violation) seen so far."""
        self.evaluate("0")  # drain the events that arrived before this call
        out = []
        for m in self.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        """Every URL the page requested (the page's own file included)."""
        return [m["params"]["request"]["url"] for m in self.events if m.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, *, height: int | None = None) -> Path:
        clip = {"x": 0, "y": 0, "width": self.width, "height": height or self.height, "scale": 1}
        r = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        Path(path).write_bytes(base64.b64decode(r["data"]))
        return Path(path)

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_w, self._from_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        self._profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# what each section's plots rendered as: [{id, svgs: [[width, height], ...]}] in page order
SECTIONS_JS = """JSON.stringify([...document.querySelectorAll('section')].map(s => ({
  id: s.id,
  svgs: [...s.querySelectorAll('svg')].map(g => { const r = g.getBoundingClientRect(); return [r.width, r.height]; })
})))"""
