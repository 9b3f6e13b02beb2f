// rembgd's list page: actions through the JSON API, batch selection, and live updates
// (polls /api/state and re-renders the sections in place, keeping scroll and selection).
"use strict";
(function () {
  // a thumbnail that cannot be made (the source is gone, not an image): a quiet
  // placeholder in its place, not the browser's broken-image icon and alt text
  const noPic = (img) => img.parentElement && img.parentElement.classList.contains("pic")
    && img.parentElement.classList.add("nopic");
  document.addEventListener("error", (e) => { if (e.target.tagName === "IMG") noPic(e.target); }, true);
  document.querySelectorAll(".pic img").forEach((img) => {
    if (img.complete && img.naturalWidth === 0) noPic(img);
  });

  const live = document.getElementById("live");
  const msg = document.getElementById("msg");
  if (!live) return;
  const token = () => live.dataset.formToken;

  function say(text, isError) {
    msg.textContent = text;
    msg.classList.remove("hidden");
    msg.classList.toggle("error", !!isError);
  }

  async function post(url, body) {
    const resp = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Form-Token": token()},
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await resp.json(); } catch (e) { data = {error: resp.statusText}; }
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    return data;
  }

  function selected(scope, all) {
    const boxes = live.querySelectorAll(`input[name=sel][data-scope=${scope}]`);
    return Array.from(boxes).filter((b) => all || b.checked).map((b) => b.value);
  }

  // retried files: if one comes back to failed/, say so ("Retry failed again: why")
  const retried = new Set(JSON.parse(sessionStorage.getItem("rembgd-retried") || "[]"));
  function noteRetried(ids) {
    ids.forEach((id) => retried.add(id));
    sessionStorage.setItem("rembgd-retried", JSON.stringify(Array.from(retried)));
  }
  function checkRetried() {
    const back = Array.from(live.querySelectorAll("tr[data-id]")).filter((r) => retried.has(r.dataset.id));
    if (!back.length) return;
    back.forEach((r) => retried.delete(r.dataset.id));
    sessionStorage.setItem("rembgd-retried", JSON.stringify(Array.from(retried)));
    say("Retry failed again: " + back.map((r) => `${r.dataset.name}: ${r.dataset.reason}`).join("; "), true);
  }

  live.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!form.dataset.api) return;
    ev.preventDefault();
    const body = {};
    if (form.elements.model) body.model = form.elements.model.value;
    form.querySelectorAll("button").forEach((b) => (b.disabled = true));
    try {
      say((await post(form.dataset.api, body)).message);
      if (form.dataset.api.endsWith("/retry")) noteRetried([form.dataset.api.split("/")[3]]);
    } catch (e) {
      say(e.message, true);
    }
    refresh();
  });

  live.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button[data-batch]");
    if (!btn) return;
    const ids = selected(btn.dataset.scope, btn.dataset.all === "1");
    if (!ids.length) return say("Select some files first", true);
    if (btn.dataset.batch === "dismiss" &&
        !confirm(`Move ${ids.length} failed file(s) aside to failed/.dismissed/?`)) return;
    btn.disabled = true;
    try {
      const r = await post("/api/batch", {action: btn.dataset.batch, ids});
      if (btn.dataset.batch === "retry") noteRetried(r.results.filter((x) => x.ok).map((x) => x.id));
      const refused = r.results.filter((x) => !x.ok).map((x) => x.message);
      say(r.message + (refused.length ? ": " + refused.join("; ") : ""), refused.length > 0);
    } catch (e) {
      say(e.message, true);
    }
    refresh();
  });

  live.addEventListener("change", (ev) => {
    const all = ev.target.closest("input[data-select-all]");
    if (!all) return;
    live.querySelectorAll(`input[name=sel][data-scope=${all.dataset.selectAll}]`)
      .forEach((b) => (b.checked = all.checked));
  });

  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const url = new URL(location.href);
      url.searchParams.set("fragment", "1");
      url.searchParams.delete("msg");
      const resp = await fetch(url, {credentials: "same-origin"});
      if (!resp.ok) return;
      const html = await resp.text();
      const keep = new Set(selected("review").concat(selected("failed")));
      const closed = new Set(Array.from(live.querySelectorAll("details.group:not([open]) summary"))
        .map((s) => s.textContent));
      const y = window.scrollY;
      live.innerHTML = html;
      live.querySelectorAll("input[name=sel]").forEach((b) => (b.checked = keep.has(b.value)));
      live.querySelectorAll("details.group summary").forEach((s) => {
        if (closed.has(s.textContent)) s.parentElement.open = false;
      });
      window.scrollTo(0, y);
      checkRetried();
    } finally {
      busy = false;
    }
  }

  let last = null;
  async function poll() {
    try {
      const resp = await fetch("/api/state", {credentials: "same-origin"});
      if (resp.ok) {
        const text = await resp.text();
        if (last !== null && text !== last) await refresh();
        last = text;
      }
    } catch (e) { /* the daemon restarts: try again */ }
    setTimeout(poll, document.hidden ? 15000 : 3000);
  }
  if (history.replaceState && new URL(location.href).searchParams.has("msg")) {
    const u = new URL(location.href); u.searchParams.delete("msg"); history.replaceState(null, "", u);
  }
  poll();
})();
