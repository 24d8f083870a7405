"""An in-process fake of the Hugging Face Hub HTTP API, for offline upload/download round-trip tests.

``fake_hub()`` starts a stdlib HTTP server on ``127.0.0.1`` (random port) that answers what
``huggingface_hub`` (2.x) calls for ``HfApi.create_repo``, ``HfApi.upload_folder`` (regular files inlined in
the commit, binary files and ``*.safetensors`` through the LFS "basic" transfer), ``HfApi.model_info`` /
``repo_info``, ``snapshot_download``, ``hf_hub_download`` and diffusers' ``DiffusionPipeline.download`` /
``from_pretrained(repo_id)``::

    with fake_hub() as hub:
        hub.patch_env(monkeypatch)
        HfApi().create_repo("user/student", token="hf_...")
        HfApi().upload_folder(folder_path=folder, repo_id="user/student", token="hf_...")
        folder = snapshot_download("user/student", cache_dir=tmp_path)

Only model repos and the ``main`` branch exist. Repos live in memory (``hub.repos``: repo id -> {path: bytes}
at ``main``); every commit gets a new 40-hex sha (``hub.commits``). Every request is recorded in
``hub.requests``, headers included (so a test can check the ``Authorization`` header), but nothing is ever
printed. ``whoami`` (``GET /api/whoami-v2``) knows the tokens a test gives with ``hub.add_token(token, user, role)``
and answers 401 to any other; the other routes accept any token or none. Unknown repos, revisions and files answer 404 with the ``X-Error-Code`` that ``huggingface_hub`` maps
to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError``; routes the fake
does not implement answer 501.

Xet: when ``hf_xet`` is installed, ``huggingface_hub`` 2.x uploads through Xet without asking the server
(``upload_folder`` switches to its Xet pipeline and ``_upload_files`` to ``_upload_xet_files`` on
``is_xet_available()`` alone), so no server answer can force LFS. The supported switch is
``HF_HUB_DISABLE_XET=1``, which ``patch_env`` applies; the LFS batch endpoint then answers ``"basic"`` transfers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Files the Hub stores with git LFS (its default .gitattributes patterns, abridged), besides binary files.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")


@dataclass
class Request:
    """One request received by the fake Hub. ``headers`` (lower-case names) stay out of ``repr``: they hold tokens."""

    method: str
    path: str
    headers: dict[str, str] = field(repr=False)


class HubError(Exception):
    """An error answer: HTTP ``status`` with the ``X-Error-Code`` / ``X-Error-Message`` headers of the Hub."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, sample: bytes) -> bool:
    """Whether the Hub stores a file with LFS, from its path and its first 512 bytes."""
    return bool(sample) and (path.endswith(LFS_SUFFIXES) or b"\0" in sample[:512])


