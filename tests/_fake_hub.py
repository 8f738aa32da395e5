"""A Hugging Face hub on 127.0.0.1 for tests: the endpoints ``huggingface_hub.snapshot_download``
uses (``/api/models/{repo}/revision/{rev}``, ``/api/models/{repo}/tree/{sha}``, ``HEAD``/``GET``
``/{repo}/resolve/{rev}/{file}``), serving repositories given as ``{repo: {revision: {file: bytes}}}``.
Every request is recorded in ``hub.requests`` as ``(method, path)``."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]):
        self.repos = {}
        for repo, revs in repos.items():
            self.repos[repo] = {}
            for rev, files in revs.items():
                sha = hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest()
                self.repos[repo][rev] = (sha, files)
                self.repos[repo][sha] = (sha, files)
        self.requests: list[tuple[str, str]] = []
        self.auth: list[str | None] = []  # the Authorization header of each request
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b"", headers=(), head=False):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, code=200):
                self._send(code, json.dumps(obj).encode(), [("Content-Type", "application/json")])

            def _lookup(self, repo, rev):
                if repo not in hub.repos:
                    self._send(404, b'{"error": "Repository not found"}', [("X-Error-Code", "RepoNotFound")])
                    return None
                if rev not in hub.repos[repo]:
                    self._send(404, b'{"error": "Invalid rev id"}', [("X-Error-Code", "RevisionNotFound")])
                    return None
                return hub.repos[repo][rev]

            def _handle(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(("HEAD" if head else "GET", path))
                hub.auth.append(self.headers.get("Authorization"))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    i = parts.index("revision") if "revision" in parts else parts.index("tree")
                    repo, rev = "/".join(parts[2:i]), parts[i + 1]
                    found = self._lookup(repo, rev)
                    if found is None:
                        return
                    sha, files = found
                    if parts[i] == "revision":
                        return self._json({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]})
                    return self._json(
                        [
                            {
                                "type": "file",
                                "path": f,
                                "size": len(b),
                                "oid": hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest(),
                            }
                            for f, b in files.items()
                        ]
                    )
                if "resolve" in parts:
                    i = parts.index("resolve")
                    repo, rev, name = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :])
                    found = self._lookup(repo, rev)
                    if found is None:
                        return
                    sha, files = found
                    if name not in files:
                        return self._send(404, b"", [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", sha)], head)
                    body = files[name]
                    etag = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
                    return self._send(200, body, [("X-Repo-Commit", sha), ("ETag", f'"{etag}"')], head)
                self._send(404, b"")

            def do_GET(self):
                self._handle(False)

            def do_HEAD(self):
                self._handle(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def downloads(self) -> list[str]:
        """The files fetched with GET so far."""
        return [p.split("/resolve/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
