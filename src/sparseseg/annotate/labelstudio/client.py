"""Label Studio's HTTP API through `requests`, with both kinds of API token.

Label Studio has two kinds of token ("API keys"):

    personal access token  a JWT *refresh* token. It is exchanged for a short-lived access token
                           (POST /api/token/refresh), sent as `Authorization: Bearer <access>`;
                           a new access token is fetched when the last one is about to expire, or
                           once after a 401.
    legacy token           40 hex digits, sent as is: `Authorization: Token <token>`. New
                           organisations refuse them unless turned on in the organisation's
                           settings (Organization > Settings > Access Token Settings).

The kind is read from the token itself: a JWT has three base64url parts and says `token_type` in
its payload. The token is never written anywhere: commands take it from `--token` or from the
environment variable TOKEN_ENV.

Why not label-studio-sdk: version 2.1.2 would take numpy down from our 2.4.6 to 2.2.6 (its
opencv-python-headless needs numpy < 2.3) and pulls pandas, OpenCV, NLTK and black; the dozen
endpoints used here are plain JSON over HTTP.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass

import requests

from sparseseg.errors import SparsesegError

TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the name Label Studio's own SDK reads
TIMEOUT_S = 60.0
REFRESH_MARGIN_S = 30.0  # fetch a new access token this long before the current one expires
PAGE_SIZE = 100


def resolve_token(token: str | None) -> str:
    """The token given on the command line, else the environment's TOKEN_ENV.

    Raises:
        SparsesegError: neither is set.
    """
    token = (token or os.environ.get(TOKEN_ENV) or "").strip()
    if not token:
        raise SparsesegError(f"no Label Studio token: pass --token or set {TOKEN_ENV} (Label Studio: Account & "
                             "Settings > Personal Access Token, or Legacy Token)")
    return token


def jwt_payload(token: str) -> dict | None:
    """The payload of a JWT (not verified: only the server can), or None when `token` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    body = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        payload = json.loads(base64.urlsafe_b64decode(body.encode("ascii")))
    except (binascii.Error, ValueError, UnicodeError):
        return None
    return payload if isinstance(payload, dict) else None


def token_kind(token: str) -> str:
    """'personal' (a JWT refresh token), 'access' (a JWT access token, used until it expires) or 'legacy'."""
    payload = jwt_payload(token)
    if payload is None:
        return "legacy"
    return "access" if payload.get("token_type") == "access" else "personal"


@dataclass
class _Access:
    token: str
    expires: float | None  # epoch seconds; None: unknown


