"""A minimal in-memory Hugging Face Hub on 127.0.0.1, for testing pushes and downloads without network.

It speaks the endpoints huggingface_hub 2.4 calls for `create_repo`, `upload_folder` (regular files,
sent base64 in the NDJSON commit; the server never asks for LFS/Xet) and `snapshot_download`
(`repo_info`, `list_repo_tree`, HEAD/GET ``resolve``). Everything it receives is kept: ``requests``
(method, path, headers, body) and ``repos`` (files per commit, byte for byte).

    with HubServer() as hub:
        HfApi(endpoint=hub.url).create_repo("org/x")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/?]+)"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict = field(default_factory=dict)  # oid -> {path: bytes}
    branches: dict = field(default_factory=dict)  # name -> oid
    messages: dict = field(default_factory=dict)  # oid -> summary

    def files(self, rev: str) -> dict | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)

    def resolve(self, rev: str) -> str | None:
        oid = self.branches.get(rev, rev)
        return oid if oid in self.commits else None


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _record(self, body: bytes) -> None:
                with hub.lock:
                    hub.requests.append(
                        {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                    )

            def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
                data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
                self.send_response(status)
                if raw is None:
                    self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str, message: str):
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def do_POST(self):
                body = self._body()
                self._record(body)
                path = urlsplit(self.path).path
                if path == "/api/repos/create":
                    return hub._create_repo(self, json.loads(body))
                if path == "/api/validate-yaml":
                    return hub._validate_yaml(self, json.loads(body))
                if m := re.fullmatch(rf"/api/models/{REPO}/preupload/{REV}", path):
                    return hub._preupload(self, unquote(m["repo"]), unquote(m["rev"]), json.loads(body))
                if m := re.fullmatch(rf"/api/models/{REPO}/commit/{REV}", path):
                    return hub._commit(self, unquote(m["repo"]), unquote(m["rev"]), body)
                self._error(404, "EndpointNotFound", f"no endpoint POST {path}")

            def do_GET(self):
                self._record(b"")
                path = urlsplit(self.path).path
                if m := re.fullmatch(rf"/api/models/{REPO}/revision/{REV}", path):
                    return hub._repo_info(self, unquote(m["repo"]), unquote(m["rev"]))
                if m := re.fullmatch(rf"/api/models/{REPO}/tree/{REV}(?:/(?P<sub>.*))?", path):
                    return hub._tree(self, unquote(m["repo"]), unquote(m["rev"]), unquote(m["sub"] or ""))
                if m := re.fullmatch(rf"/{REPO}/resolve/{REV}/(?P<file>.+)", path):
                    return hub._resolve(self, unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]))
                self._error(404, "EndpointNotFound", f"no endpoint GET {path}")

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- endpoints -----------------------------------------------------------------------------
    def _repo(self, handler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            handler._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _create_repo(self, handler, payload: dict):
        if payload.get("type", "model") != "model":
            return handler._error(400, "BadRequest", "this test hub only hosts model repos")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{repo_id}"
        with self.lock:
            if repo_id in self.repos:
                return handler._send(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            empty = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            repo.commits[empty] = {}
            repo.branches["main"] = empty
            self.repos[repo_id] = repo
        handler._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, handler, payload: dict):
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as e:
            return handler._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if m and not isinstance(meta, dict):
            return handler._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
        handler._send(200, {"errors": [], "warnings": []})

    def _preupload(self, handler, repo_id: str, rev: str, payload: dict):
        if (repo := self._repo(handler, repo_id)) is None:
            return
        files = repo.files(rev) or {}
        out = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # never LFS: the content comes base64 in the commit
                "shouldIgnore": False,
                "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
            }
            for f in payload["files"]
        ]
        handler._send(200, {"files": out, "commitOid": repo.resolve(rev)})

    def _commit(self, handler, repo_id: str, rev: str, body: bytes):
        if (repo := self._repo(handler, repo_id)) is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return handler._error(400, "BadRequest", "the commit payload must start with a header line")
        with self.lock:
            parent = repo.resolve(rev)
            if parent is None:
                return handler._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(repo.commits[parent])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        return handler._error(400, "BadRequest", "only base64 file content is supported")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return handler._error(400, "BadRequest", f"unsupported commit operation {key!r}")
            digest = hashlib.sha1(parent.encode())
            for path in sorted(files):
                digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
            digest.update(lines[0]["value"]["summary"].encode())
            oid = digest.hexdigest()
            repo.commits[oid] = files
            repo.branches[rev] = oid
            repo.messages[oid] = lines[0]["value"]["summary"]
        handler._send(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True,
                            "pullRequestUrl": None})

    def _repo_info(self, handler, repo_id: str, rev: str):
        if (repo := self._repo(handler, repo_id)) is None:
            return
        oid = repo.resolve(rev)
        if oid is None:
            return handler._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[oid]
        handler._send(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
            "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
            "tags": [], "downloads": 0, "likes": 0, "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
        })

    def _tree(self, handler, repo_id: str, rev: str, sub: str):
        if (repo := self._repo(handler, repo_id)) is None:
            return
        files = repo.files(rev)
        if files is None:
            return handler._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        prefix = f"{sub.strip('/')}/" if sub else ""
        handler._send(200, [
            {"type": "file", "oid": git_blob_oid(b), "size": len(b), "path": p}
            for p, b in sorted(files.items()) if p.startswith(prefix)
        ])

    def _resolve(self, handler, repo_id: str, rev: str, path: str):
        if (repo := self._repo(handler, repo_id)) is None:
            return
        oid = repo.resolve(rev)
        if oid is None:
            return handler._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        content = repo.commits[oid].get(path)
        if content is None:
            return handler._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        handler._send(200, raw=content, headers={
            "X-Repo-Commit": oid, "ETag": f'"{git_blob_oid(content)}"', "Content-Type": "application/octet-stream",
        })
