"""The HTTP server: the stdlib ``ThreadingHTTPServer`` on its own thread, a route table,
Jinja2 templates and static files.

Why the stdlib: the daemon is threads, not asyncio, and the page serves one or two
retouchers, their scripts and a Prometheus scrape. Measured (bench/web.md) the page
and the API answer in a few ms with 100,000 outputs in the journal, and a touch-up's
time is the imaging, not the server, so a framework would add a dependency and an
event loop beside the workers for nothing measurable. Each request gets a thread
(``daemon_threads``) with a socket timeout, so a slow client holds nothing else.

Routes: see ``ROUTES`` (the page, the item view, the JSON API under ``/api/``,
thumbnails, previews, files, static files, ``/metrics``, log in and out) and
docs/web.md for the API.
"""
from __future__ import annotations

import errno
import json
import mimetypes
import os
import re
import shutil
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog

from daemon.config import WebConfig
from daemon.imaging.touchup import StrokeError, parse_strokes
from daemon.nofollow import LinkedPathError, open_under
from daemon.web import items as itemsmod
from daemon.web.auth import Gate, Session
from daemon.web.controller import ROOTS, Controller, Refused
from daemon.web.items import BadId
from daemon.web.journal import QueryError
from daemon.web.html import render
from daemon.web.thumbs import ThumbnailError, Thumbnails

log = structlog.get_logger("rembgd.web")

PAGE_SIZE = 24  # outputs per page
MAX_LIMIT = 500  # the API's largest page
MAX_FORM = 16 * 1024
MAX_JSON = 4 * 1024 * 1024  # a touch-up's strokes
PREVIEW = 2048  # px, the item view's first image
PREVIEWS_KEPT = 500  # preview files on disk (about 0.2-0.5 MB each); the oldest go first
INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/tiff",
                "image/avif", "image/heic"}
PAGE_CSP = ("default-src 'none'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "item.js": "text/javascript; charset=utf-8"}


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

    def __init__(self, web: WebConfig, controller: Controller, thumbs: Thumbnails,
                 previews: Thumbnails | None = None):
        self.gate = Gate(web)
        self.controller = controller
        self.thumbs = thumbs
        self.previews = previews or Thumbnails(thumbs.folder.parent / "previews", PREVIEW,
                                               keep=PREVIEWS_KEPT)
        self.touching: set[tuple[str, str]] = set()  # sources with a touch-up running
        self.touch_lock = threading.Lock()

    def locate(self, params: dict[str, str]) -> tuple[Path, Path]:
        """(root folder, relative path) a request names, checked before any disk access."""
        root = params.get("root", "")
        if root not in ROOTS:
            raise BadRequest(f"root: must be one of {', '.join(ROOTS)}")
        roots = self.controller.roots(_pair(params))  # FileNotFoundError: no such pair
        if root not in roots:
            raise FileNotFoundError(errno.ENOENT, f"this pair has no {root} folder")
        return roots[root], parse_rel(params.get("path", ""))


def _pair(params: dict) -> str:
    """The pair a request names: its key (``WatchPair.key``), never its place in the list."""
    pair = params.get("pair")
    if not isinstance(pair, str) or not pair:
        raise BadRequest("pair: required (the pair's name or inbox)")
    return pair


def _int(params: dict, key: str, default: int | None = None, *, lo: int = 0,
         hi: int | None = None) -> int:
    raw = params.get(key)
    if raw in (None, "") and default is not None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"{key}: must be an integer") from None
    if value < lo or (hi is not None and value > hi):
        raise BadRequest(f"{key}: must be between {lo} and {hi}")
    return value


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    match: re.Match
    session: Session | None


# ------------------------------------------------------------------ the route table
# (method, pattern, handler name, who may call it): "open" needs nothing, "read" an
# authenticated client, "act" an authenticated client with the session's form token
# or the bearer token.

