"""A stand-in for the Hugging Face Hub on 127.0.0.1, served from the test process.

It answers what ``huggingface_hub`` asks (``HF_ENDPOINT`` points the client here): the model
API (``GET /api/models/owner/name`` with per-file sizes, LFS sha256 and git blob ids) and file
resolution (``HEAD``/``GET /owner/name/resolve/REV/PATH`` with ``X-Repo-Commit``, ETag,
``X-Linked-Size``, Range requests). Unknown repos answer 401 RepoNotFound and gated repos 401
GatedRepo without the right token, as the real Hub does. Tests can cut a file's transfer
mid-way, take the server "down" (503), corrupt what it serves, and read the request log.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

GOOD_TOKEN = "hf_goodtoken"
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    commit: str = ""

    def __post_init__(self):
        if not self.commit:
            h = hashlib.sha1()
            for name in sorted(self.files):
                h.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.commit = h.hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    cut: dict[str, int] = field(default_factory=dict)  # file -> bytes to send before dropping the connection (once)
    down: bool = False  # every file transfer answers 503 (the API and HEAD still answer)
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped

    def add(self, repo_id: str, files: dict[str, bytes], gated: bool = False) -> Repo:
        self.repos[repo_id] = Repo(dict(files), gated)
        return self.repos[repo_id]

    def gets(self, name: str) -> list[str | None]:
        """The Range headers of the GET requests for file ``name`` (None: the whole file)."""
        return [r for m, p, r in self.log if m == "GET" and p.endswith("/" + name) and "/resolve/" in p]

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD" and body:
                    self.wfile.write(body)

            def _error(self, code: int, error_code: str, message: str = "") -> None:
                self._send(
                    code,
                    {
                        "X-Error-Code": error_code,
                        "X-Error-Message": message or error_code,
                        "Content-Type": "application/json",
                    },
                    json.dumps({"error": message or error_code}).encode(),
                )

            def _authorized(self, repo: Repo) -> bool:
                return not repo.gated or self.headers.get("Authorization") == f"Bearer {GOOD_TOKEN}"

            def do_HEAD(self):
                self._route()

            def do_GET(self):
                self._route()

            def _route(self):
                path = unquote(urlsplit(self.path).path)
                hub.log.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self._api("/".join(parts[2:4]))
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                self._error(404, "NotFound")

            def _api(self, repo_id: str):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(401, "RepoNotFound", "Repository not found")
                siblings = []
                for name, data in sorted(repo.files.items()):
                    s = {"rfilename": name, "size": len(data), "blobId": _blob_id(data)}
                    if name.endswith(LFS_SUFFIXES):
                        s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                    siblings.append(s)
                body = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": siblings,
                    "tags": [],
                    "downloads": 0,
                }
                self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

            def _resolve(self, repo_id: str, rev: str, name: str):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(401, "RepoNotFound", "Repository not found")
                if not self._authorized(repo):
                    return self._error(401, "GatedRepo", "Access to model is restricted")
                if rev not in ("main", repo.commit):
                    return self._error(404, "RevisionNotFound")
                if name not in repo.files:
                    return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
                data = repo.files[name]
                etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else _blob_id(data)
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                if name.endswith(LFS_SUFFIXES):
                    headers["X-Linked-Etag"] = f'"{etag}"'
                    headers["X-Linked-Size"] = str(len(data))
                if self.command == "HEAD":
                    return self._send(200, {**headers, "Content-Length": str(len(data))})
                if hub.down:
                    return self._error(503, "ServiceUnavailable")
                if name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                body = data[start:]
                code = 206 if start else 200
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                cut = hub.cut.pop(name, None)
                if cut is not None:
                    self.send_response(code)
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    hub.down = True  # the network stays down until the test brings it back
                    return
                self._send(code, headers, body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
