"""A minimal in-memory Hugging Face Hub-protocol server on loopback, for the hub tests (stdlib only).

Speaks just enough of the Hub HTTP API for the real `huggingface_hub` client (v2.4.0) to do:
  create_repo / create_branch / upload_folder / create_commit / model_info / list_repo_tree /
  list_repo_refs / hf_hub_download / snapshot_download.

All uploads are forced through the "regular" (inline base64 in the commit ndjson) path by answering
`uploadMode: "regular"` in /preupload, so neither LFS/S3 nor Xet is ever needed. No X-Xet-Hash header
is ever sent, so downloads always use plain HTTP GET on /resolve.

Usage:
    srv = HubServer(tokens={"x"})          # tokens=None -> accept any/no token
    srv.start(); endpoint = srv.endpoint   # e.g. http://127.0.0.1:54321
    ... set HF_ENDPOINT=endpoint BEFORE importing huggingface_hub ...
    srv.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote


def git_blob_sha1(data: bytes) -> str:
    """git-style blob id (what the Hub returns as `oid` and as ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, extra_headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra_headers = extra_headers or {}


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: dict[str, dict] = {}  # sha -> {"files": {path: bytes}, "parent", "title", "date"}
        self.branches: dict[str, str] = {}
        sha = self._new_commit({}, None, "initial commit")
        self.branches["main"] = sha

    def _new_commit(self, files: dict, parent: str | None, title: str) -> str:
        seed = f"{self.repo_id}|{parent}|{title}|{time.time_ns()}|{len(self.commits)}".encode()
        sha = hashlib.sha1(seed).hexdigest()
        self.commits[sha] = {
            "files": files,
            "parent": parent,
            "title": title,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        return sha

    def resolve(self, rev: str) -> str:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.commits:
            return rev
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")


class HubState:
    def __init__(self, tokens: set[str] | None, auto_create_branch: bool):
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.tokens = tokens  # None => no auth check at all
        self.auto_create_branch = auto_create_branch
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, handy for assertions
        self.fail_commits = (
            False  # reject commits after preupload, as a Hub failing mid-upload would (422: not retried)
        )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MiniHub/0.1"
    state: HubState  # injected

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        # Always drain the request body BEFORE answering (even on errors): with HTTP/1.1 keep-alive,
        # leftover body bytes would be parsed as the next request line.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        ctype: str = "application/json",
        head: bool = False,
        length: int | None = None,
    ):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False):
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _check_write_auth(self):
        st = self.state
        if st.tokens is None:
            return
        tok = self._token()
        if tok is None or tok not in st.tokens:
            # Real Hub wording; the client maps it to a plain HfHubHTTPError (not RepositoryNotFoundError)
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _get_repo(self, repo_id: str, write: bool = False) -> Repo:
        st = self.state
        repo = st.repos.get(repo_id)
        authed = st.tokens is None or self._token() in st.tokens
        if repo is None or (repo.private and not authed):
            # Hub answers 401 (unauthenticated) / 404 with X-Error-Code: RepoNotFound for both cases
            raise HubError(401 if not authed else 404, "RepoNotFound", "Repository not found")
        if write:
            self._check_write_auth()
        return repo

    def _dispatch(self, method: str):
        st = self.state
        raw_path, _, raw_query = self.path.partition("?")
        query = {k: v[-1] for k, v in parse_qs(raw_query).items()}
        segs = raw_path.split("/")[1:]  # keep %-escapes per segment (revisions are quoted with safe="")
        st.log.append((method, raw_path))
        self._raw_body = self._read_body()
        head = method == "HEAD"
        try:
            with st.lock:
                return self._route(method, segs, query, head)
        except HubError as e:
            hdrs = dict(e.extra_headers)
            if e.code:
                hdrs["X-Error-Code"] = e.code
            hdrs["X-Error-Message"] = e.message
            self._json(e.status, {"error": e.message}, hdrs, head=head)

    # ------------------------------------------------------------------ routes
    def _route(self, method, segs, query, head):
        st = self.state
        base = f"http://{self.headers.get('Host')}"

        # POST /api/repos/create  {"name","organization","visibility"?,"private"?,"type"?}
        if method == "POST" and segs[:3] == ["api", "repos", "create"]:
            self._check_write_auth()
            p = json.loads(self._body() or b"{}")
            if p.get("type", "model") != "model":
                raise HubError(400, None, "only model repos supported by this test server")
            repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"]
            url = f"{base}/{repo_id}"
            if repo_id in st.repos:
                # Client's exist_ok path reads r.json()["url"] even on 409 => keep "url" in the body.
                return self._json(409, {"error": "You already created this model repo", "url": url})
            private = p.get("visibility") == "private" or bool(p.get("private"))
            st.repos[repo_id] = Repo(repo_id, private=private)
            return self._json(200, {"url": url, "name": repo_id, "id": repo_id})

        # POST /api/validate-yaml  (called when README.md is uploaded)
        if method == "POST" and segs[:2] == ["api", "validate-yaml"]:
            self._body()
            return self._json(200, {"errors": [], "warnings": []})

        # /api/models/{ns}/{name}/...
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id = f"{segs[2]}/{segs[3]}"
            rest = segs[4:]
            body = self._body()
            repo = self._get_repo(repo_id, write=(method == "POST"))

            # GET /api/models/{repo}  |  /api/models/{repo}/revision/{rev}
            if method == "GET" and (not rest or rest[0] == "revision"):
                rev = unquote(rest[1]) if rest else "main"
                sha = repo.resolve(rev)
                files = repo.commits[sha]["files"]
                return self._json(
                    200,
                    {
                        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                        "id": repo_id,
                        "modelId": repo_id,
                        "author": repo_id.split("/")[0],
                        "sha": sha,
                        "private": repo.private,
                        "gated": False,
                        "disabled": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": [],
                        "lastModified": repo.commits[sha]["date"],
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                )

            # GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true|false&expand=...
            if method == "GET" and rest and rest[0] == "tree":
                sha = repo.resolve(unquote(rest[1]))
                prefix = unquote("/".join(rest[2:])).strip("/")
                recursive = query.get("recursive", "false").lower() == "true"
                files = repo.commits[sha]["files"]
                entries, dirs = [], set()
                for path in sorted(files):
                    if prefix and not path.startswith(prefix + "/"):
                        continue
                    rel = path[len(prefix) + 1 :] if prefix else path
                    parts = rel.split("/")
                    for i in range(1, len(parts)):  # parent folders
                        d = "/".join(([prefix] if prefix else []) + parts[:i])
                        if (recursive or i == 1) and d not in dirs:
                            dirs.add(d)
                            entries.append({"type": "directory", "path": d, "oid": "0" * 40, "size": 0})
                    if recursive or len(parts) == 1:
                        data = files[path]
                        entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)})
                if prefix and not entries:
                    raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {sha}")
                return self._json(200, entries)  # no Link header => single page

            # GET /api/models/{repo}/refs
            if method == "GET" and rest and rest[0] == "refs":
                return self._json(
                    200,
                    {
                        "branches": [
                            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()
                        ],
                        "tags": [],
                        "converts": [],
                    },
                )

            # POST /api/models/{repo}/branch/{branch}  {"startingPoint"?: rev}
            if method == "POST" and rest and rest[0] == "branch":
                branch = unquote(rest[1])
                p = json.loads(body or b"{}")
                if branch in repo.branches:
                    raise HubError(409, None, f"Reference refs/heads/{branch} already exists")
                repo.branches[branch] = repo.resolve(p.get("startingPoint") or "main")
                return self._json(200, {})

            # POST /api/models/{repo}/preupload/{rev}  {"files":[{"path","sample","size"}], "gitIgnore"?}
            if method == "POST" and rest and rest[0] == "preupload":
                rev = unquote(rest[1])
                if rev not in repo.branches and not st.auto_create_branch:
                    repo.resolve(rev)  # raises RevisionNotFound
                current = repo.commits[repo.branches[rev]]["files"] if rev in repo.branches else {}
                p = json.loads(body)
                out = []
                for f in p["files"]:
                    old = current.get(f["path"])
                    out.append(
                        {
                            "path": f["path"],
                            "uploadMode": "regular",  # <- never "lfs": avoids LFS/S3 and Xet entirely
                            "shouldIgnore": False,  # REQUIRED key (client indexes it directly)
                            "oid": git_blob_sha1(old) if old is not None else None,  # lets client skip unchanged
                        }
                    )
                return self._json(200, {"files": out, "commitOid": repo.branches.get(rev)})

            # POST /api/models/{repo}/commit/{rev}  (application/x-ndjson)
            if method == "POST" and rest and rest[0] == "commit" and st.fail_commits:
                raise HubError(422, None, "commit failed: the storage backend went away")
            if method == "POST" and rest and rest[0] == "commit":
                rev = unquote(rest[1])
                if rev not in repo.branches:
                    if not st.auto_create_branch:
                        repo.resolve(rev)  # raises RevisionNotFound (commit sha is not a branch either)
                        raise HubError(400, None, f"Cannot commit to non-branch revision {rev}")
                    repo.branches[rev] = repo.branches["main"]
                parent = repo.branches[rev]
                files = dict(repo.commits[parent]["files"])
                title = "commit"
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key, v = item["key"], item["value"]
                    if key == "header":
                        title = v.get("summary") or title
                        pc = v.get("parentCommit")
                        if pc and pc != parent:
                            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
                    elif key == "file":
                        if v.get("encoding") != "base64":
                            raise HubError(400, None, "only base64 encoding supported")
                        files[v["path"]] = base64.b64decode(v["content"])
                    elif key == "lfsFile":
                        raise HubError(400, None, "LFS not supported by this test server")
                    elif key == "deletedFile":
                        if files.pop(v["path"], None) is None:
                            raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
                    elif key == "deletedFolder":
                        pre = v["path"].rstrip("/") + "/"
                        for k in [k for k in files if k.startswith(pre)]:
                            del files[k]
                sha = repo._new_commit(files, parent, title)
                repo.branches[rev] = sha
                return self._json(
                    200,
                    {
                        "success": True,
                        "commitOid": sha,
                        "commitUrl": f"{base}/{repo_id}/commit/{sha}",
                        "pullRequestUrl": None,
                    },
                )

            raise HubError(404, None, f"Not implemented: {method} /{'/'.join(segs)}")

        # HEAD|GET /{ns}/{name}/resolve/{rev}/{path...}
        if method in ("HEAD", "GET") and len(segs) >= 5 and segs[2] == "resolve":
            repo_id = f"{segs[0]}/{segs[1]}"
            repo = self._get_repo(repo_id)
            sha = repo.resolve(unquote(segs[3]))
            path = unquote("/".join(segs[4:]))
            data = repo.commits[sha]["files"].get(path)
            if data is None:
                # X-Repo-Commit on EntryNotFound lets the client cache the ".no_exist" marker
                raise HubError(404, "EntryNotFound", f"{path} does not exist on {sha}", {"X-Repo-Commit": sha})
            etag = git_blob_sha1(data)
            hdrs = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            # Minimal Range support (client resumes interrupted downloads with `Range: bytes=N-`)
            rng = self.headers.get("Range")
            if method == "GET" and rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[6:].partition("-")
                start = int(start_s or 0)
                end = int(end_s) if end_s else len(data) - 1
                chunk = data[start : end + 1]
                hdrs["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
                return self._send(206, chunk, hdrs, ctype="application/octet-stream")
            return self._send(200, data, hdrs, ctype="application/octet-stream", head=head)

        raise HubError(404, None, f"Not implemented: {method} /{'/'.join(segs)}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")


class HubServer:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, tokens: set[str] | None = None, auto_create_branch: bool = False
    ):
        self.state = HubState(tokens, auto_create_branch)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
