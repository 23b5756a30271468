"""The client: one :class:`Client` per server and token."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Mapping, Optional, Tuple

import httpx

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - older Pythons
    import tomli as tomllib

#: Header naming the invocation an answer belongs to.
INVOCATION_ID_HEADER = "x-hearth-invocation-id"
#: Header carrying the usage cursor to continue from.
NEXT_CURSOR_HEADER = "x-hearth-next-cursor"
#: The prefix of the problem types Hearth itself answers with.
HEARTH_PROBLEM = "urn:hearth:problem:"
#: Records asked for per page while following the usage cursor.
USAGE_PAGE = 1000


class HearthError(Exception):
    """An error answer: ``status`` and the parsed problem body (``problem``,
    a dict with ``type``, ``title``, ``status``, ``detail`` and, where they
    apply, ``invocation_id``, ``outcome`` and ``key``)."""

    def __init__(self, status: int, problem: Dict[str, Any]):
        self.status = status
        self.problem = problem
        detail = problem.get("detail") or problem.get("title") or "error"
        super().__init__(f"{status}: {detail}")


@dataclass
class InvokeResult:
    """A function's answer, whatever its status (a function's 4xx is an
    answer, not an error of the client)."""

    status: int
    headers: Dict[str, str]
    body: bytes
    invocation_id: Optional[str]


@dataclass
class StoredResponse:
    """The stored answer of a finished asynchronous invocation."""

    status: int
    headers: List[Tuple[str, str]]
    body: bytes


@dataclass
class AsyncInvocation:
    """An asynchronous invocation: ``state`` is ``queued``, ``running``,
    ``succeeded`` or ``failed``; ``response`` is set once it finished."""

    id: str
    function: str
    state: str
    attempts: int
    submitted_at: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    response: Optional[StoredResponse] = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")

    @classmethod
    def _from_json(cls, data: Mapping[str, Any]) -> "AsyncInvocation":
        stored = data.get("response")
        response = None
        if stored is not None:
            response = StoredResponse(
                status=stored["status"],
                headers=[(name, value) for name, value in stored.get("headers", [])],
                body=base64.b64decode(stored.get("body_base64", "")),
            )
        return cls(
            id=data["id"],
            function=data["function"],
            state=data["state"],
            attempts=data.get("attempts", 0),
            submitted_at=data.get("submitted_at", ""),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            response=response,
        )


class UsageRecords:
    """Usage records in commit order, fetched a page at a time as you
    iterate. ``cursor`` is the cursor after the last record received: pass
    it as ``after=`` later to get only newer records, each exactly once."""

    def __init__(self, client: "Client", params: Dict[str, str], after: Optional[int]):
        self._client = client
        self._params = params
        self.cursor: Optional[int] = after

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while True:
            params = dict(self._params, format="jsonl", limit=str(USAGE_PAGE))
            if self.cursor is not None:
                params["cursor"] = str(self.cursor)
            response = self._client._control("GET", "/usage", params=params)
            lines = [line for line in response.text.splitlines() if line.strip()]
            for line in lines:
                yield json.loads(line)
            next_cursor = response.headers.get(NEXT_CURSOR_HEADER)
            if next_cursor is not None:
                self.cursor = int(next_cursor)
            if len(lines) < USAGE_PAGE:
                return

    def to_pandas(self) -> Any:
        """The records as a pandas DataFrame (needs pandas)."""
        import pandas

        return pandas.DataFrame.from_records(list(self))


class Tokens:
    """Bearer tokens of the client's tenant (``Client.tokens``)."""

    def __init__(self, client: "Client"):
        self._client = client

    def create(self, role: str, tenant: Optional[str] = None, expires: Optional[str] = None) -> Dict[str, Any]:
        """A new token with ``role`` (``admin``, ``deployer``, ``invoker``
        or ``billing``) for ``tenant`` (the client's by default),
        expiring after ``expires`` (``30d``, ``12h``; never when ``None``).
        The answer's ``token`` is the secret, shown this once."""
        body = {"tenant": tenant or self._client.tenant, "role": role, "expires": expires}
        return self._client._send("POST", "/v1/tokens", json=body).json()

    def list(self) -> List[Dict[str, Any]]:
        """The tenant's tokens (never their secrets)."""
        return self._client._control("GET", "/tokens").json()["tokens"]

    def revoke(self, id_or_token: str) -> Dict[str, Any]:
        """Revokes a token, by its id (``tok_…``) or the token itself (sent
        in the body, never in the URL)."""
        if id_or_token.startswith("hth_"):
            return self._client._send("POST", "/v1/tokens/revoke", json={"token": id_or_token}).json()
        return self._client._send("DELETE", f"/v1/tokens/{id_or_token}").json()