class LabelStudio:
    """A Label Studio server at `url`, called with `token` (module docstring).

    Every failure is one SparsesegError line naming the method, the path and what the server said.
    """

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT_S) -> None:
        self.url = normalise_url(url)
        self.token = token
        self.kind = token_kind(token)
        self.timeout = timeout
        self.session = requests.Session()
        self._access: _Access | None = None
        if self.kind == "access":
            self._access = _Access(token, jwt_payload(token).get("exp"))

    # ------------------------------------------------------------------ authentication
    def _authorization(self, renew: bool = False) -> str:
        if self.kind == "legacy":
            return f"Token {self.token}"
        if self.kind == "personal":
            soon = self._access is not None and self._access.expires is not None and \
                self._access.expires - time.time() < REFRESH_MARGIN_S
            if renew or self._access is None or soon:
                self._access = self._refresh()
        return f"Bearer {self._access.token}"

    def _refresh(self) -> _Access:
        """A fresh access token for the personal access token."""
        path = "/api/token/refresh/"
        try:
            resp = self.session.post(self.url + path, json={"refresh": self.token}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from None
        if resp.status_code in (400, 401, 403):
            raise SparsesegError(f"{self.url}: the personal access token was refused (HTTP {resp.status_code}: "
                                 f"{_reason(resp)}); it may be revoked, expired, from another server, or signed "
                                 "with a SECRET_KEY the server no longer has (docs/annotation.md): make a new one "
                                 "in Account & Settings > Personal Access Token")
        access = self._json(resp, "POST", path).get("access")
        if not isinstance(access, str):
            raise SparsesegError(f"{self.url}: POST {path} returned no access token")
        return _Access(access, (jwt_payload(access) or {}).get("exp"))

    def _unreachable(self, exc: Exception) -> SparsesegError:
        return SparsesegError(f"cannot reach Label Studio at {self.url} ({type(exc).__name__}); is it running, and "
                              "is the URL right?")

    # ------------------------------------------------------------------ requests
    def request(self, method: str, path: str, json_body=None, params: dict | None = None, raw: bool = False,
                files=None, data=None):
        """One API call; returns the decoded JSON (or the bytes with `raw`)."""
        resp = self._send(method, path, json_body, params, files, data, renew=False)
        if resp.status_code == 401 and self.kind == "personal":  # the access token lapsed early: once more
            resp = self._send(method, path, json_body, params, files, data, renew=True)
        if resp.status_code == 401:
            hint = ("legacy tokens may be off in this organisation: use a personal access token, or turn legacy "
                    "tokens on in Organization > Settings > Access Token Settings" if self.kind == "legacy"
                    else "the token was refused")
            raise SparsesegError(f"{self.url}: {method} {path}: HTTP 401 ({_reason(resp)}); {hint}")
        if raw:
            self._check(resp, method, path)
            return resp.content
        return self._json(resp, method, path)

    def _send(self, method, path, json_body, params, files, data, renew: bool) -> requests.Response:
        headers = {"Authorization": self._authorization(renew)}
        try:
            return self.session.request(method, self.url + path, json=json_body, params=params, files=files,
                                        data=data, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from None

    def _check(self, resp: requests.Response, method: str, path: str) -> None:
        if resp.status_code >= 400:
            raise SparsesegError(f"{self.url}: {method} {path}: HTTP {resp.status_code} ({_reason(resp)})")

    def _json(self, resp: requests.Response, method: str, path: str):
        self._check(resp, method, path)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise SparsesegError(f"{self.url}: {method} {path}: the answer is not JSON "
                                 f"({resp.headers.get('content-type', 'no content type')}); is this Label Studio?") from None

    def get(self, path: str, **params):
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body=None, **params):
        return self.request("POST", path, body, params=params or None)

    def patch(self, path: str, body):
        return self.request("PATCH", path, body)

    # ------------------------------------------------------------------ what sparseseg uses
    def whoami(self) -> dict:
        """The user the token belongs to (a cheap check that URL and token work)."""
        return self.get("/api/current-user/whoami")

    def projects(self) -> list[dict]:
        """Every project the user can see."""
        return self._pages("/api/projects/", {})

    def tasks(self, project: int) -> list[dict]:
        """Every task of a project (data, ids and counts; not the annotations)."""
        return self._pages("/api/tasks/", {"project": project, "fields": "all"}, key="tasks")

    def _pages(self, path: str, params: dict, key: str = "results") -> list[dict]:
        out, page = [], 1
        while True:
            try:
                got = self.get(path, **params, page=page, page_size=PAGE_SIZE)
            except SparsesegError as exc:
                if page > 1 and "HTTP 404" in str(exc):  # past the last page
                    return out
                raise
            items = got.get(key, []) if isinstance(got, dict) else got
            out += items
            total = got.get("total") if isinstance(got, dict) else None
            total = total if total is not None else (got.get("count") if isinstance(got, dict) else None)
            if not isinstance(got, dict) or len(items) < PAGE_SIZE or (total is not None and len(out) >= total):
                return out
            page += 1


def normalise_url(url: str) -> str:
    """'localhost:8080/' -> 'http://localhost:8080' (no trailing slash)."""
    url = url.strip().rstrip("/")
    if not url:
        raise SparsesegError("--url is empty; give the Label Studio address, e.g. http://localhost:8080")
    return url if "://" in url else "http://" + url


def _reason(resp: requests.Response) -> str:
    """The server's own words, short: DRF's `detail`, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return (resp.text or resp.reason or "").strip().replace("\n", " ")[:200]
    if isinstance(body, dict):
        for key in ("detail", "validation_errors", "error", "message"):
            if key in body:
                return json.dumps(body[key])[:300] if not isinstance(body[key], str) else body[key][:300]
    return json.dumps(body)[:300]
