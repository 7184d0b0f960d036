// The search page: text, image and "more like this" searches against this service's JSON API.
// Plain browser JavaScript, no build step. Everything that comes from the collection (captions,
// metadata, ids) is inserted with textContent or attributes, never parsed as HTML.
"use strict";

(() => {
  const PAGE_K = 24;
  const MAX_K = 100;
  const READY_POLL_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("search-form"), q: $("q"), file: $("file"),
    collectionBox: $("collection-box"), collection: $("collection"), filters: $("filters"),
    queryBox: $("query-box"), queryImg: $("query-img"), queryLabel: $("query-label"),
    targetBox: $("target-box"), queryClear: $("query-clear"),
    notice: $("notice"), error: $("error"),
    results: $("results"), captionResults: $("caption-results"), more: $("more"),
    dropZone: $("drop-zone"),
    viewer: $("viewer"), viewerTitle: $("viewer-title"), viewerClose: $("viewer-close"),
    viewerImg: $("viewer-img"), viewerCaptions: $("viewer-captions"), viewerMeta: $("viewer-meta"),
    viewerLike: $("viewer-like"), viewerOpen: $("viewer-open"),
    signin: $("signin"), signinKey: $("signin-key"), signinError: $("signin-error"), signout: $("signout"),
  };

  // What is being searched; `offset` is the next page's.
  const state = {
    ready: false, collections: [], defaultCollection: null, collection: null, filters: {},
    mode: null, query: "", file: null, fileUrl: null, likeId: null, target: "images",
    k: PAGE_K, offset: 0, shown: 0, seq: 0, viewerHit: null,
  };

  // --- small DOM helpers (text only) -----------------------------------------------------------

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  // data-state (and data-done, the number of the last finished search) let tests and tools wait
  // for the page without guessing at timings.
  function setState(name) { document.body.dataset.state = name; }
  function finished(seq) { document.body.dataset.done = String(seq); }

  function notice(text) { ui.notice.textContent = text; }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = !text;
  }

  function formatValue(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // --- the API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status; this.code = code; this.retryAfter = retryAfter;
    }
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
    } catch (err) {
      throw new ApiError(0, "network", "cannot reach the search service (is it running?)");
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) {
      const info = body && body.error ? body.error : {};
      const message = info.message || (body && body.reason) || `HTTP ${response.status}`;
      throw new ApiError(response.status, info.code || "http_error", message,
                         Number(response.headers.get("Retry-After")) || 0);
    }
    return { body, timing: parseServerTiming(response.headers.get("Server-Timing")) };
  }

  // "encode;dur=3.1, search;dur=0.4, total;dur=4.0" -> {encode: 3.1, search: 0.4, total: 4.0, cache: false}
  function parseServerTiming(header) {
    const out = { cache: false };
    if (!header) return out;
    for (const part of header.split(",")) {
      const [name, ...params] = part.trim().split(";");
      if (name === "cache") out.cache = true;
      for (const p of params) {
        const [key, value] = p.trim().split("=");
        if (key === "dur" && !Number.isNaN(Number(value))) out[name] = Number(value);
      }
    }
    return out;
  }

  function describeError(err) {
    if (err.status === 429) {
      const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
      return `The server is busy (too many searches at once).${wait} (${err.message})`;
    }
    if (err.status === 503) return `The service is not ready yet: ${err.message}`;
    if (err.status === 401) return "Please sign in.";
    if (err.status === 403) return `Not allowed: ${err.message}`;
    if (err.code === "invalid_image") return `That file cannot be searched: ${err.message}`;
    if (err.status === 413) return `That file is too large: ${err.message}`;
    if (err.status === 0) return `No answer: ${err.message}`;
    return `The search failed: ${err.message}`;
  }

  // --- readiness and collections ----------------------------------------------------------------

  // /collections answers 503 with the reason (the one /readyz gives) until the service is ready.
  async function boot() {
    setState("starting");
    try {
      const { body } = await api("/collections");
      state.collections = body.collections;
      state.defaultCollection = body.default;
    } catch (err) {
      if (err.status === 401) { showSignIn(); return; }
      if (err.status === 503) {
        setState("not-ready");
        showError("");
        notice(`The service is not ready yet: ${err.message}. This page retries on its own.`);
      } else {
        setState("unreachable");
        notice("");
        showError(err.status === 0 ? "Cannot reach the search service; retrying…" : describeError(err));
      }
      setTimeout(boot, READY_POLL_MS);
      return;
    }
    state.ready = true;
    showError("");
    ui.signin.hidden = true;
    checkSession();
    fromUrl();
    buildCollectionPicker();
    buildFilters();
    if (state.mode) runSearch(false);
    else idle();
  }

  function currentInfo() {
    return state.collections.find((c) => c.name === state.collection)
      || state.collections.find((c) => c.default) || state.collections[0];
  }

  function buildCollectionPicker() {
    ui.collection.replaceChildren();
    for (const c of state.collections) {
      ui.collection.append(el("option", { value: c.name, text: `${c.name} (${c.images} images)` }));
    }
    ui.collection.value = currentInfo().name;
    ui.collectionBox.hidden = state.collections.length < 2;
  }

  function buildFilters() {
    ui.filters.replaceChildren();
    const info = currentInfo();
    const fields = info ? info.metadata_fields || {} : {};
    for (const [field, values] of Object.entries(fields)) {
      const select = el("select", { "data-field": field });
      select.append(el("option", { value: "", text: "any" }));
      values.forEach((value, i) => select.append(el("option", { value: String(i), text: formatValue(value) })));
      const chosen = field in state.filters ? values.findIndex((v) => v === state.filters[field]) : -1;
      select.value = chosen >= 0 ? String(chosen) : "";
      if (chosen < 0) delete state.filters[field];
      select.addEventListener("change", () => {
        if (select.value === "") delete state.filters[field];
        else state.filters[field] = values[Number(select.value)];
        if (state.mode) runSearch(true);
      });
      ui.filters.append(el("label", { class: "field" }, [field, select]));
    }
  }

  // --- the URL (so a search can be reloaded and shared) ------------------------------------------

  function fromUrl() {
    const params = new URLSearchParams(location.search);
    const names = state.collections.map((c) => c.name);
    const wanted = params.get("collection");
    state.collection = names.includes(wanted) ? wanted : state.defaultCollection;
    const k = Number(params.get("k"));
    state.k = Number.isInteger(k) && k >= 1 ? Math.min(k, MAX_K) : PAGE_K;
    state.filters = {};
    const fields = currentInfo().metadata_fields || {};
    for (const [key, raw] of params) {
      if (!key.startsWith("f.")) continue;
      const field = key.slice(2);
      const match = (fields[field] || []).find((v) => formatValue(v) === raw);
      if (match !== undefined) state.filters[field] = match;
    }
    state.query = params.get("q") || "";
    state.likeId = params.get("like");
    ui.q.value = state.query;
    clearFile();
    state.mode = state.likeId ? "similar" : state.query.trim() ? "text" : null;
    if (state.mode !== "similar") state.likeId = null;
    showQueryBox();
  }

  function toUrl(push) {
    const params = new URLSearchParams();
    if (state.mode === "text") params.set("q", state.query);
    if (state.mode === "similar") params.set("like", state.likeId);
    if (state.collection && state.collection !== state.defaultCollection) params.set("collection", state.collection);
    if (state.k !== PAGE_K) params.set("k", String(state.k));
    for (const [field, value] of Object.entries(state.filters)) params.set(`f.${field}`, formatValue(value));
    const search = params.toString();
    const url = search ? `/?${search}` : "/";
    if (url === location.pathname + location.search) return;
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
  }

  // --- searching --------------------------------------------------------------------------------

  function idle() {
    setState("idle");
    clearResults();
    notice("Type a description and press Enter, or pick or drop an image to find similar ones.");
  }

  function clearResults() {
    ui.results.replaceChildren();
    ui.captionResults.replaceChildren();
    ui.more.hidden = true;
    state.shown = 0;
  }

  function filterOrNull() {
    return Object.keys(state.filters).length ? { ...state.filters } : null;
  }

  function request(offset) {
    const common = { k: state.k, offset, collection: state.collection, filter: filterOrNull() };
    if (state.mode === "text") {
      return ["/search/text", { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" },
                                body: JSON.stringify({ query: state.query, ...common }) }];
    }
    if (state.mode === "similar") {
      return ["/search/similar", { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" },
                                   body: JSON.stringify({ image_id: state.likeId, ...common }) }];
    }
    const form = new FormData();
    form.append("file", state.file, state.file.name || "image");
    form.append("k", String(state.k));
    form.append("offset", String(offset));
    form.append("target", state.target);
    form.append("collection", state.collection);
    if (common.filter) form.append("filter", JSON.stringify(common.filter));
    return ["/search/image", { method: "POST", body: form }];
  }

  async function runSearch(push, more = false) {
    if (!state.ready || !state.mode) return;
    const seq = ++state.seq;
    const offset = more ? state.offset : 0;
    if (!more) {
      toUrl(push);
      clearResults();
    }
    showError("");
    setState("searching");
    notice(more ? "Loading more…" : "Searching…");
    ui.more.disabled = true;
    const t0 = performance.now();
    try {
      const [path, options] = request(offset);
      const { body, timing } = await api(path, options);
      if (seq !== state.seq) return; // a newer search has started
      const roundTrip = performance.now() - t0;
      const captions = body.target === "captions";
      ui.results.hidden = captions;
      ui.captionResults.hidden = !captions;
      for (const hit of body.results) (captions ? ui.captionResults : ui.results).append(captions ? captionRow(hit) : card(hit));
      state.shown += body.results.length;
      state.offset = offset + body.results.length;
      ui.more.hidden = body.results.length < state.k;
      ui.more.disabled = false;
      notice(summary(body, timing, roundTrip));
      setState("done");
      finished(seq);
    } catch (err) {
      if (seq !== state.seq) return;
      ui.more.hidden = true;
      notice(state.shown ? `${state.shown} shown` : "");
      showError(describeError(err));
      setState("error");
      finished(seq);
      if (err.status === 503) { state.ready = false; setTimeout(boot, READY_POLL_MS); }
      if (err.status === 401) showSignIn(); // the session expired or its key was revoked
    }
  }

  // --- signing in (only where the service has API keys) -----------------------------------------
  // The key is sent once to POST /auth/login, which answers an HttpOnly session cookie; the page
  // never stores the key. Thumbnails and images then load with the cookie.

  function showSignIn() {
    state.ready = false;
    setState("signin");
    showError("");
    notice("");
    ui.signout.hidden = true;
    ui.signin.hidden = false;
    ui.signinKey.focus();
  }

  async function checkSession() {
    try {
      const { body } = await api("/auth/session");
      ui.signout.hidden = !body.signed_in;
      ui.signout.title = body.signed_in ? `Signed in as ${body.name} (${body.scope})` : "";
    } catch (err) {
      ui.signout.hidden = true;
    }
  }

  ui.signin.addEventListener("submit", async (event) => {
    event.preventDefault();
    ui.signinError.hidden = true;
    try {
      await api("/auth/login", { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" },
                                 body: JSON.stringify({ key: ui.signinKey.value }) });
    } catch (err) {
      ui.signinError.textContent = err.status === 401 ? "That key is not valid."
        : err.status === 429 ? `Too many wrong keys; try again in ${err.retryAfter || 60} s.` : describeError(err);
      ui.signinError.hidden = false;
      return;
    }
    ui.signinKey.value = "";
    boot();
  });

  ui.signout.addEventListener("click", async () => {
    try { await api("/auth/logout", { method: "POST" }); } catch (err) { /* signed out either way */ }
    clearResults();
    ui.queryBox.hidden = true;
    state.mode = null;
    showSignIn();
  });

  function summary(body, timing, roundTrip) {
    const what = body.target === "captions" ? "caption" : "image";
    const count = state.shown === 0 ? `No ${what}s found` : `${state.shown} ${what}${state.shown === 1 ? "" : "s"}`;
    const server = timing.total !== undefined ? timing.total : body.took_ms;
    const stages = Object.entries(timing).filter(([name]) => !["total", "cache"].includes(name))
      .map(([name, ms]) => `${name} ${ms.toFixed(1)}`).join(", ");
    const detail = timing.cache || body.cached ? "cached" : stages;
    return `${count} · last search ${server.toFixed(1)} ms on the server${detail ? ` (${detail})` : ""}, `
      + `${roundTrip.toFixed(0)} ms round trip`;
  }

  // --- results ----------------------------------------------------------------------------------

  function altText(hit) {
    return hit.captions && hit.captions.length ? hit.captions[0] : `Image ${hit.image_id}`;
  }

  function card(hit) {
    const img = el("img", { src: hit.thumbnail_url, alt: altText(hit), loading: "lazy", decoding: "async" });
    const open = el("button", { type: "button", class: "thumb", "aria-label": `Open ${altText(hit)}`,
                                on: { click: () => openViewer(hit) } }, [img]);
    const caps = el("ul", { class: "card-captions" },
                    (hit.captions || []).map((c) => el("li", { text: c })));
    const like = el("button", { type: "button", class: "like", text: "More like this",
                                on: { click: () => moreLike(hit.image_id) } });
    const score = el("span", { class: "score", title: "cosine similarity", text: hit.score.toFixed(3) });
    return el("li", { class: "card", "data-image-id": hit.image_id }, [
      el("div", { class: "frame" }, [open, caps, score]), like,
    ]);
  }

  function captionRow(hit) {
    const img = el("img", { src: hit.thumbnail_url, alt: hit.caption, loading: "lazy", width: 64, height: 64 });
    const open = el("button", { type: "button", class: "thumb small", "aria-label": `Open image ${hit.image_id}`,
                                on: { click: () => openItem(hit.image_id, hit) } }, [img]);
    return el("li", { class: "caption-row", "data-image-id": hit.image_id }, [
      open,
      el("span", { class: "caption-text", text: hit.caption }),
      el("span", { class: "score", title: "score", text: hit.score.toFixed(3) }),
    ]);
  }

  // --- the viewer dialog ------------------------------------------------------------------------

  function openViewer(hit) {
    state.viewerHit = hit;
    ui.viewerTitle.textContent = hit.image_id;
    ui.viewerImg.src = hit.image_url;
    ui.viewerImg.alt = altText(hit);
    ui.viewerOpen.href = hit.image_url;
    ui.viewerCaptions.replaceChildren(...(hit.captions && hit.captions.length
      ? hit.captions.map((c) => el("li", { text: c })) : [el("li", { class: "muted", text: "no captions" })]));
    const meta = Object.entries(hit.metadata || {});
    ui.viewerMeta.replaceChildren();
    if (!meta.length) ui.viewerMeta.append(el("dd", { class: "muted", text: "none" }));
    for (const [key, value] of meta) ui.viewerMeta.append(el("dt", { text: key }), el("dd", { text: formatValue(value) }));
    if (!ui.viewer.open) ui.viewer.showModal();
  }

  async function openItem(imageId) {
    try {
      const { body } = await api(`/collections/${encodeURIComponent(state.collection)}/items/${encodeURIComponent(imageId)}`);
      openViewer(body);
    } catch (err) {
      showError(describeError(err));
    }
  }

  function moreLike(imageId) {
    if (ui.viewer.open) ui.viewer.close();
    clearFile();
    state.mode = "similar";
    state.likeId = imageId;
    state.query = "";
    ui.q.value = "";
    showQueryBox();
    runSearch(true);
    window.scrollTo({ top: 0 });
  }

  // --- the query image --------------------------------------------------------------------------

  function clearFile() {
    if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
    state.file = null;
    state.fileUrl = null;
  }

  function showQueryBox() {
    if (state.mode === "image") {
      ui.queryImg.src = state.fileUrl;
      ui.queryImg.alt = `The query image ${state.file.name || ""}`.trim();
      ui.queryLabel.textContent = `Searching by ${state.file.name || "the image"}`;
      ui.targetBox.hidden = false;
    } else if (state.mode === "similar") {
      const info = currentInfo();
      const suffix = info && !info.default ? `?collection=${encodeURIComponent(info.name)}` : "";
      ui.queryImg.src = `/thumbnails/${encodeURIComponent(state.likeId)}${suffix}`;
      ui.queryImg.alt = `The image ${state.likeId}`;
      ui.queryLabel.textContent = `More like ${state.likeId}`;
      ui.targetBox.hidden = true;
    }
    ui.queryBox.hidden = !(state.mode === "image" || state.mode === "similar");
  }

  function searchFile(file) {
    if (!file) return;
    clearFile();
    state.file = file;
    state.fileUrl = URL.createObjectURL(file);
    state.mode = "image";
    state.likeId = null;
    state.query = "";
    ui.q.value = "";
    showQueryBox();
    runSearch(true);
  }

  // --- events -----------------------------------------------------------------------------------

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = ui.q.value.trim();
    if (!query) { ui.q.focus(); return; }
    clearFile();
    state.mode = "text";
    state.query = query;
    state.likeId = null;
    showQueryBox();
    runSearch(true);
  });

  ui.file.addEventListener("change", () => {
    searchFile(ui.file.files[0]);
    ui.file.value = ""; // picking the same file again searches again
  });

  for (const radio of ui.targetBox.querySelectorAll("input[name=target]")) {
    radio.addEventListener("change", () => {
      state.target = radio.value;
      if (state.mode === "image") runSearch(false);
    });
  }

  ui.queryClear.addEventListener("click", () => {
    clearFile();
    state.mode = null;
    state.likeId = null;
    ui.queryBox.hidden = true;
    toUrl(true);
    idle();
  });

  ui.queryImg.addEventListener("error", () => { ui.queryImg.removeAttribute("src"); });

  ui.collection.addEventListener("change", () => {
    state.collection = ui.collection.value;
    state.filters = {};
    buildFilters();
    if (state.mode === "similar") { state.mode = null; ui.queryBox.hidden = true; }
    if (state.mode) runSearch(true);
    else { toUrl(true); idle(); }
  });

  ui.more.addEventListener("click", () => runSearch(false, true));

  ui.viewerClose.addEventListener("click", () => ui.viewer.close());
  ui.viewer.addEventListener("click", (event) => { if (event.target === ui.viewer) ui.viewer.close(); });
  ui.viewer.addEventListener("close", () => { ui.viewerImg.removeAttribute("src"); });
  ui.viewerLike.addEventListener("click", () => { if (state.viewerHit) moreLike(state.viewerHit.image_id); });

  window.addEventListener("popstate", () => {
    if (!state.ready) return;
    fromUrl();
    ui.collection.value = currentInfo().name;
    buildFilters();
    if (state.mode) runSearch(false);
    else idle();
  });

  // Drag and drop anywhere on the page.
  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    ui.dropZone.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) ui.dropZone.hidden = true;
  });
  document.addEventListener("dragover", (event) => { if (hasFiles(event)) event.preventDefault(); });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    ui.dropZone.hidden = true;
    searchFile(event.dataTransfer.files[0]);
  });

  boot();
})();