ROUTES: list[tuple[str, re.Pattern, str, str]] = [(m, re.compile(p), h, a) for m, p, h, a in (
    ("GET", r"/login", "login_form", "open"),
    ("POST", r"/login", "login", "open"),
    ("GET", r"/static/([a-z]+\.(?:css|js))", "static", "open"),
    ("GET", r"/", "page", "read"),
    ("GET", r"/item/([a-z0-9-]{2,64})", "item_page", "read"),
    ("GET", r"/metrics", "metrics", "read"),
    ("GET", r"/thumb", "thumb", "read"),
    ("GET", r"/preview", "preview", "read"),
    ("GET", r"/file", "file", "read"),
    ("GET", r"/api/outputs", "api_outputs", "read"),
    ("GET", r"/api/state", "api_state", "read"),
    ("GET", r"/api/items/([a-z0-9-]{2,64})", "api_item", "read"),
    ("POST", r"/api/items/([a-z0-9-]{2,64})/(approve|redo|retry|dismiss|touchup|revert|prepare)",
     "api_action", "act"),
    ("POST", r"/api/batch", "api_batch", "act"),
    ("POST", r"/logout", "logout", "act"),
    ("POST", r"/(retry|approve|redo|dismiss)", "form_action", "act"),
)]


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
        for cookie in self._cookies:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        if self._wants_json():
            return self._json({"error": text}, status)
        self._send(status, (text + "\n").encode())

    def _json(self, data, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json",
                   {"Cache-Control": "no-store"})

    def _html(self, html: str, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, html.encode(), "text/html; charset=utf-8",
                   {"Cache-Control": "no-store", "Content-Security-Policy": PAGE_CSP,
                    "X-Frame-Options": "DENY", **(headers or {})})

    def _redirect(self, where: str, headers: dict | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", headers={"Location": where, **(headers or {})})

    def _wants_json(self) -> bool:
        return self.path.startswith("/api/")

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > limit:
            raise BadRequest("request body too large")
        return self.rfile.read(int(length))

    def _form(self) -> dict:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype == "application/json":
            try:
                data = json.loads(self._body(MAX_JSON) or b"{}")
            except ValueError as exc:
                raise BadRequest(f"body: not JSON ({exc})") from None
            if not isinstance(data, dict):
                raise BadRequest("body: must be a JSON object")
            return data
        body = self._body(MAX_FORM).decode("utf-8", "replace")
        return _single(parse_qs(body, keep_blank_values=True))

    def _dispatch(self) -> None:
        """Find the route, check who may call it, run it; refusals become plain 4xx
        answers (never a traceback)."""
        self._cookies: list[str] = []
        site = self.server.site
        if not site.gate.host_allowed(self.headers.get("Host")):
            return self._text(HTTPStatus.FORBIDDEN, "Host not allowed (use 127.0.0.1 or localhost)")
        try:
            url = urlsplit(self.path)
            method = "GET" if self.command == "HEAD" else self.command
            found = [(m, pat.fullmatch(url.path), h, a) for m, pat, h, a in ROUTES]
            found = [f for f in found if f[1] is not None]
            route = next((f for f in found if f[0] == method), None)
            if route is None:
                if found:
                    return self._text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
                return self._text(HTTPStatus.NOT_FOUND, "not found")
            _, match, name, access = route
            params = _single(parse_qs(url.query, keep_blank_values=True))
            session = site.gate.session(self.headers)
            if access != "open" and not site.gate.authenticated(self.headers):
                if url.path == "/" or url.path.startswith("/item/"):
                    return self._redirect("/login")
                return self._send(HTTPStatus.UNAUTHORIZED, b"token required\n",
                                  headers={"WWW-Authenticate": 'Bearer realm="rembgd"'})
            form: dict = {}
            if method == "POST":
                form = self._form()
                if access == "act" and not site.gate.form_ok(self.headers, form):
                    return self._text(HTTPStatus.FORBIDDEN, "refused: log in, and use the "
                                      "buttons of a freshly loaded page")
            getattr(self, "r_" + name)(site, Request(method, url.path, params, match, session),
                                       form)
        except (BadRequest, BadId, QueryError, StrokeError, LinkedPathError) as exc:
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

    do_GET = do_HEAD = do_POST = _dispatch

    def _session(self, site: Site, req: Request) -> Session:
        """The browser's session, started now if it has none (for its form token)."""
        if req.session is not None:
            return req.session
        session, cookie = site.gate.new_session()
        self._cookies.append(cookie)
        return session

    # ----------------------------------------------------------- pages

    def r_login_form(self, site: Site, req: Request, form: dict) -> None:
        if not site.gate.needs_login:
            return self._redirect("/")
        self._html(render("login.html"))

    def r_login(self, site: Site, req: Request, form: dict) -> None:
        cookie = site.gate.login(str(form.get("token", "")))
        if cookie is None:
            log.warning("web_login_refused", client=self.client_address[0])
            return self._html(render("login.html", error="wrong token"), HTTPStatus.FORBIDDEN)
        self._redirect("/", {"Set-Cookie": cookie})

    def r_logout(self, site: Site, req: Request, form: dict) -> None:
        log.info("web_logout", client=self.client_address[0])
        self._redirect("/login", {"Set-Cookie": site.gate.logout_cookie()})

    def r_static(self, site: Site, req: Request, form: dict) -> None:
        name = req.match.group(1)
        if name not in STATIC:
            raise FileNotFoundError(name)
        data = resources.files("daemon.web").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, data, STATIC[name], {"Cache-Control": "no-cache"})

    def r_page(self, site: Site, req: Request, form: dict) -> None:
        session = self._session(site, req)
        c = site.controller
        q = req.params.get("q", "")
        offset = _int(req.params, "offset", 0)
        total, outputs = c.search_outputs(q, PAGE_SIZE, offset)
        snapshot = c.snapshot()
        pairs = snapshot["pairs"]
        review = [(_pair_of(pairs, item), item) for item in c.review_items()]
        failed = c.failed_files()
        fragment = req.params.get("fragment") == "1"
        html = render(
            "index.html", fragment=fragment, snapshot=snapshot, pairs=pairs,
            labels={p.key: p.inbox for p in pairs}, outputs=outputs, total=total, q=q,
            offset=offset, page_size=PAGE_SIZE, review=review, models=c.models(),
            failed=failed, groups=itemsmod.failure_groups(failed), waiting=c.waiting_files(),
            form_token=site.gate.form_token(session), logout=site.gate.needs_login,
            message=req.params.get("msg", ""), review_id=itemsmod.review_id,
            failed_id=itemsmod.failed_id,
            page_url=lambda **kw: "/?" + urlencode({k: v for k, v in
                                                    {"q": q, **kw}.items() if v}))
        self._html(html)

    def r_item_page(self, site: Site, req: Request, form: dict) -> None:
        session = self._session(site, req)
        item = self._item(site, req.match.group(1))
        item["width"], item["height"] = _size(site, item)
        item["prev"], item["next"] = _neighbours(site, item)
        self._html(render("item.html", item=item, models=site.controller.models(),
                          form_token=site.gate.form_token(session),
                          back=req.params.get("back", "/")
                          if req.params.get("back", "/").startswith("/?") else "/"))

    def r_metrics(self, site: Site, req: Request, form: dict) -> None:
        body, ctype = site.controller.metrics()
        self._send(HTTPStatus.OK, body, ctype)

    def r_thumb(self, site: Site, req: Request, form: dict) -> None:
        data = site.thumbs.get(*site.locate(req.params))
        self._send(HTTPStatus.OK, data, "image/webp", {"Cache-Control": "private, max-age=60"})

    def r_preview(self, site: Site, req: Request, form: dict) -> None:
        data = site.previews.get(*site.locate(req.params))
        self._send(HTTPStatus.OK, data, "image/webp", {"Cache-Control": "private, max-age=60"})

    def r_file(self, site: Site, req: Request, form: dict) -> None:
        """A file as it is: images inline, anything else as a download; never run."""
        root, rel = site.locate(req.params)
        ctype = mimetypes.guess_type(rel.name)[0] or "application/octet-stream"
        inline = ctype in INLINE_TYPES
        with open_under(root, rel) as fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype if inline else "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "sandbox")
            self.send_header("Cache-Control", "no-cache")
            if not inline:
                self.send_header("Content-Disposition", "attachment")
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(fh, self.wfile, 1 << 20)

    # ------------------------------------------------------------- API

    def _item(self, site: Site, text: str) -> dict:
        """The item an id names, as the API gives it (FileNotFoundError: none)."""
        ref = itemsmod.parse_id(text)
        c = site.controller
        if ref.kind == "output":
            found = c.output(ref.row)
            if found is None:
                raise FileNotFoundError(text)
            return itemsmod.output_json(found)
        pair = _pair_by_tag(c, ref.tag)
        roots = c.roots(pair)
        if ref.kind == "review":
            for item in c.review_items():
                if item.id == ref.key and item.pair == str(_inbox(roots)):
                    return itemsmod.review_json(pair, item)
            raise FileNotFoundError(text)
        for f in c.failed_files():
            if f.pair == pair and itemsmod.failed_key(f.rel) == ref.key:
                return itemsmod.failed_json(f)
        raise FileNotFoundError(text)

    def r_api_outputs(self, site: Site, req: Request, form: dict) -> None:
        limit = _int(req.params, "limit", PAGE_SIZE, lo=1, hi=MAX_LIMIT)
        offset = _int(req.params, "offset", 0)
        total, found = site.controller.search_outputs(req.params.get("q", ""), limit, offset)
        self._json({"total": total, "offset": offset, "limit": limit,
                    "items": [itemsmod.output_json(o) for o in found]})

    def r_api_state(self, site: Site, req: Request, form: dict) -> None:
        """What the page polls: a change in any of these values re-renders it."""
        c = site.controller
        snap = c.snapshot()
        latest = c.search_outputs("", 1, 0)[1]
        self._json({"line": snap["line"], "queued": snap["queued"],
                    "in_progress": snap["in_progress"],
                    "states": [p.state for p in snap["pairs"]],
                    "latest_output": latest[0].id if latest else None,
                    "review": sorted(i.id for i in c.review_items()),
                    "failed": sorted(f"{itemsmod.failed_id(f)}@{f.time}" for f in c.failed_files()),
                    "waiting": len(c.waiting_files())})

    def r_api_item(self, site: Site, req: Request, form: dict) -> None:
        self._json(self._item(site, req.match.group(1)))

    def r_api_action(self, site: Site, req: Request, form: dict) -> None:
        self._json(self._act(site, req.match.group(1), req.match.group(2), form))

    def r_api_batch(self, site: Site, req: Request, form: dict) -> None:
        """``{"action": "approve"|"retry"|"dismiss", "ids": [...]}``; every id is tried,
        each result says what happened to it."""
        action = form.get("action")
        ids = form.get("ids")
        if action not in ("approve", "retry", "dismiss"):
            raise BadRequest("action: must be approve, retry or dismiss")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest("ids: must be a list of item ids")
        results = []
        for id_ in ids:
            try:
                results.append({"id": id_, "ok": True, **self._act(site, id_, action, {})})
            except (BadRequest, BadId, Refused, FileNotFoundError, OSError) as exc:
                results.append({"id": id_, "ok": False, "message": f"{id_}: {exc}"})
        done = sum(r["ok"] for r in results)
        self._json({"done": done, "refused": len(results) - done, "results": results,
                    "message": f"{action}: {done} done"
                               + (f", {len(results) - done} refused" if done < len(results)
                                  else "")})

    def _act(self, site: Site, id_: str, action: str, form: dict) -> dict:
        """Run one action on one item; what happened, for the page and the API."""
        ref = itemsmod.parse_id(id_)
        c = site.controller
        if action in ("approve", "redo"):
            # the controller judges the id: one of an earlier hold is refused (409) by
            # Approve (the reviewer never saw what waits now) and redoes the source
            if ref.kind != "review":
                raise Refused(f"only a review item can be {action}d")
            pair = _pair_by_tag(c, ref.tag)  # no such pair: 404
            if action == "approve":
                moved = c.approve(pair, ref.key)
                log.info("web_approve", pair=pair, item=ref.key)
                return _done(f"Approved → {_shown(moved)}", moved)
            model = str(form.get("model", ""))
            c.redo(pair, ref.key, model)
            log.info("web_redo", pair=pair, item=ref.key, model=model)
            return _done(f"Queued again with {model}", [])
        item = self._item(site, id_)
        pair = item["pair"]
        source = item["source"]
        if action in ("retry", "dismiss"):
            if ref.kind != "failed":
                raise Refused(f"only a failed file can be {action}ed")
            rel = str(parse_rel(source["path"]))
            landed = c.retry(pair, rel) if action == "retry" else c.dismiss(pair, rel)
            log.info(f"web_{action}", pair=pair, path=rel, to=str(landed))
            verb = "Retrying" if action == "retry" else "Dismissed →"
            return _done(f"{verb} {landed}", [landed])
        # touch-up and revert: on the source of an output or a review item
        if ref.kind == "failed":
            raise Refused("a failed file has no mask to touch up")
        if source["root"] is None:
            raise Refused("the source is no longer kept (after_success: delete)")
        if action == "prepare":  # a brush was picked: started, not waited for
            c.prepare(pair, source["root"], source["path"])
            return _done(f"Getting {source['path']} ready for touch-up", [])
        key = (pair, source["path"])
        with site.touch_lock:
            if key in site.touching:
                raise Refused(f"a touch-up of {source['path']} is running; try again")
            site.touching.add(key)
        try:
            if action == "touchup":
                strokes = parse_strokes(form.get("strokes"))
                written = c.touchup(pair, source["root"], source["path"], strokes)
                log.info("web_touchup", pair=pair, source=source["path"], strokes=len(strokes))
                return _delivered(c, pair, source["path"],
                                  _done(f"Touched up → {_shown(written)}", written))
            written = c.revert(pair, source["root"], source["path"])
            log.info("web_revert", pair=pair, source=source["path"])
            return _delivered(c, pair, source["path"],
                              _done(f"Reverted to the model's mask → {_shown(written)}", written))
        finally:
            with site.touch_lock:
                site.touching.discard(key)

    # ------------------------------------------------------ form actions (no script)

    def r_form_action(self, site: Site, req: Request, form: dict) -> None:
        """The buttons of the page without its script: one action, then back to the page."""
        action = req.match.group(1)
        tag = itemsmod.pair_tag(_pair(form))
        if action in ("retry", "dismiss"):
            rel = str(parse_rel(form.get("path", "")))
            id_ = f"f{tag}-{itemsmod.failed_key(rel)}"
        else:
            id_ = f"r{tag}-{_item_id(form)}"
        result = self._act(site, id_, action, form)
        self._redirect("/?" + urlencode({"msg": result["message"]}))