def lfs_pointer(data: bytes) -> bytes:
    """The git LFS pointer file that git stores in place of ``data``."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_REV = r"(?P<revision>[^/]+)"
# (method, path regex, handler name); HEAD is answered like GET without a body.
_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "model_info"),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}", "tree"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
]


class FakeHub:
    """The fake Hub: ``start()`` it, point ``huggingface_hub`` at ``endpoint`` with ``patch_env``, ``stop()`` it."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> {path: content} at ``main``
        self.commits: dict[str, list[str]] = {}  # repo id -> commit shas, oldest first; the last one is ``main``
        self.requests: list[Request] = []
        self.tokens: dict[str, dict] = {}  # token -> the whoami answer of its user (``add_token``)
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded through LFS, waiting for a commit
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.endpoint = ""

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        poll = {"poll_interval": 0.01}  # a short poll makes ``stop()`` fast
        threading.Thread(target=self._server.serve_forever, kwargs=poll, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def patch_env(self, monkeypatch) -> None:
        """Point ``huggingface_hub`` (and diffusers / transformers through it) at this server for one test.

        Environment variables are not enough: ``huggingface_hub.constants`` reads them once, at import.

        - ``constants.ENDPOINT`` / ``HUGGINGFACE_CO_URL_TEMPLATE``: default endpoint of ``HfApi()``,
          ``snapshot_download`` and the resolve URLs of ``hf_hub_download``;
        - ``hf_api.api.endpoint``: the module-level ``HfApi`` behind ``huggingface_hub.model_info`` /
          ``resolve_revision``, which diffusers calls, was built at import with the old endpoint;
        - ``HF_HUB_OFFLINE`` (set by tests/conftest.py): off in ``constants`` and in every module that copied it
          with ``from huggingface_hub.constants import HF_HUB_OFFLINE`` (diffusers' LoRA loader, ...);
        - ``constants.HF_HUB_DISABLE_XET``: plain LFS uploads and HTTP downloads, see the module docstring.
        """
        from huggingface_hub import constants, hf_api

        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        template = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)
        for module in list(sys.modules.values()):
            if getattr(module, "__dict__", {}).get("HF_HUB_OFFLINE") is True:  # no module __getattr__ triggered
                monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)

    def add_token(self, token: str, user: str = "me", role: str = "write", orgs: tuple[str, ...] = ()) -> None:
        """Make ``whoami`` know ``token``: a ``role`` ("read", "write" or "fineGrained") access token of ``user``, a
        member of ``orgs``."""
        self.tokens[token] = {"type": "user", "name": user, "orgs": [{"type": "org", "name": o} for o in orgs],
                              "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}}

    # -- request dispatch ----------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {name.lower(): value for name, value in handler.headers.items()}
        self.requests.append(Request(handler.command, handler.path, headers))
        body = handler.rfile.read(int(headers.get("content-length", 0)))
        path = urlsplit(handler.path).path
        method = "GET" if handler.command == "HEAD" else handler.command
        try:
            for route_method, pattern, name in _ROUTES:
                match = re.fullmatch(pattern, path)
                if match and route_method == method:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    if name == "whoami":
                        params["authorization"] = headers.get("authorization", "")
                    status, out_headers, out = getattr(self, "_" + name)(body, **params)
                    break
            else:
                raise HubError(501, f"FakeHub does not implement {handler.command} {path}")
        except HubError as e:
            error_headers = {"X-Error-Message": str(e), **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            status, out_headers, out = _json({"error": str(e)}, e.status, error_headers)
        except Exception as e:  # a bug of the fake: answer it instead of printing a traceback
            status, out_headers, out = _json({"error": repr(e)}, 500)
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(out)), **out_headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(out)

    def _files(self, repo_id: str, revision: str) -> tuple[dict[str, bytes], str]:
        """The files of ``repo_id`` at ``revision`` (``main`` or the sha of the last commit) and that sha."""
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        with self._lock:
            files, sha = self.repos[repo_id], self.commits[repo_id][-1]
        if revision not in ("main", sha):
            raise HubError(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        return files, sha

    def _whoami(self, body: bytes, authorization: str):
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _json(self.tokens[token])

    # -- repos ---------------------------------------------------------------------------------------------

    def _create_repo(self, body: bytes):
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "FakeHub only hosts model repos")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return _json({"error": "You already created this model repo", "url": url}, 409)
            self.repos[repo_id] = {}
            self.commits[repo_id] = [hashlib.sha1(f"initial commit of {repo_id}".encode()).hexdigest()]
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes):
        return _json({"errors": [], "warnings": []})

    def _model_info(self, body: bytes, repo_id: str, revision: str = "main"):
        files, sha = self._files(repo_id, revision)
        siblings = [{"rfilename": path} for path in sorted(files)]
        return _json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, body: bytes, repo_id: str, revision: str):
        """The files of the repo, always recursively (folders are not listed)."""
        files, _ = self._files(repo_id, revision)
        entries = []
        for path, data in sorted(files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
            if is_lfs(path, data):
                pointer = lfs_pointer(data)
                lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
                entry.update(oid=git_blob_sha(pointer), lfs=lfs)
            entries.append(entry)
        return _json(entries)

    # -- upload: preupload, LFS batch + basic transfer, commit ---------------------------------------------

    def _preupload(self, body: bytes, repo_id: str, revision: str):
        self._files(repo_id, revision)
        files = []
        for f in json.loads(body)["files"]:
            mode = "lfs" if is_lfs(f["path"], base64.b64decode(f["sample"])) else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
        return _json({"files": files})

    def _lfs_batch(self, body: bytes, repo_id: str):
        """LFS batch API (https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md), ``basic`` transfer only."""
        self._files(repo_id, "main")
        objects = []
        for obj in json.loads(body)["objects"]:
            if obj["oid"] not in self._lfs_objects:  # no ``actions``: the client skips content we already have
                obj = {**obj, "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}}
            objects.append(obj)
        return _json({"transfer": "basic", "objects": objects}, 200, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, body: bytes, oid: str):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "LFS upload does not match its sha256")
        with self._lock:
            self._lfs_objects[oid] = body
        return 200, {}, b""

    def _commit(self, body: bytes, repo_id: str, revision: str):
        files, parent = self._files(repo_id, revision)
        files = dict(files)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        for line in lines[1:]:  # lines[0] is the header: summary, description
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self._lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self._lfs_objects[value["oid"]]
            else:
                raise HubError(400, f"FakeHub does not implement commit operation {key!r}")
        tree = sorted((p, git_blob_sha(d)) for p, d in files.items())
        sha = hashlib.sha1(json.dumps([parent, tree]).encode()).hexdigest()
        with self._lock:
            if self.commits[repo_id][-1] != parent:
                raise HubError(409, "main moved during the commit")
            self.repos[repo_id] = files
            self.commits[repo_id].append(sha)
        return _json({"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    # -- download ------------------------------------------------------------------------------------------

    def _resolve(self, body: bytes, repo_id: str, revision: str, path: str):
        """File content, with the metadata headers ``hf_hub_download`` reads from the HEAD call."""
        files, sha = self._files(repo_id, revision)
        if path not in files:
            raise HubError(404, f"{path} not found in {repo_id}", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        if is_lfs(path, data):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        return 200, headers, data


def _json(obj, status: int = 200, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_PUT = do_GET

    def log_message(self, format, *args):
        """Silent: requests are recorded in ``FakeHub.requests``, never printed."""


@contextmanager
def fake_hub() -> Iterator[FakeHub]:
    """A running ``FakeHub``, stopped on exit."""
    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.stop()
