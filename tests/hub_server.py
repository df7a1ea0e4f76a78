"""A minimal local Hugging Face Hub for tests: stdlib HTTP on 127.0.0.1, model repos held in memory.

Implements the routes huggingface_hub uses for create_repo, upload (preupload + commit, every file inline,
no LFS), model_info and file download (resolve). Point clients at it with HF_ENDPOINT=<LocalHub.url>,
set before huggingface_hub is imported.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


class LocalHub:
    """Start with `with LocalHub() as hub:`; `hub.url` is the endpoint, `hub.repos[repo_id]` the files."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo_id: str, added: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            files = self.repos[repo_id]
            files.update(added)
            for path in deleted:
                files.pop(path, None)
            digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in files.items())).encode())
            self.commits[repo_id] = digest.hexdigest()
            return self.commits[repo_id]


def _handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _reply(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head=False):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _not_found(self, code: str, head=False):
            self._reply(404, {"error": code}, {"X-Error-Code": code}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_POST(self):
            path = unquote(urlsplit(self.path).path)
            if path == "/api/repos/create":
                request = json.loads(self._body())
                repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                with hub.lock:
                    hub.repos.setdefault(repo_id, {})
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
            if path == "/api/validate-yaml":
                self._body()
                return self._reply(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path):
                files = json.loads(self._body())["files"]
                if m["repo"] not in hub.repos:
                    return self._not_found("RepoNotFound")
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
                return self._reply(200, {"files": modes})
            if m := re.fullmatch(rf"/api/models/{REPO}/commit/[^/]+", path):
                if m["repo"] not in hub.repos:
                    return self._not_found("RepoNotFound")
                added, deleted = {}, []
                for line in self._body().decode().splitlines():
                    item = json.loads(line) if line.strip() else {}
                    if item.get("key") == "file":
                        added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item.get("key") == "deletedFile":
                        deleted.append(item["value"]["path"])
                sha = hub.commit(m["repo"], added, deleted)
                return self._reply(200, {"commitUrl": f"{hub.url}/{m['repo']}/commit/{sha}", "commitOid": sha})
            self._reply(404, {"error": f"unknown route POST {path}"})

        def do_GET(self, head=False):
            path = unquote(urlsplit(self.path).path)
            if m := re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", path):
                if m["repo"] not in hub.repos:
                    return self._not_found("RepoNotFound", head)
                siblings = [{"rfilename": name} for name in sorted(hub.repos[m["repo"]])]
                info = {"id": m["repo"], "modelId": m["repo"], "sha": hub.commits.get(m["repo"]), "siblings": siblings}
                return self._reply(200, info, head=head)
            if m := re.fullmatch(rf"/{REPO}/resolve/[^/]+/(?P<file>.+)", path):
                files = hub.repos.get(m["repo"])
                if files is None:
                    return self._not_found("RepoNotFound", head)
                if m["file"] not in files:
                    return self._not_found("EntryNotFound", head)
                data = files[m["file"]]
                headers = {"X-Repo-Commit": hub.commits[m["repo"]], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                return self._reply(200, data, headers, head=head)
            self._reply(404, {"error": f"unknown route GET {path}"}, head=head)

        def do_HEAD(self):
            self.do_GET(head=True)

    return Handler
