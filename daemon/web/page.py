"""The HTML of the status page and the login form: plain HTML and CSS, no script.

Pure functions of the data they are given; every value from a file name, a sidecar
or the config is escaped. Thumbnails are separate lazy-loaded requests, so the page
itself never waits for an image.
"""
from __future__ import annotations

import time
from html import escape
from urllib.parse import urlencode

from daemon.web.controller import FailedFile, PairView, RecentOutput, WaitingFile

REFRESH_S = 15

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.3em .6em;border-bottom:1px solid #ddd;
text-align:left;vertical-align:middle}
.state-standby{color:#b00}.state-busy{color:#06c}.state-watching{color:#070}
.pic{width:128px;height:128px;object-fit:contain;display:block}
.chk{background:repeating-conic-gradient(#ccc 0 25%,#fff 0 50%) 0 0/16px 16px}
.none{color:#888}form{display:inline}button{margin:.1em}
.banner{background:#fee;border:1px solid #b00;color:#b00;padding:.5em .8em}
"""


def _q(**params) -> str:
    return escape(urlencode(params), quote=True)


def _thumb(pair: int, root: str, rel: str, *, checker: bool) -> str:
    cls = "pic chk" if checker else "pic"
    return (f'<a href="/file?{_q(pair=pair, root=root, path=rel)}">'
            f'<img class="{cls}" loading="lazy" alt="{escape(rel)}" '
            f'src="/thumb?{_q(pair=pair, root=root, path=rel)}"></a>')


def _when(t: float) -> str:
    return escape(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)))


def _button(action: str, form_token: str, label: str, **fields) -> str:
    hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(str(v))}">'
                     for k, v in {**fields, "form_token": form_token}.items())
    return f'<form method="post" action="/{action}">{hidden}<button>{escape(label)}</button></form>'


def _cache_banner(cache: dict | None) -> str:
    """A banner while the mask cache is down (an outage; a disabled cache is no outage)."""
    if not cache or cache.get("available", True) or cache.get("backend") == "disabled":
        return ""
    why = cache.get("error") or "unavailable"
    return (f'<p class="banner" role="alert">The {escape(str(cache.get("backend", "")))} '
            f"mask cache is unavailable: {escape(str(why))}. Files are processed without "
            "it (slower: every mask is inferred); it is retried on its own.</p>")


def _pairs(snapshot: dict) -> str:
    rows = "".join(
        f"<tr><td>{p.index}</td><td>{escape(p.inbox)}</td><td>{escape(p.outbox)}</td>"
        f'<td class="state-{escape(p.state)}">{escape(p.state)}'
        f"{' — ' + escape(p.why) if p.why else ''}</td></tr>"
        for p in snapshot["pairs"])
    return ("<table><tr><th>#</th><th>inbox</th><th>outbox</th><th>state</th></tr>"
            f"{rows}</table><p>{escape(snapshot['line'])}; {snapshot['in_progress']} in "
            "progress</p>")


def _recent(recent: list[RecentOutput], labels: dict[int, str]) -> str:
    if not recent:
        return '<p class="none">nothing processed yet</p>'
    rows = []
    for r in recent:
        source = (_thumb(r.pair, r.source_root, r.source_rel, checker=False)
                  if r.source_root else '<span class="none">source deleted</span>')
        outs = "".join(_thumb(r.pair, "outbox", o, checker=True) for o in r.outputs[:1])
        rows.append(f"<tr><td>{source}</td><td>{outs}</td><td>{escape(r.source_rel)}<br>"
                    f"<small>{escape(labels.get(r.pair, '?'))}</small></td>"
                    f"<td>{escape(r.tier)}</td><td>{escape(r.model)}</td>"
                    f"<td>{_when(r.time)}<br><small>{r.ms:.0f} ms</small></td></tr>")
    return ("<table><tr><th>source</th><th>output</th><th>file</th><th>tier</th><th>model</th>"
            f"<th>time</th></tr>{''.join(rows)}</table>")


def _failed(failed: list[FailedFile], labels: dict[int, str], form_token: str) -> str:
    if not failed:
        return '<p class="none">no failed files</p>'
    rows = "".join(
        f"<tr><td>{escape(f.rel)}<br><small>{escape(labels.get(f.pair, '?'))}</small></td>"
        f"<td>{escape(f.reason)}</td><td><small>{escape(f.error)}</small></td>"
        f"<td>{_when(f.time)}</td>"
        f"<td>{_button('retry', form_token, 'Retry', pair=f.pair, path=f.rel)}</td></tr>"
        for f in failed)
    return ("<table><tr><th>file</th><th>reason</th><th>error</th><th>failed at</th><th></th>"
            f"</tr>{rows}</table>")


def _waiting(waiting: list[WaitingFile], labels: dict[int, str]) -> str:
    if not waiting:
        return '<p class="none">no incomplete files</p>'
    rows = "".join(
        f"<tr><td>{_thumb(w.pair, 'inbox', w.rel, checker=False)}</td>"
        f"<td>{escape(w.rel)}<br><small>{escape(labels.get(w.pair, '?'))}</small></td>"
        f"<td>empty or truncated; checked {w.checks} time{'s' if w.checks != 1 else ''}</td>"
        f"<td>{_when(w.gives_up)}</td></tr>" for w in waiting)
    return ("<p>Still being copied? It is processed once complete. If it does not change, it "
            "goes to failed/ at the time shown.</p><table><tr><th>source</th><th>file</th>"
            f"<th>state</th><th>to failed/ at</th></tr>{rows}</table>")


def _review(items: list, labels: dict[str, int], models: list[str], form_token: str) -> str:
    if not items:
        return '<p class="none">nothing waiting for review</p>'
    rows = []
    for item in items:
        pair = labels.get(item.pair)
        if pair is None:
            continue  # its pair was removed by a reload
        outs = "".join(_thumb(pair, "review", o, checker=True) for o in item.outputs[:1])
        buttons = _button("approve", form_token, "Approve", pair=pair, item=item.id) + "".join(
            _button("redo", form_token, f"Redo with {m}", pair=pair, item=item.id, model=m)
            for m in models if m != item.model)
        rows.append(f"<tr><td>{outs}</td><td>{escape(item.source_rel)}<br><small>"
                    f"{escape(item.pair)}</small></td><td>{item.confidence:.2f}<br><small>"
                    f"{escape('; '.join(item.reasons))}</small></td><td>{escape(item.model)}</td>"
                    f"<td>{buttons}</td></tr>")
    return ("<table><tr><th>output</th><th>file</th><th>confidence</th><th>model</th><th></th>"
            f"</tr>{''.join(rows)}</table>")


def status_page(snapshot: dict, recent: list[RecentOutput], failed: list[FailedFile],
                review: list, models: list[str], form_token: str,
                waiting: list[WaitingFile] = (), logout: bool = False) -> str:
    pairs: list[PairView] = snapshot["pairs"]
    labels = {p.index: p.inbox for p in pairs}
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>rembgd</title>'
            f'<meta http-equiv="refresh" content="{REFRESH_S}"><style>{STYLE}</style></head>'
            f"<body><h1>rembgd</h1>{_cache_banner(snapshot.get('cache'))}"
            f"<h2>Pairs</h2>{_pairs(snapshot)}"
            f'<h2 id="review">Waiting for review ({len(review)})</h2>'
            f"{_review(review, {p.inbox: p.index for p in pairs}, models, form_token)}"
            f'<h2 id="failed">Failed ({len(failed)})</h2>{_failed(failed, labels, form_token)}'
            f'<h2 id="waiting">Waiting: incomplete ({len(waiting)})</h2>{_waiting(waiting, labels)}'
            f'<h2 id="recent">Recent outputs</h2>{_recent(recent, labels)}'
            f'<p><a href="/metrics">metrics</a>'
            f"{' ' + _button('logout', form_token, 'Log out') if logout else ''}</p></body></html>")


def login_page(error: str | None = None) -> str:
    note = f'<p class="state-standby">{escape(error)}</p>' if error else ""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>rembgd: log in</title>'
            f"<style>{STYLE}</style></head><body><h1>rembgd</h1>{note}"
            '<form method="post" action="/login"><label>Token (web.token in the config) '
            '<input type="password" name="token" autofocus></label> <button>Log in</button>'
            "</form></body></html>")