def _size(site: Site, item: dict) -> tuple[int, int]:
    """The source's (or else the first output's) width and height, EXIF orientation
    applied, from its header; (1, 1) when neither can be read."""
    from PIL import Image

    for f in [item["source"], *item["outputs"]]:
        if f["root"] is None:
            continue
        try:
            root, rel = site.locate({"pair": f["pair"], "root": f["root"],
                                     "path": f["path"]})
            with open_under(root, rel) as fh, Image.open(fh) as img:
                w, h = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
                return w, h
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return 1, 1


def _neighbours(site: Site, item: dict) -> tuple[str | None, str | None]:
    """The ids of the items before and after ``item`` in its list (newest first)."""
    c = site.controller
    if item["kind"] == "output":
        row = int(item["id"][1:])
        newer, older = c.output(row + 1), c.output(row - 1) if row > 1 else None
        return (f"o{newer.id}" if newer else None), (f"o{older.id}" if older else None)
    if item["kind"] == "review":
        pairs = c.snapshot()["pairs"]
        ids = [itemsmod.review_id(_pair_of(pairs, i), i) for i in c.review_items()]
    else:
        ids = [itemsmod.failed_id(f) for f in c.failed_files()]
    if item["id"] not in ids:
        return None, None
    at = ids.index(item["id"])
    return (ids[at - 1] if at > 0 else None), (ids[at + 1] if at + 1 < len(ids) else None)


