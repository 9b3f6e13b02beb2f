"""The HTTP server: the stdlib ``ThreadingHTTPServer`` on its own thread.

Why the stdlib: the daemon is threads, not asyncio, and the page serves one or two
retouchers and a Prometheus scrape; ``http.server`` does that with no new
dependency and no event loop to run beside the workers. Each request gets a thread
(``daemon_threads``) with a socket timeout, so a slow client holds nothing else.

Routes: ``GET /`` (the page), ``/thumb`` and ``/file`` (``pair``, ``root``, ``path``),
``/metrics``, ``/login``; ``POST /retry``, ``/approve``, ``/redo``, ``/login``,
``/logout``.
"""
from __future__ import annotations

import errno
import mimetypes
import os
import shutil
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

import structlog

from daemon.config import WebConfig
from daemon.nofollow import LinkedPathError, open_under
from daemon.web.auth import Gate
from daemon.web.controller import ROOTS, Controller, Refused
from daemon.web.page import login_page, status_page
from daemon.web.thumbs import ThumbnailError, Thumbnails

log = structlog.get_logger("rembgd.web")

RECENT = 24
MAX_FORM = 16 * 1024
INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/tiff",
                "image/avif", "image/heic"}
PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'"


class BadRequest(ValueError):
    """A parameter the server refuses (400)."""


def parse_rel(text: str) -> Path:
    """A plain relative path: no ``..``, ``.``, empty part, absolute path or NUL."""
    if not text or "\0" in text:
        raise BadRequest("path: empty or contains NUL")
    parts = text.split("/")
    if text.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"path: {text!r} is not a plain relative path")
    return Path(*PurePosixPath(text).parts)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, web: WebConfig, site: Site):
        self.address_family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        self.site = site
        super().__init__((web.host, web.port), Handler)


class Site:
    """What every request shares: the gate, the controller and the thumbnails."""

    def __init__(self, web: WebConfig, controller: Controller, thumbs: Thumbnails):
        self.gate = Gate(web)
        self.controller = controller
        self.thumbs = thumbs

    def locate(self, params: dict[str, str]) -> tuple[Path, Path]:
        """(root folder, relative path) a request names, checked before any disk access."""
        root = params.get("root", "")
        if root not in ROOTS:
            raise BadRequest(f"root: must be one of {', '.join(ROOTS)}")
        roots = self.controller.roots(_int(params, "pair"))  # FileNotFoundError: no such pair
        if root not in roots:
            raise FileNotFoundError(errno.ENOENT, f"this pair has no {root} folder")
        return roots[root], parse_rel(params.get("path", ""))


def _int(params: dict[str, str], key: str) -> int:
    try:
        return int(params.get(key, ""))
    except ValueError:
        raise BadRequest(f"{key}: must be an integer") from None


class Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30
    server_version = "rembgd"

    # ------------------------------------------------------------ plumbing

    def log_message(self, fmt: str, *args) -> None:
        log.debug("http", client=self.client_address[0], request=fmt % args)

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, (text + "\n").encode())

    def _html(self, html: str, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, html.encode(), "text/html; charset=utf-8",
                   {"Cache-Control": "no-store", "Content-Security-Policy": PAGE_CSP,
                    "X-Frame-Options": "DENY", **(headers or {})})

    def _redirect(self, where: str, headers: dict | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", headers={"Location": where, **(headers or {})})

    def _query(self) -> tuple[str, dict[str, str]]:
        url = urlsplit(self.path)
        return url.path, _single(parse_qs(url.query, keep_blank_values=True))

    def _form(self) -> dict[str, str]:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > MAX_FORM:
            raise BadRequest("form too large")
        body = self.rfile.read(int(length)).decode("utf-8", "replace")
        return _single(parse_qs(body, keep_blank_values=True))

    def _guarded(self, action) -> None:
        """Run ``action``, turning refusals into plain 4xx answers (never a traceback)."""
        site = self.server.site
        if not site.gate.host_allowed(self.headers.get("Host")):
            return self._text(HTTPStatus.FORBIDDEN, "Host not allowed (use 127.0.0.1 or localhost)")
        try:
            action(site)
        except (BadRequest, LinkedPathError) as exc:
            self._text(HTTPStatus.BAD_REQUEST, f"refused: {exc}")
        except Refused as exc:
            self._text(HTTPStatus.CONFLICT, f"refused: {exc}")
        except (FileNotFoundError, NotADirectoryError):
            self._text(HTTPStatus.NOT_FOUND, "not found")
        except ThumbnailError as exc:
            self._text(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"no thumbnail: {exc}")
        except (ConnectionError, TimeoutError):
            pass  # the client went away
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a regular file
                return self._text(HTTPStatus.BAD_REQUEST, f"refused: {exc.strerror}")
            log.warning("web_error", path=self.path, error=str(exc))
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {exc.strerror or exc}")
        except Exception:  # a bug: logged with its traceback; the daemon carries on
            log.exception("web_internal_error", path=self.path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the daemon's log)")

    # ---------------------------------------------------------------- GET

    def do_GET(self) -> None:
        self._guarded(self._get)

    do_HEAD = do_GET

    def _get(self, site: Site) -> None:
        path, params = self._query()
        if path == "/login":
            return self._html(login_page()) if site.gate.needs_login else self._redirect("/")
        if not site.gate.authenticated(self.headers):
            if path == "/":
                return self._redirect("/login")
            return self._send(HTTPStatus.UNAUTHORIZED, b"token required\n",
                              headers={"WWW-Authenticate": 'Bearer realm="rembgd"'})
        c = site.controller
        if path == "/":
            return self._html(status_page(c.snapshot(), c.recent_outputs(RECENT),
                                          c.failed_files(), c.review_items(), c.models(),
                                          site.gate.form_token, c.waiting_files(),
                                          logout=site.gate.needs_login))
        if path == "/metrics":
            body, ctype = c.metrics()
            return self._send(HTTPStatus.OK, body, ctype)
        if path == "/thumb":
            data = site.thumbs.get(*site.locate(params))
            return self._send(HTTPStatus.OK, data, "image/webp",
                              {"Cache-Control": "private, max-age=60"})
        if path == "/file":
            return self._file(*site.locate(params))
        self._text(HTTPStatus.NOT_FOUND, "not found")

    def _file(self, root: Path, rel: Path) -> None:
        """A file as it is: images inline, anything else as a download; never run."""
        ctype = mimetypes.guess_type(rel.name)[0] or "application/octet-stream"
        inline = ctype in INLINE_TYPES
        with open_under(root, rel) as fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype if inline else "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "sandbox")
            if not inline:
                self.send_header("Content-Disposition", "attachment")
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(fh, self.wfile, 1 << 20)

    # --------------------------------------------------------------- POST

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _post(self, site: Site) -> None:
        path, _ = self._query()
        form = self._form()
        if path == "/login":
            cookie = site.gate.login(form.get("token", ""))
            if cookie is None:
                log.warning("web_login_refused", client=self.client_address[0])
                return self._html(login_page("wrong token"), HTTPStatus.FORBIDDEN)
            return self._redirect("/", {"Set-Cookie": cookie})
        if not site.gate.form_ok(self.headers, form):
            return self._text(HTTPStatus.FORBIDDEN,
                              "refused: log in, and use the buttons of a freshly loaded page")
        if path == "/logout":
            log.info("web_logout", client=self.client_address[0])
            return self._redirect("/login", {"Set-Cookie": site.gate.logout_cookie()})
        c = site.controller
        pair = _int(form, "pair")
        if path == "/retry":
            landed = c.retry(pair, str(parse_rel(form.get("path", ""))))
            log.info("web_retry", pair=pair, path=form["path"], to=str(landed))
        elif path == "/approve":
            c.approve(pair, _item_id(form))
            log.info("web_approve", pair=pair, item=form["item"])
        elif path == "/redo":
            c.redo(pair, _item_id(form), form.get("model", ""))
            log.info("web_redo", pair=pair, item=form["item"], model=form.get("model"))
        else:
            return self._text(HTTPStatus.NOT_FOUND, "not found")
        self._redirect("/")


def _item_id(form: dict[str, str]) -> str:
    item = form.get("item", "")
    if not item or not all(ch.isalnum() or ch in "-_" for ch in item):
        raise BadRequest("item: not a review item id")
    return item


def _single(values: dict[str, list[str]]) -> dict[str, str]:
    """One value per parameter; a repeated one is refused (which would win is ambiguous)."""
    for key, vals in values.items():
        if len(vals) != 1:
            raise BadRequest(f"{key}: given {len(vals)} times")
    return {k: v[0] for k, v in values.items()}


class WebServer:
    """The page's server on a background thread; ``start`` raises OSError if it cannot bind."""

    def __init__(self, web: WebConfig, controller: Controller, thumbs: Thumbnails):
        self.web = web
        self._site = Site(web, controller, thumbs)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> str:
        self._httpd = _Server(self.web, self._site)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.5}, name="web", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
