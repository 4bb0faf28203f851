"""Start `mixcli serve` on a free 127.0.0.1 port in a subprocess, as a user would, for the server tests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 300  # the first start compiles the kernels on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mixcli", "serve", str(model), "--port", str(self.port), *args]
        self.log = open(Path(os.environ.get("PYTEST_DEBUG_TEMPROOT", "/tmp")) / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mixcli serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mixcli serve did not start in {START_TIMEOUT} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw):
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=kw.pop("api_key", "unused"),
            max_retries=0,
            timeout=kw.pop("timeout", 120),
            **kw,
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60
    ):
        """(status, headers with lower-case names, parsed JSON body) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(data) if data else None
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health", timeout=10)[2]

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