class Client:
    """A Hearth server, as one token sees it.

    ``url`` and ``token`` default to ``HEARTH_URL`` (else
    ``http://127.0.0.1:8080``) and ``HEARTH_TOKEN``; ``tenant`` to
    ``HEARTH_TENANT`` (else ``default``).
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        tenant: Optional[str] = None,
        timeout: float = 60.0,
    ):
        self.url = (url or os.environ.get("HEARTH_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.token = token if token is not None else os.environ.get("HEARTH_TOKEN")
        self.tenant = tenant or os.environ.get("HEARTH_TENANT") or "default"
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(headers=headers, timeout=timeout)
        self.tokens = Tokens(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # Functions.

    def deploy(self, path: "str | os.PathLike[str]", build: bool = True, progress: bool = False) -> Dict[str, Any]:
        """Deploys a function: ``path`` is a directory holding
        ``hearth.toml``, or the manifest itself. Runs the manifest's
        ``build`` command first (unless ``build=False``), then uploads the
        manifest, the component, and the models and files it names, as
        ``hearth deploy`` does. ``progress=True`` shows the upload on
        stderr. Returns the new version."""
        manifest_path = Path(path)
        if manifest_path.is_dir():
            manifest_path = manifest_path / "hearth.toml"
        text = manifest_path.read_text()
        manifest = tomllib.loads(text)
        project = manifest_path.parent
        if build and manifest.get("build"):
            subprocess.run(["sh", "-c", manifest["build"]], cwd=project, check=True)
        if "component" not in manifest:
            raise ValueError(f"{manifest_path}: set `component` to the path of the built .wasm")
        uploads: List[Tuple[str, Path, str]] = [("component", project / manifest["component"], "application/wasm")]
        for model in manifest.get("models", []):
            uploads.append((f"model:{model['name']}", project / model["path"], "application/onnx"))
        for i, item in enumerate(manifest.get("files", [])):
            uploads.append((f"file:{i}", project / item["source"], "application/octet-stream"))
        total = sum(upload[1].stat().st_size for upload in uploads)
        meter = _Progress(total) if progress else None
        opened: List[BinaryIO] = []
        try:
            parts: List[Tuple[str, Tuple[Optional[str], Any, str]]] = [("manifest", (None, text, "application/toml"))]
            for part, file_path, mime in uploads:
                handle = file_path.open("rb")
                opened.append(handle)
                body: Any = _Reading(handle, meter) if meter else handle
                parts.append((part, (file_path.name, body, mime)))
            response = self._control("POST", "/functions", files=parts)
        finally:
            for handle in opened:
                handle.close()
            if meter:
                meter.done()
        return response.json()

    def functions(self) -> List[Dict[str, Any]]:
        """The newest version of each function of the tenant."""
        return self._control("GET", "/functions").json()["functions"]

    def function(self, name: str) -> Dict[str, Any]:
        """One function: its manifest and its versions."""
        return self._control("GET", f"/functions/{name}").json()

    def delete(self, name: str, version: Optional[int] = None) -> None:
        """Deletes a function, or only one ``version`` of it (refused while
        an alias points at it)."""
        if version is None:
            self._control("DELETE", f"/functions/{name}")
        else:
            self._control("DELETE", f"/functions/{name}/versions/{version}")

    # Versions and aliases.

    def versions(self, name: str) -> List[Dict[str, Any]]:
        """Every live version of a function, oldest first."""
        return self._control("GET", f"/functions/{name}/versions").json()["versions"]

    def aliases(self, name: str) -> List[Dict[str, Any]]:
        """The aliases of a function, ``latest`` first."""
        return self._control("GET", f"/functions/{name}/aliases").json()["aliases"]

    def set_alias(
        self,
        name: str,
        alias: str,
        version: Optional[int] = None,
        split: Optional[Mapping[int, int]] = None,
        shadow: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Any]:
        """Points ``alias`` at one ``version``, or splits it by weight
        (``split={3: 90, 4: 10}``); ``shadow=(5, 10)`` mirrors 10 % of its
        requests to version 5 (answers recorded, never sent). Call it as
        ``invoke("name@alias")``; ``latest`` is the bare name."""
        if (version is None) == (split is None):
            raise ValueError("give either version or split")
        routes = [{"version": version, "weight": 1}] if version is not None else [
            {"version": v, "weight": w} for v, w in (split or {}).items()
        ]
        body: Dict[str, Any] = {"routes": routes}
        if shadow is not None:
            body["shadow"] = {"version": shadow[0], "percent": shadow[1]}
        return self._control("PUT", f"/functions/{name}/aliases/{alias}", json=body).json()

    def unset_alias(self, name: str, alias: str) -> None:
        """Unsets an alias (``latest`` follows the newest version again)."""
        self._control("DELETE", f"/functions/{name}/aliases/{alias}")

    def alias_history(self, name: str, alias: str = "latest") -> List[Dict[str, Any]]:
        """An alias's changes, oldest first."""
        return self._control("GET", f"/functions/{name}/aliases/{alias}/history").json()["changes"]

    def rollback(self, name: str, alias: str = "latest") -> Dict[str, Any]:
        """Points an alias back at its previous target."""
        return self._control("POST", f"/functions/{name}/aliases/{alias}/rollback").json()

    # Invocations.

    def invoke(
        self,
        function: str,
        data: bytes = b"",
        path: str = "/",
        method: str = "POST",
        headers: Optional[Mapping[str, str]] = None,
    ) -> InvokeResult:
        """Calls ``function`` at ``path`` and returns its answer, whatever
        the status. Only errors of Hearth itself (an unknown function, a
        refused token, a full server) raise :class:`HearthError`; a
        function's own error answer is returned."""
        url = f"{self.url}/fn/{self.tenant}/{function}/{path.lstrip('/')}"
        response = self._http.request(method, url, content=data, headers=dict(headers or {}))
        if response.headers.get("content-type", "").startswith("application/problem+json"):
            # Hearth's own refusals carry a problem of a `urn:hearth:problem:`
            # type; a function's own problem answers are returned as answers.
            error = _error(response)
            if str(error.problem.get("type", "")).startswith(HEARTH_PROBLEM):
                raise error
        return InvokeResult(
            status=response.status_code,
            headers=dict(response.headers),
            body=response.content,
            invocation_id=response.headers.get(INVOCATION_ID_HEADER),
        )

    def invoke_async(
        self,
        function: str,
        data: bytes = b"",
        path: str = "/",
        method: str = "POST",
        headers: Optional[Mapping[str, str]] = None,
    ) -> AsyncInvocation:
        """Queues an invocation to run when capacity allows (at the batch
        class); returns at once with its id. See :meth:`result`."""
        response = self._control(
            "POST",
            f"/functions/{function}/invocations",
            params={"path": path, "method": method},
            content=data,
            headers=dict(headers or {}),
        )
        return AsyncInvocation._from_json(response.json())

    def result(
        self, function: str, id: str, wait: bool = True, timeout: Optional[float] = None
    ) -> AsyncInvocation:
        """An asynchronous invocation's state; with ``wait``, once it has
        finished (polling, at most ``timeout`` seconds when given)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            invocation = AsyncInvocation._from_json(
                self._control("GET", f"/functions/{function}/invocations/{id}").json()
            )
            if not wait or invocation.finished:
                return invocation
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"invocation {id} has not finished ({invocation.state})")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    # Usage and status.

    def usage(
        self,
        since: Optional[str] = None,
        until: Optional[str] = None,
        function: Optional[str] = None,
        after: Optional[int] = None,
    ) -> UsageRecords:
        """Usage records of the tenant (``since``/``until``: RFC 3339 or a
        date), after the cursor ``after``, in commit order; iterate the
        answer. Needs a ``billing`` or ``admin`` token."""
        params = {k: v for k, v in (("since", since), ("until", until), ("function", function)) if v is not None}
        return UsageRecords(self, params, after)

    def usage_summary(
        self, since: Optional[str] = None, until: Optional[str] = None, function: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        """Totals per function and UTC day."""
        params = {k: v for k, v in (("since", since), ("until", until), ("function", function)) if v is not None}
        return self._control("GET", "/usage/summary", params=params).json()["rows"]

    def status(self) -> Dict[str, Any]:
        """Devices, warm models, the tenant's functions and (for operators)
        the cluster's nodes."""
        return self._control("GET", "/status").json()

    # Plumbing.

    def _control(self, method: str, path: str, params: Optional[Dict[str, str]] = None, **kwargs: Any) -> httpx.Response:
        params = dict(params or {}, tenant=self.tenant)
        return self._send(method, f"/v1{path}", params=params, **kwargs)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, f"{self.url}{path}", **kwargs)
        if response.is_success:
            return response
        raise _error(response)


def _error(response: httpx.Response) -> HearthError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"type": "about:blank", "title": response.reason_phrase, "status": response.status_code,
                   "detail": response.text}
    return HearthError(response.status_code, problem)


class _Progress:
    """An upload's progress on stderr."""

    def __init__(self, total: int):
        self.total = max(total, 1)
        self.sent = 0

    def add(self, n: int) -> None:
        self.sent += n
        sys.stderr.write(f"\ruploading {self.sent / 2**20:.1f} / {self.total / 2**20:.1f} MiB "
                         f"({100 * self.sent // self.total}%)")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")


class _Reading:
    """A file whose reads count towards a :class:`_Progress`."""

    def __init__(self, handle: BinaryIO, meter: _Progress):
        self._handle = handle
        self._meter = meter

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._meter.add(len(chunk))
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(64 << 10):
            yield chunk
