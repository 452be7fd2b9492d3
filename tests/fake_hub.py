"""A tiny stand-in for the Hugging Face Hub, so Hub sources can be tested offline with the real client.

`FakeHub({"org/name": folder})` serves each folder as a model repo at one fixed commit, on 127.0.0.1,
from a daemon thread. A process pointed at it with `HF_ENDPOINT=hub.endpoint` (and
`HF_HUB_DISABLE_XET=1`, so files come over plain HTTP, and `HF_HUB_DISABLE_TELEMETRY=1`, so the
user-agent does not fetch `/api/agent-harnesses`) goes through huggingface_hub's whole download path:
repo info, tree listing, HEAD for metadata, GET for bytes, the cache. Only the endpoints that
huggingface_hub (1.x/2.x) and transformers 5 request for a public model are implemented:

    GET       /api/models/{repo}                      model info (`?blobs=True` adds file sizes)
    GET       /api/models/{repo}/revision/{rev}       the same at a revision
    GET       /api/models/{repo}/tree/{rev}           the file listing (flat; `recursive` changes nothing)
    HEAD/GET  /{repo}/resolve/{rev}/{path}            a file, with X-Repo-Commit, a quoted ETag, Content-Length

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound), which is what
huggingface_hub turns into its typed exceptions. Anything else gets a bare 404 and is kept in
`unknown`, so a test can show which request the fake does not imitate. Every request is recorded in
`requests` so a test can check that the Hub was really used (and not a cache or a local folder).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every repo is at this one commit
REVISIONS = ("main", COMMIT)


@dataclass(frozen=True)
class Request:
    """One request the fake Hub answered, for assertions and failure messages."""

    method: str
    path: str  # unquoted, without the query string
    status: int
    error_code: str | None = None  # the X-Error-Code sent with an error, None for an unknown endpoint

    def __str__(self) -> str:
        code = f" ({self.error_code})" if self.error_code else ""
        return f"{self.method} {self.path} -> {self.status}{code}"


class FakeHub:
    """Serves `{repo_id: folder}` (repo ids are `org/name`) until the context manager exits."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def endpoint(self) -> str:
        """The value for HF_ENDPOINT."""
        assert self._server is not None, "use FakeHub as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------------------ assertions
    @property
    def unknown(self) -> list[Request]:
        """Requests the fake does not imitate (answered with a bare 404)."""
        with self._lock:
            return [r for r in self.requests if r.status == HTTPStatus.NOT_FOUND and r.error_code is None]

    def downloaded(self, repo_id: str, since: int = 0) -> set[str]:
        """Files of `repo_id` whose bytes were served (GET resolve answered 200), from request `since` on
        (`len(hub.requests)` taken before a run gives that run's downloads)."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            return {
                r.path[len(prefix) :].split("/", 1)[1]
                for r in self.requests[since:]
                if r.method == "GET" and r.status == HTTPStatus.OK and r.path.startswith(prefix)
            }

    def log(self, since: int = 0) -> str:
        """The requests from `since` on, one per line (for assertion messages)."""
        with self._lock:
            return "\n".join(str(r) for r in self.requests[since:]) or "(no requests)"

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    # ------------------------------------------------------------------------------- the repos
    def files(self, repo_id: str) -> dict[str, Path]:
        """Repo path -> file on disk, every regular file under the repo's folder."""
        folder = self.repos[repo_id]
        return {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*")) if f.is_file()}


class _HubHandler(BaseHTTPRequestHandler):
    """Routes one request to the repo endpoints; `fake_hub` is set on a subclass per server."""

    fake_hub: FakeHub
    server_version = "FakeHub/1"

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def do_GET(self) -> None:
        self._route(send_body=True)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: requests are recorded in FakeHub.requests instead of printed."""

    # ------------------------------------------------------------------------------- routing
    def _route(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        parts = path.strip("/").split("/")
        if send_body and parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                self._info(path, repo_id, "main", query)
            elif rest[0] == "revision" and len(rest) == 2:
                self._info(path, repo_id, rest[1], query)
            elif rest[0] == "tree" and len(rest) == 2:
                self._tree(path, repo_id, rest[1])
            else:
                self._unknown(path)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(path, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), send_body)
        else:
            self._unknown(path)

    def _check_repo(self, path: str, repo_id: str, revision: str) -> bool:
        """False (after answering the error the Hub gives) for an unknown repo or revision."""
        if repo_id not in self.fake_hub.repos:
            self._error(path, HTTPStatus.NOT_FOUND, "RepoNotFound", "Repository not found")
            return False
        if revision not in REVISIONS:
            self._error(path, HTTPStatus.NOT_FOUND, "RevisionNotFound", f"Invalid rev id: {revision}")
            return False
        return True

    # ----------------------------------------------------------------------------- endpoints
    def _info(self, path: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        if not self._check_repo(path, repo_id, revision):
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [
            {"rfilename": name, **({"size": file.stat().st_size} if blobs else {})}
            for name, file in self.fake_hub.files(repo_id).items()
        ]
        info = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False, "gated": False}
        self._json(path, {**info, "disabled": False, "siblings": siblings})

    def _tree(self, path: str, repo_id: str, revision: str) -> None:
        if not self._check_repo(path, repo_id, revision):
            return
        entries = [
            {"type": "file", "path": name, "size": file.stat().st_size, "oid": _etag(file)}
            for name, file in self.fake_hub.files(repo_id).items()
        ]
        self._json(path, entries)

    def _resolve(self, path: str, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        if not self._check_repo(path, repo_id, revision):
            return
        file = self.fake_hub.files(repo_id).get(filename)
        if file is None:  # huggingface_hub caches the absence under the X-Repo-Commit of this answer
            self._error(path, HTTPStatus.NOT_FOUND, "EntryNotFound", f"{filename} does not exist")
            return
        data = file.read_bytes()
        self._answer(
            path,
            HTTPStatus.OK,
            {"Content-Type": "application/octet-stream", "ETag": f'"{_etag(file)}"'},
            data,
            send_body,
        )

    # ------------------------------------------------------------------------------- answers
    def _json(self, path: str, payload: object) -> None:
        body = json.dumps(payload).encode()
        self._answer(path, HTTPStatus.OK, {"Content-Type": "application/json"}, body, send_body=True)

    def _error(self, path: str, status: HTTPStatus, code: str, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        body = json.dumps({"error": message}).encode()
        commit = code != "RepoNotFound"  # the Hub names the commit of a repo it has, even in errors
        self._answer(path, status, headers, body, self.command == "GET", commit=commit, error_code=code)

    def _unknown(self, path: str) -> None:
        body = b'{"error": "the fake Hub does not imitate this endpoint"}'
        headers = {"Content-Type": "application/json"}
        self._answer(path, HTTPStatus.NOT_FOUND, headers, body, self.command == "GET", commit=False)

    def _answer(
        self,
        path: str,
        status: HTTPStatus,
        headers: dict[str, str],
        body: bytes,
        send_body: bool,
        commit: bool = True,
        error_code: str | None = None,
    ) -> None:
        """Record and send the response (a HEAD gets the GET's headers, Content-Length included)."""
        self.fake_hub._record(Request(self.command, path, int(status), error_code))
        self.send_response(status)
        headers = {**headers, "Content-Length": str(len(body))}
        if commit:
            headers["X-Repo-Commit"] = COMMIT
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _etag(file: Path) -> str:
    """The file's sha256, as the Hub's ETag for an LFS file (any stable content hash would do)."""
    return hashlib.sha256(file.read_bytes()).hexdigest()
