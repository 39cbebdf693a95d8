"""A local stand-in for the Hugging Face Hub: the HTTP endpoints huggingface_hub 2.x reads repos
through, serving repos from local directories; standard library only. Used by the tests
(tests/conftest.py's `hub` fixture) and by `python bench.py --data`.

A repo has branches ("main" first), each pointing at a commit, and a commit is a directory of files.
Files ending in LFS_SUFFIXES are served as the Hub serves LFS files: their resolve URL answers 302
to a CDN on another origin (`localhost` for `127.0.0.1`, same port), which serves the bytes, with
HTTP ranges. Every request is logged in `log`.

The write API is served too: create a repo or a branch, preupload (every file "regular", so the
client sends it inline in the commit, base64), commit (NDJSON), list a branch's commits, and tags:
create_tag (409 for a tag that exists), delete_tag, list_repo_refs. A tag names a commit wherever
a revision is read. A commit is a new directory, its parent's files with the commit's written over
them, in a temporary directory removed by stop(); its title is kept for list_repo_commits.
`fail_commits = 500` makes every commit answer that status, `fail_tags = 500` every tag's creation;
`stalled.set()` makes every request wait, unanswered (a Hub that stopped answering), until stop().

To add an endpoint: add a `(methods, pattern, handler name)` entry to Handler.ROUTES and a method
that answers with `reply`.
"""

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".parquet", ".safetensors", ".pt", ".bin")
REPO = r"(?P<type>datasets|models)/(?P<repo>[^/]+(?:/[^/]+)?)"  # as API paths name a repo


