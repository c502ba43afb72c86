"""A Hugging Face hub on loopback (HF_ENDPOINT) serving a local model directory as one repo:
the few routes huggingface_hub's snapshot_download uses (repo info, file tree, file HEAD and GET),
so a download runs for real without leaving the machine."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from tests.hub_cache import hub_etag


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = ""
    branch: str = "main"
    chunk_delay_s: float = 0.0  # between 64 KiB chunks: a download slow enough to watch
    requests: list[str] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)  # bytes of each file served

    @classmethod
    def from_dir(cls, repo_id: str, model_dir: Path, chunk_delay_s: float = 0.0) -> HubRepo:
        files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}
        digest = hashlib.sha1(b"".join(n.encode() + d for n, d in files.items())).hexdigest()
        return cls(repo_id, files, commit=digest, chunk_delay_s=chunk_delay_s)

    def entry(self, name: str) -> dict[str, object]:
        data = self.files[name]
        item: dict[str, object] = {
            "type": "file",
            "path": name,
            "size": len(data),
            "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
        }
        if name.endswith(".safetensors"):
            sha = hashlib.sha256(data).hexdigest()
            item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 130}
        return item

    def etag(self, name: str) -> str:
        return hub_etag(name, self.files[name])


def _handler(repo: HubRepo) -> type[http.server.BaseHTTPRequestHandler]:
    class Hub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            step = 65536 if repo.chunk_delay_s else len(body) or 1
            for start in range(0, len(body), step):
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
                if repo.chunk_delay_s:
                    time.sleep(repo.chunk_delay_s)

        def _json(self, value: object) -> None:
            self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _not_found(self, error: str) -> None:
            body = json.dumps({"error": error}).encode()
            self._send(404, body, {"X-Error-Code": error, "Content-Type": "application/json"})

        def _revision_ok(self, revision: str) -> bool:
            return unquote(revision) in (repo.branch, repo.commit)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            repo.requests.append(f"{self.command} {path}")
            api = f"/api/models/{repo.repo_id}/"
            if path.startswith(api):
                kind, _, rest = path[len(api) :].partition("/")
                revision = rest.split("/")[0]
                if not self._revision_ok(revision):
                    return self._not_found("RevisionNotFound")
                if kind == "revision":
                    siblings = [{"rfilename": name} for name in repo.files]
                    info = {"id": repo.repo_id, "sha": repo.commit, "siblings": siblings}
                    return self._json(info)
                if kind == "tree":
                    return self._json([repo.entry(name) for name in repo.files])
            if path.startswith("/api/models/"):
                return self._not_found("RepoNotFound")
            prefix = f"/{repo.repo_id}/resolve/"
            if not path.startswith(prefix):
                return self._not_found("RepoNotFound")
            revision, _, name = path[len(prefix) :].partition("/")
            if not self._revision_ok(revision):
                return self._not_found("RevisionNotFound")
            if name not in repo.files:
                return self._not_found("EntryNotFound")
            data = repo.files[name]
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{repo.etag(name)}"',
                "Content-Type": "application/octet-stream",
            }
            if name.endswith(".safetensors"):
                headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
                headers["X-Linked-Size"] = str(len(data))
            if self.command == "GET":
                repo.sent[name] += len(data)
            return self._send(200, data, headers)

    return Hub


@contextlib.contextmanager
def serving(repo: HubRepo, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `repo` until the block ends; yields the endpoint for HF_ENDPOINT."""
    server = http.server.ThreadingHTTPServer((host, 0), _handler(repo))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