def _pair_of(pairs: list, review_item) -> str:
    """The key of the pair a review item was held in (its inbox, as configured)."""
    return next((p.key for p in pairs if p.inbox == review_item.pair), review_item.pair)


def _pair_by_tag(c: Controller, tag: str) -> str:
    """The key of the running pair an item id's tag names (FileNotFoundError: none, e.g.
    a reload removed it): the same pair whatever its place in the list now."""
    for p in c.snapshot()["pairs"]:
        if itemsmod.pair_tag(p.key) == tag:
            return p.key
    raise FileNotFoundError(errno.ENOENT, "no such pair in the running config")


def _inbox(roots: dict[str, Path]) -> Path:
    return roots["inbox"]


def _shown(paths: list[Path]) -> str:
    if not paths:
        return "nothing"
    first = Path(paths[0])
    shown = f"{first.parent.name}/{first.name}"
    return shown + (f" (+{len(paths) - 1})" if len(paths) > 1 else "")


def _done(message: str, paths: list[Path]) -> dict:
    return {"message": message, "paths": [str(p) for p in paths]}


def _delivered(c: Controller, pair: str, source_rel: str, result: dict) -> dict:
    """A touch-up's or revert's result with the output it now is (its id and files)."""
    latest = c.latest_output(pair, source_rel)
    if latest is not None:
        shown = itemsmod.output_json(latest)
        result.update(item=shown["id"], outputs=shown["outputs"])
    return result


def _item_id(form: dict) -> str:
    item = str(form.get("item", ""))
    if not re.fullmatch(r"[0-9a-f]{40}", item):
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

    def __init__(self, web: WebConfig, controller: Controller, thumbs: Thumbnails,
                 previews: Thumbnails | None = None):
        self.web = web
        self._site = Site(web, controller, thumbs, previews)
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