def client_config(endpoint: str, cache_dir, offline: bool = False) -> tuple[dict, dict]:
    """(environment, huggingface_hub.constants) that point huggingface_hub at `endpoint`, with its
    cache in `cache_dir` and no stored login. The library reads the environment once, at import:
    a process that has imported it needs the constants set too, a subprocess the environment."""
    cache, token_path = str(cache_dir), str(Path(cache_dir).parent / "hf-token")
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_TOKEN_PATH": token_path}
    constants = {"ENDPOINT": endpoint, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": offline,
                 "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                 "HF_TOKEN_PATH": token_path}
    return env, constants


def point_huggingface_hub_at(monkeypatch, endpoint: str, cache_dir, offline: bool = False):
    """client_config applied with pytest's monkeypatch (undone after the test), and no HF_TOKEN."""
    from huggingface_hub import constants

    env, values = client_config(endpoint, cache_dir, offline)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key, value in values.items():
        monkeypatch.setattr(constants, key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)


class HubServer:
    def __init__(self):
        self.branches: dict[tuple[str, str], dict[str, str]] = {}  # (type, repo) -> {branch: sha}
        self.tags: dict[tuple[str, str], dict[str, str]] = {}  # (type, repo) -> {tag: sha}
        self.commits: dict[str, Path] = {}  # commit sha -> the directory of its files
        self.history: dict[str, dict] = {}  # sha of a written commit -> title, message, date, parent
        self.fail_commits: int | None = None  # a status every commit is answered with (500, say)
        self.fail_tags: int | None = None  # and every creation of a tag
        self.stalled = threading.Event()  # set: every request is taken and never answered
        self.stalled_downloads = threading.Event()  # set: so is every whole .parquet file's GET
        self.released = threading.Event()  # set by stop(): the stalled requests end
        self.storage = Path(tempfile.mkdtemp(prefix="hub-server-"))  # written commits' files
        self.log: list[dict] = []  # method, host, path, query, range, authorization
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.hub = True, self
        port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"  # HF_ENDPOINT
        self.cdn = f"http://localhost:{port}"  # another origin, as the Hub's CDN is
        self._ids: dict[tuple, tuple[str, str]] = {}

    def add_repo(self, repo_id: str, directory, branch: str = "main", repo_type: str = "dataset") -> str:
        """Serve `directory` as `branch` of a repo (made if new); returns the commit's sha."""
        with self.lock:
            sha = hashlib.sha1(f"{repo_type}/{repo_id}@{branch}#{len(self.commits)}".encode()).hexdigest()
            self.commits[sha] = Path(directory)
            self.branches.setdefault((repo_type + "s", repo_id), {})[branch] = sha
        return sha

    def write_commit(self, kind: str, repo: str, branch: str, files: dict[str, bytes | None],
                     title: str, message: str = "") -> str:
        """A new commit on `branch` (kind "models" or "datasets"): the files of the branch's head,
        if any, with `files` written (None: deleted); returns its sha."""
        with self.lock:
            parent = self.branches.get((kind, repo), {}).get(branch)
            sha = hashlib.sha1(f"{kind}/{repo}@{branch}#{len(self.commits)}".encode()).hexdigest()
            directory = self.storage / sha
            if parent:
                shutil.copytree(self.commits[parent], directory)
            directory.mkdir(exist_ok=True)
            for path, content in files.items():
                (directory / path).unlink(missing_ok=True)
                if content is not None:
                    (directory / path).parent.mkdir(parents=True, exist_ok=True)
                    (directory / path).write_bytes(content)
            self.commits[sha] = directory
            self.history[sha] = {"repo": (kind, repo), "title": title, "message": message, "parent": parent,
                                 "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
            self.branches.setdefault((kind, repo), {})[branch] = sha
        return sha

    def requests_for(self, text: str) -> list[dict]:
        """The logged requests whose path contains `text` (a file name, say)."""
        with self.lock:
            return [r for r in self.log if text in r["path"]]

    def start(self) -> "HubServer":
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        shutil.rmtree(self.storage, ignore_errors=True)

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    def file_ids(self, path: Path) -> tuple[str, str]:
        """(git blob sha1, sha256) of a file: its ETag as a git file and as an LFS file."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._ids:
            content = path.read_bytes()
            self._ids[key] = (hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
                              hashlib.sha256(content).hexdigest())
        return self._ids[key]


class Handler(BaseHTTPRequestHandler):
    ROUTES = [  # (methods, pattern of the URL path, handler); the groups are passed unquoted
        (("HEAD", "GET"), r"^/(?:(?P<type>datasets)/)?(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)"
                          r"/(?P<path>.+)$", "resolve"),  # model repos have no prefix here
        (("HEAD", "GET"), r"^/cdn/(?P<sha>[0-9a-f]{40})/(?P<path>.+)$", "cdn"),
        (("GET",), rf"^/api/{REPO}(?:/revision/(?P<rev>[^/]+))?$", "revision"),
        (("GET",), rf"^/api/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", "tree"),
        (("POST",), r"^/api/repos/create$", "create_repo"),
        (("POST",), rf"^/api/{REPO}/branch/(?P<branch>[^/]+)$", "create_branch"),
        (("POST",), rf"^/api/{REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        (("POST",), rf"^/api/{REPO}/commit/(?P<rev>[^/]+)$", "create_commit"),
        (("GET",), rf"^/api/{REPO}/commits/(?P<rev>[^/]+)$", "list_commits"),
        (("POST",), rf"^/api/{REPO}/tag/(?P<rev>[^/]+)$", "create_tag"),
        (("DELETE",), rf"^/api/{REPO}/tag/(?P<tag>[^/]+)$", "delete_tag"),
        (("GET",), rf"^/api/{REPO}/refs$", "list_refs"),
    ]

    def log_message(self, *args):  # quiet: requests go to hub.log
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def route(self, method: str):
        url = urlsplit(self.path)
        download = method == "GET" and url.path.endswith(".parquet") and not self.headers.get("Range")
        if self.hub.stalled.is_set() or download and self.hub.stalled_downloads.is_set():
            self.hub.released.wait(600)  # a Hub that stopped answering: the connection stays open
            return
        with self.hub.lock:
            self.hub.log.append({"method": method, "host": self.headers.get("Host"),
                                 "path": unquote(url.path), "query": url.query,
                                 "range": self.headers.get("Range"),
                                 "authorization": self.headers.get("Authorization")})
        for methods, pattern, name in self.ROUTES:
            if method in methods and (match := re.match(pattern, url.path)):
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return getattr(self, name)(method, parse_qs(url.query), **args)
        self.reply(404, {"error": f"no route for {method} {url.path}"})

    def do_HEAD(self):
        self.route("HEAD")

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, body=b"", headers: dict | None = None, method: str = "GET"):
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def commit(self, method: str, kind: str, repo: str, rev: str) -> str | None:
        """The commit sha of a revision (a branch, a tag or a sha), or None after answering 404."""
        branches, tags = self.hub.branches.get((kind, repo)), self.hub.tags.get((kind, repo), {})
        if branches is not None and (rev in branches or rev in tags or rev in branches.values()
                                     or self.hub.history.get(rev, {}).get("repo") == (kind, repo)):
            return branches.get(rev, tags.get(rev, rev))
        code = "RepoNotFound" if branches is None else "RevisionNotFound"
        self.reply(404, {"error": f"{code}: {repo}@{rev}"}, {"X-Error-Code": code}, method)
        return None

    def resolve(self, method, query, repo, rev, path, type="models"):
        if not (sha := self.commit(method, type, repo, rev)):
            return
        file = self.hub.commits[sha] / path
        if not file.is_file():
            return self.reply(404, {"error": f"Entry not found: {path}"},
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, method)
        git_id, lfs_id = self.hub.file_ids(file)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_id}"'}
        if not file.name.endswith(LFS_SUFFIXES):
            return self.send_file(method, file, headers)
        headers.update({"Location": f"{self.hub.cdn}/cdn/{sha}/{path}", "X-Linked-Etag": f'"{lfs_id}"',
                        "X-Linked-Size": str(file.stat().st_size)})
        self.reply(302, b"", headers, method)

    def cdn(self, method, query, sha, path):
        file = self.hub.commits.get(sha, Path("/nonexistent")) / path
        if not file.is_file():
            return self.reply(404, {"error": "not found"}, method=method)
        self.send_file(method, file, {"ETag": f'"{self.hub.file_ids(file)[1]}"'})

    def send_file(self, method: str, file: Path, headers: dict):
        """The file's bytes, or one range of them (206) for `Range: bytes=a-b`, `a-` or `-n`."""
        size = file.stat().st_size
        start, end, status = 0, size, 200
        if match := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or ""):
            first, last = match.groups()
            start = int(first) if first else size - min(int(last), size)
            end = min(int(last) + 1, size) if first and last else size
            if start >= end:
                return self.reply(416, b"", {"Content-Range": f"bytes */{size}"}, method)
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{size}"
        self.send_response(status)
        headers.update({"Content-Length": str(end - start), "Accept-Ranges": "bytes"})
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "GET":
            with open(file, "rb") as f:
                f.seek(start)
                while start < end:
                    chunk = f.read(min(end - start, 1 << 20))
                    self.wfile.write(chunk)
                    start += len(chunk)

    def revision(self, method, query, type, repo, rev="main"):
        if sha := self.commit(method, type, repo, rev):
            root = self.hub.commits[sha]
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            self.reply(200, {"id": repo, "sha": sha, "private": False,
                             "siblings": [{"rfilename": name} for name in files]})

    def tree(self, method, query, type, repo, rev, path=""):
        if not (sha := self.commit(method, type, repo, rev)):
            return
        root = self.hub.commits[sha]
        if not (root / path).is_dir():
            return self.reply(404, {"error": f"{path} not found"}, {"X-Error-Code": "EntryNotFound"})
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = []
        for p in sorted((root / path).rglob("*") if recursive else (root / path).iterdir()):
            name = p.relative_to(root).as_posix()
            if p.is_dir():
                entries.append({"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(),
                                "size": 0, "path": name})
                continue
            git_id, lfs_id = self.hub.file_ids(p)
            entries.append({"type": "file", "oid": git_id, "size": p.stat().st_size, "path": name})
            if p.name.endswith(LFS_SUFFIXES):
                entries[-1]["lfs"] = {"oid": lfs_id, "size": p.stat().st_size, "pointerSize": 134}
        self.reply(200, entries)

    # The write API

    def repo_url(self, kind: str, repo: str) -> str:
        return f"{self.hub.endpoint}/{'' if kind == 'models' else kind + '/'}{repo}"

    def create_repo(self, method, query):
        request = json.loads(self.body())
        kind = (request.get("type") or "model") + "s"
        repo = "/".join(filter(None, [request.get("organization"), request["name"]]))
        if (kind, repo) in self.hub.branches:
            return self.reply(409, {"error": "You already created this repo", "url": self.repo_url(kind, repo)})
        self.hub.write_commit(kind, repo, "main", {}, "initial commit")
        self.reply(200, {"url": self.repo_url(kind, repo)})

    def create_branch(self, method, query, type, repo, branch):
        request = json.loads(self.body() or b"{}")
        if not (sha := self.commit(method, type, repo, request.get("startingPoint", "main"))):
            return
        with self.hub.lock:
            branches = self.hub.branches[(type, repo)]
            if branch in branches:
                return self.reply(409, {"error": f"Reference already exists: {branch}"})
            branches[branch] = sha
        self.reply(200, {})

    def preupload(self, method, query, type, repo, rev):
        request = json.loads(self.body())
        if not (sha := self.commit(method, type, repo, rev)):
            return
        answers = []
        for file in request["files"]:
            answers.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False})
            if (self.hub.commits[sha] / file["path"]).is_file():  # lets the client skip unchanged files
                answers[-1]["oid"] = self.hub.file_ids(self.hub.commits[sha] / file["path"])[0]
        self.reply(200, {"files": answers})

    def create_commit(self, method, query, type, repo, rev):
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        if self.hub.fail_commits:
            return self.reply(self.hub.fail_commits, {"error": "commit refused (HubServer.fail_commits)"})
        if not self.commit(method, type, repo, rev):
            return
        if rev not in self.hub.branches[(type, repo)]:
            return self.reply(400, {"error": f"{rev} is not a branch; the stand-in commits to branches only"})
        header, files = {}, {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files[value["path"]] = None
            else:
                return self.reply(400, {"error": f"the stand-in does not take {key!r} operations"})
        sha = self.hub.write_commit(type, repo, rev, files, header["summary"], header.get("description", ""))
        self.reply(200, {"commitOid": sha, "commitUrl": f"{self.repo_url(type, repo)}/commit/{sha}",
                         "success": True})

    def list_commits(self, method, query, type, repo, rev):
        if not (sha := self.commit(method, type, repo, rev)):
            return
        commits = []
        while sha in self.hub.history:  # newest first, as the Hub lists them
            entry = self.hub.history[sha]
            commits.append({"id": sha, "title": entry["title"], "message": entry["message"],
                            "authors": [{"user": "pico-test"}], "date": entry["date"]})
            sha = entry["parent"]
        self.reply(200, commits)

    def create_tag(self, method, query, type, repo, rev):
        request = json.loads(self.body())
        if self.hub.fail_tags:
            return self.reply(self.hub.fail_tags, {"error": "tag refused (HubServer.fail_tags)"})
        if not (sha := self.commit(method, type, repo, rev)):
            return
        with self.hub.lock:
            tags = self.hub.tags.setdefault((type, repo), {})
            if request["tag"] in tags or request["tag"] in self.hub.branches[(type, repo)]:
                return self.reply(409, {"error": f"Reference already exists: {request['tag']}"})
            tags[request["tag"]] = sha
        self.reply(200, {})

    def delete_tag(self, method, query, type, repo, tag):
        with self.hub.lock:
            if self.hub.tags.get((type, repo), {}).pop(tag, None) is None:
                return self.reply(404, {"error": f"RevisionNotFound: {repo}@{tag}"},
                                  {"X-Error-Code": "RevisionNotFound"})
        self.reply(200, {})

    def list_refs(self, method, query, type, repo):
        if (type, repo) not in self.hub.branches:
            return self.reply(404, {"error": f"RepoNotFound: {repo}"}, {"X-Error-Code": "RepoNotFound"})
        refs = {kind: [{"name": name, "ref": f"refs/{prefix}/{name}", "targetCommit": sha}
                       for name, sha in sorted(named.items())]
                for kind, prefix, named in (("branches", "heads", self.hub.branches[(type, repo)]),
                                            ("tags", "tags", self.hub.tags.get((type, repo), {})))}
        self.reply(200, {**refs, "converts": [], "pullRequests": []})
