// rembgd's item view: source and cutout side by side or as a before/after slider, zoom
// and pan synchronised (fit..400%), backgrounds, keep/remove brushes with undo, and the
// decisions (approve, redo, retry, dismiss, touch-up, revert) through the JSON API.
"use strict";
(function () {
  const main = document.getElementById("item");
  if (!main) return;
  const item = JSON.parse(main.dataset.item);
  const token = main.dataset.formToken;
  const $ = (id) => document.getElementById(id);
  const msg = $("msg"), viewer = $("viewer");
  const panes = [$("pane-src"), $("pane-out")];
  const imgs = [$("img-src"), $("img-out")];
  const canvas = $("strokes");
  const W = item.width, H = item.height;  // source px, EXIF orientation applied
  let shown = 0;  // which deliverable
  let scale = 1, tx = 0, ty = 0, fit = true;
  let tool = "pan", strokes = [], drawing = null;
  let version = Date.now();

  // the message floats over the view (it never moves the images); a plain one goes
  // after a while, an error stays until it is clicked
  let hideLater = null;
  function say(text, isError) {
    msg.textContent = text; msg.classList.remove("hidden"); msg.classList.toggle("error", !!isError);
    clearTimeout(hideLater);
    if (!isError) hideLater = setTimeout(() => msg.classList.add("hidden"), 8000);
  }
  msg.addEventListener("click", () => msg.classList.add("hidden"));
  const q = (f) => new URLSearchParams({pair: f.pair, root: f.root, path: f.path}).toString();

  // ---------------------------------------------------------------- images
  // previews (2048 px WebP, cached) first; the full file once the zoom needs its pixels
  function sources() {
    const out = item.outputs[shown];
    return [item.source.root ? item.source : null, out || null];
  }
  function load(full) {
    sources().forEach((f, i) => {
      if (!f) { imgs[i].removeAttribute("src"); return; }
      const url = (full ? "/file?" : "/preview?") + q(f) + "&v=" + version;
      if (imgs[i].dataset.url !== url) { imgs[i].dataset.url = url; imgs[i].src = url; }
    });
  }
  let full = false;

  // ------------------------------------------------------------ transform
  function box() { return panes[1].getBoundingClientRect(); }
  function fitScale() {
    const r = box();
    return Math.min(r.width / W, r.height / H);
  }
  function apply() {
    panes.forEach((p) => {
      const stage = p.querySelector(".stage");
      stage.style.width = W + "px"; stage.style.height = H + "px";
      stage.style.transform = `translate(${tx}px, ${ty}px) scale(${scale})`;
      p.classList.toggle("pixelated", scale >= 2);
    });
    $("zoomlevel").textContent = fit ? "fit" : Math.round(scale * 100) + "%";
    const wantFull = scale * Math.max(W, H) > 2048 * 1.05;
    if (wantFull !== full) { full = wantFull; load(full); }
    draw();
  }
  function zoomTo(s, cx, cy) {
    const r = box();
    if (cx === undefined) { cx = r.width / 2; cy = r.height / 2; }
    const sx = (cx - tx) / scale, sy = (cy - ty) / scale;  // the source px under the point
    scale = Math.min(4, Math.max(fitScale() * 0.5, s));
    tx = cx - sx * scale; ty = cy - sy * scale;
    fit = false; apply();
  }
  function toFit() {
    const r = box();
    scale = fitScale(); tx = (r.width - W * scale) / 2; ty = (r.height - H * scale) / 2;
    fit = true; apply();
  }
  document.querySelectorAll("[data-zoom]").forEach((b) => b.addEventListener("click", () => {
    if (b.dataset.zoom === "fit") toFit(); else zoomTo(parseFloat(b.dataset.zoom));
  }));
  panes.forEach((p) => p.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = p.getBoundingClientRect();
    zoomTo(scale * Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
  }, {passive: false}));
  window.addEventListener("resize", () => { if (fit) toFit(); else apply(); });

  // ------------------------------------------------------ pan and brushes
  function toSource(ev) {
    const r = panes[1].getBoundingClientRect();
    return [(ev.clientX - r.left - tx) / scale, (ev.clientY - r.top - ty) / scale];
  }
  let panning = null;
  panes.forEach((p) => {
    p.addEventListener("pointerdown", (ev) => {
      p.setPointerCapture(ev.pointerId);
      if (tool !== "pan" && p === panes[1]) {
        drawing = {mode: tool, radius: brushRadius(), points: [toSource(ev)]};
        strokes.push(drawing); draw(); return;
      }
      panning = {x: ev.clientX - tx, y: ev.clientY - ty};
    });
    p.addEventListener("pointermove", (ev) => {
      if (drawing) { drawing.points.push(toSource(ev)); draw(); return; }
      if (panning) { tx = ev.clientX - panning.x; ty = ev.clientY - panning.y; fit = false; apply(); }
    });
    const end = () => {
      if (drawing) { drawing = null; tools(); }
      panning = null;
    };
    p.addEventListener("pointerup", end);
    p.addEventListener("pointercancel", end);
  });
  // the brush size is in screen px; the stroke's radius in source px
  function brushRadius() { return Math.max(0.5, parseFloat($("brush").value) / 2 / scale); }

  function draw() {
    if (!canvas) return;
    const r = box();
    const dpr = window.devicePixelRatio || 1;
    canvas.width = r.width * dpr; canvas.height = r.height * dpr;
    canvas.style.width = r.width + "px"; canvas.style.height = r.height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * tx, dpr * ty);
    for (const s of strokes) {
      ctx.strokeStyle = ctx.fillStyle = s.mode === "keep" ? "rgba(30,200,80,.5)" : "rgba(230,30,60,.5)";
      ctx.lineWidth = 2 * s.radius; ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      if (s.points.length === 1) ctx.lineTo(s.points[0][0] + 0.01, s.points[0][1]);
      ctx.stroke();
    }
  }
  function tools() {
    if ($("undo")) $("undo").disabled = !strokes.length;
    if ($("apply")) $("apply").disabled = !strokes.length;
  }
  // a brush picked: the daemon gets the source ready (decoded, its alpha made) while
  // the strokes are drawn, so Apply costs the strokes and the file, not a decode
  let prepared = false;
  function setTool(t) {
    tool = t;
    if (t !== "pan" && !prepared) { prepared = true; post("prepare", {}).catch(() => {}); }
    document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("on", b.dataset.tool === t));
    viewer.classList.toggle("brush", t !== "pan");
  }
  document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  if ($("brush")) $("brush").addEventListener("input", () => ($("brushsize").textContent = $("brush").value));
  function undo() { strokes.pop(); draw(); tools(); }
  if ($("undo")) $("undo").addEventListener("click", undo);

  // -------------------------------------------------- compare and background
  function setView(v) {
    viewer.classList.toggle("side", v === "side"); viewer.classList.toggle("slider", v === "slider");
    document.querySelectorAll("[data-view]").forEach((b) => b.classList.toggle("on", b.dataset.view === v));
    split(); if (fit) toFit(); else apply();
  }
  function split() {
    panes[1].style.clipPath = viewer.classList.contains("slider") ? `inset(0 0 0 ${$("split").value}%)` : "";
  }
  document.querySelectorAll("[data-view]").forEach((b) => b.addEventListener("click", () => setView(b.dataset.view)));
  $("split").addEventListener("input", split);
  const BGS = ["checker", "white", "black", "colour"];
  let bg = "checker";
  function setBg(name) {
    bg = name;
    const p = panes[1];
    p.classList.toggle("chk", name === "checker");
    p.classList.toggle("white", name === "white");
    p.classList.toggle("black", name === "black");
    p.style.backgroundColor = name === "colour" ? $("bgcolour").value : "";
    document.querySelectorAll("[data-bg]").forEach((b) => b.classList.toggle("on", b.dataset.bg === name));
    p.dataset.bg = name;
  }
  document.querySelectorAll("[data-bg]").forEach((b) => b.addEventListener("click", () => setBg(b.dataset.bg)));
  $("bgcolour").addEventListener("input", () => setBg("colour"));
  document.querySelectorAll("input[name=shown]").forEach((r) => r.addEventListener("change", () => {
    shown = parseInt(r.value, 10); load(full);
  }));

  // --------------------------------------------------------------- actions
  async function post(action, body) {
    const resp = await fetch(`/api/items/${item.id}/${action}`, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Form-Token": token},
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await resp.json(); } catch (e) { data = {error: resp.statusText}; }
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    return data;
  }
  async function act(action, body, then) {
    document.querySelectorAll(".decide button, .tools button").forEach((b) => (b.disabled = true));
    say(action === "touchup" ? "Touching up…" : "Working…");
    try {
      const r = await post(action, body);
      say(r.message);
      if (then) then(r);
    } catch (e) {
      say(e.message, true);
    } finally {
      document.querySelectorAll(".decide button, .tools button").forEach((b) => (b.disabled = false));
      tools();
    }
  }
  function next() { const n = $("next"); if (n) location.href = n.href; }
  function afterDelivery(r) {
    if (r.item && r.item !== item.id) {  // a held item is delivered: it is an output now
      history.replaceState(null, "", "/item/" + r.item);
      item.id = r.item; item.outputs = r.outputs || item.outputs; item.kind = "output";
    }
    strokes = []; version = Date.now(); imgs[1].dataset.url = ""; load(full); draw();
  }
  if ($("approve")) $("approve").addEventListener("click", () => act("approve", {}, () => setTimeout(next, 600)));
  document.querySelectorAll("button.redo").forEach((b) => b.addEventListener("click", () =>
    act("redo", {model: b.dataset.model}, () => setTimeout(next, 600))));
  if ($("retry")) $("retry").addEventListener("click", () => act("retry", {}, () => setTimeout(next, 600)));
  if ($("dismiss")) $("dismiss").addEventListener("click", () => act("dismiss", {}, () => setTimeout(next, 600)));
  if ($("apply")) $("apply").addEventListener("click", () => act("touchup", {strokes}, afterDelivery));
  if ($("revert")) $("revert").addEventListener("click", () => act("revert", {}, afterDelivery));

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input[type=text],input[type=search],textarea")) return;
    const k = ev.key;
    if ((ev.ctrlKey || ev.metaKey) && k === "z") { ev.preventDefault(); undo(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (k === "n" || k === "ArrowRight") next();
    else if ((k === "p" || k === "ArrowLeft") && $("prev")) location.href = $("prev").href;
    else if (k === "a" && $("approve")) $("approve").click();
    else if (k === "r" && document.querySelector("button.redo")) document.querySelector("button.redo").click();
    else if (k === "f") toFit();
    else if (k === "1") zoomTo(1);
    else if (k === "b") setBg(BGS[(BGS.indexOf(bg) + 1) % BGS.length]);
    else if (k === "k" && $("apply")) setTool("keep");
    else if (k === "e" && $("apply")) setTool("remove");
    else if (k === " ") { ev.preventDefault(); setTool("pan"); }
    else if (k === "Escape") location.href = $("back").href;
  });

  // the views are laid out: fit, load the previews, and say when they are painted
  setBg("checker"); tools();
  load(false);
  if (window.innerWidth < 800) setView("slider"); else toFit();  // a phone: one pane
  Promise.all(imgs.map((im) => im.decode ? im.decode().catch(() => null) : null)).then(() => {
    main.dataset.painted = String(Math.round(performance.now()));
  });
})();
