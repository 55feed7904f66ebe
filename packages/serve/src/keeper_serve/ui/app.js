// keeper review page: triage the groups of `keeper pick` runs with the keyboard.
//
// Plain script, no build step, no external resources (the CSP allows only 'self'). Server data
// reaches the DOM through textContent and attributes only, never as HTML. The token lives in
// sessionStorage (never the URL, never localStorage) and goes out in the Authorization header,
// so thumbnails are fetch()ed and shown through object URLs, revoked when their page is left.
//
// Decisions are queued and POSTed to /v1/feedback in order, one request at a time (an `undone`
// must land after the event it takes back), with sync: true; a tile is `pending` until its answer
// says durable, and `unsaved` while storage fails (kept queued, resent with the same event_id,
// which the server counts once) or when the server refused it.
"use strict";

(() => {
  const TOKEN_KEY = "keeper.review.token";
  const CLIENT_KEY = "keeper.review.client";
  const MAX_THUMB_FETCHES = 6;
  const MAX_BATCH = 20; // events per POST; a refused batch is resent one by one to find the bad one
  const RETRY_MIN_S = 2;
  const RETRY_MAX_S = 60;
  const NOTE_MS = 4000;
  const DECISIONS = new Set(["accepted", "rejected", "picked-as-keeper"]);
  const MODEL_DECISIONS = new Set(["keep", "alternate", "reject"]);
  const MINE = { accepted: "accepted", rejected: "rejected", "picked-as-keeper": "keeper" };
  const fmt = new Intl.NumberFormat("en-US");

  const $ = (id) => document.getElementById(id);
  const ui = {
    loginView: $("login-view"),
    login: $("login"),
    token: $("token"),
    client: $("client"),
    loginError: $("login-error"),
    reviewView: $("review-view"),
    run: $("run"),
    ranker: $("ranker"),
    clipModel: $("clip-model"),
    finished: $("finished"),
    weights: $("weights-warning"),
    prev: $("prev"),
    next: $("next"),
    pageInfo: $("page-info"),
    helpToggle: $("help-toggle"),
    help: $("help"),
    logout: $("logout"),
    actions: $("actions"),
    status: $("status"),
    sheet: $("sheet"),
  };

  const auth = { token: null, client: null };

  const state = {
    runs: [],
    run: null, // the selected run's entry of /v1/review/runs
    offset: 0,
    total: 0,
    pageSize: pageSizeFromQuery(),
    loadGen: 0, // a page answer older than the latest request is dropped
    loading: false,
    tiles: [], // {el, mine, imageId, groupId, group} in page order
    groupStarts: [], // index in tiles of each group's first tile
    tileByImage: new Map(),
    focus: -1,
    page: null, // the shown page's thumbnail loader and object URLs
    // This session's decisions, across pages and runs: key(run, image) -> action.
    decisions: new Map(),
    keepers: new Map(), // key(run, group) -> image_id this session picked as the group's keeper
    undo: [],
    note: "",
    noteBad: false,
    noteTimer: 0,
  };

  const sender = {
    queue: [], // entries to send, in order
    inflight: null,
    retryTimer: 0,
    retryAt: 0,
    failures: 0,
    batchLimit: MAX_BATCH,
    saved: 0,
    undone: 0,
    pending: new Map(), // key -> entries queued or in flight
    unsaved: new Map(), // key -> why its latest decision is not saved
    retryError: "",
    refused: 0,
    refusedError: "",
  };

  class AuthLost extends Error {}

  class ApiError extends Error {
    constructor(status, body) {
      const e = body && body.error;
      super(e && e.message ? `${e.code}: ${e.message}` : `HTTP ${status}`);
      this.status = status;
      this.code = e ? e.code : null;
    }
  }

  // ------------------------------------------------------------------ helpers

  function pageSizeFromQuery() {
    const raw = new URLSearchParams(location.search).get("page_size");
    const n = Number.parseInt(raw || "", 10);
    return Number.isFinite(n) ? Math.min(200, Math.max(1, n)) : 50;
  }

  function key(a, b) {
    return `${a}\n${b}`;
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function uuid() {
    if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // randomUUID needs a secure context; getRandomValues does not.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function plural(n, one, many) {
    return `${fmt.format(n)} ${n === 1 ? one : many}`;
  }

  function headers(extra) {
    const h = { Authorization: `Bearer ${auth.token}`, ...extra };
    if (auth.client) h["X-Keeper-Client"] = auth.client;
    return h;
  }

  async function readJson(res) {
    try {
      return await res.json();
    } catch {
      return null;
    }
  }

  // A 401 anywhere means the token is no longer good: back to the form.
  async function api(path, options) {
    const res = await fetch(path, {
      cache: "no-store",
      ...options,
      headers: headers(options && options.headers),
    });
    if (res.status === 401) {
      signOut("token refused: the server did not accept it; sign in again", { keepQueue: true });
      throw new AuthLost();
    }
    return res;
  }

  async function apiJson(path, options) {
    const res = await api(path, options);
    const body = await readJson(res);
    if (!res.ok) throw new ApiError(res.status, body);
    if (body === null) throw new ApiError(res.status, { error: { code: "bad_answer", message: "not JSON" } });
    return body;
  }

  function retryAfterS(res) {
    const v = res && res.headers.get("Retry-After");
    if (!v) return null;
    const s = Number(v);
    if (Number.isFinite(s)) return Math.max(1, s);
    const t = Date.parse(v);
    return Number.isFinite(t) ? Math.max(1, (t - Date.now()) / 1000) : null;
  }

  // ------------------------------------------------------------------ sign in / out

  function showLogin(message) {
    ui.reviewView.hidden = true;
    ui.loginView.hidden = false;
    ui.help.hidden = true;
    ui.loginError.textContent = message || "";
    ui.loginError.hidden = !message;
    ui.token.value = "";
    ui.client.value = auth.client || sessionStorage.getItem(CLIENT_KEY) || ui.client.value;
    ui.token.focus();
  }

  function signOut(message, { keepQueue = false } = {}) {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(CLIENT_KEY);
    auth.token = null;
    state.loadGen += 1;
    leavePage();
    ui.sheet.replaceChildren();
    state.tiles = [];
    state.tileByImage = new Map();
    state.focus = -1;
    let msg = message || "";
    if (!keepQueue) {
      const lost = sender.queue.length + (sender.inflight ? sender.inflight.length : 0);
      if (lost) msg = `${msg ? `${msg}. ` : ""}${plural(lost, "decision was", "decisions were")} not saved`;
      clearTimeout(sender.retryTimer);
      Object.assign(sender, { queue: [], retryTimer: 0, failures: 0, saved: 0, undone: 0 });
      Object.assign(sender, { pending: new Map(), unsaved: new Map(), refused: 0, retryError: "" });
      state.decisions.clear();
      state.keepers.clear();
      state.undo = [];
      auth.client = null;
    }
    showLogin(msg);
  }

  async function signIn(token, client) {
    auth.token = token;
    auth.client = client || null;
    let body;
    try {
      body = await apiJson("/v1/review/runs");
    } catch (err) {
      if (err instanceof AuthLost) return false; // signOut showed "token refused"
      auth.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(err instanceof ApiError ? `the server answered ${err.message}` : `could not reach the server (${err.message})`);
      return false;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    if (auth.client) sessionStorage.setItem(CLIENT_KEY, auth.client);
    else sessionStorage.removeItem(CLIENT_KEY);
    ui.loginView.hidden = true;
    ui.loginError.hidden = true;
    ui.reviewView.hidden = false;
    showRuns(Array.isArray(body.runs) ? body.runs : []);
    flush(); // decisions queued before a 401 go out with the new token
    return true;
  }

  ui.login.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = ui.token.value.trim();
    const client = ui.client.value.trim();
    if (!token) return showLogin("enter the API token");
    // Header values must be Latin-1; anything else would make every fetch throw.
    if (/[^\x20-\x7e\xa0-\xff]/.test(client)) {
      return showLogin("your name: Latin letters, digits and punctuation only (it travels in an HTTP header)");
    }
    if (client.length > 256) return showLogin("your name: at most 256 characters");
    signIn(token, client);
  });

  ui.logout.addEventListener("click", () => signOut(""));

  // ------------------------------------------------------------------ runs

  function showRuns(runs) {
    state.runs = runs;
    ui.run.replaceChildren();
    if (!runs.length) {
      state.run = null;
      ui.run.disabled = true;
      ui.sheet.replaceChildren(el("p", "empty", "no runs configured: set review.runs in the app's args"));
      updateHeader();
      return;
    }
    ui.run.disabled = false;
    for (const r of runs) {
      const label = r.error
        ? `${r.name}: cannot be read (${r.error})`
        : `${r.name}: ${plural(r.groups, "group", "groups")}, ${plural(r.images, "image", "images")}`;
      const opt = el("option", null, label);
      opt.value = r.name;
      opt.disabled = Boolean(r.error);
      ui.run.append(opt);
    }
    const wanted = new URLSearchParams(location.hash.slice(1));
    const usable = runs.filter((r) => !r.error);
    const run = usable.find((r) => r.name === wanted.get("run")) || usable[0];
    if (!run) {
      state.run = null;
      ui.sheet.replaceChildren(el("p", "empty error", "no run can be read: see each run's error in the list"));
      updateHeader();
      return;
    }
    const offset = run.name === wanted.get("run") ? Number.parseInt(wanted.get("offset") || "0", 10) : 0;
    selectRun(run, Number.isFinite(offset) && offset > 0 ? offset : 0);
  }

  function selectRun(run, offset) {
    state.run = run;
    ui.run.value = run.name;
    state.total = run.groups;
    updateHeader();
    loadPage(offset);
  }

  ui.run.addEventListener("change", () => {
    const run = state.runs.find((r) => r.name === ui.run.value);
    if (run && !run.error) selectRun(run, 0);
  });

  function updateHeader() {
    const r = state.run;
    ui.ranker.textContent = r ? `ranker: ${r.ranker}` : "";
    ui.clipModel.textContent = r ? `CLIP: ${r.clip_model}` : "";
    ui.finished.textContent = r && r.finished ? `finished ${r.finished}` : "";
    ui.weights.hidden = !(r && r.random_weights);
    if (!r) {
      ui.pageInfo.textContent = "";
    } else if (!state.total) {
      ui.pageInfo.textContent = "no groups";
    } else {
      const last = Math.min(state.total, state.offset + state.pageSize);
      ui.pageInfo.textContent = `groups ${fmt.format(state.offset + 1)}–${fmt.format(last)} of ${fmt.format(state.total)}`;
    }
    ui.prev.disabled = !r || state.loading || state.offset <= 0;
    ui.next.disabled = !r || state.loading || state.offset + state.pageSize >= state.total;
  }

  // ------------------------------------------------------------------ pages

  async function loadPage(offset) {
    const run = state.run;
    if (!run) return;
    const gen = ++state.loadGen;
    state.loading = true;
    updateHeader();
    const q = new URLSearchParams({ offset: String(offset), limit: String(state.pageSize) });
    let body;
    try {
      body = await apiJson(`/v1/review/runs/${encodeURIComponent(run.name)}/groups?${q}`);
    } catch (err) {
      if (gen !== state.loadGen || err instanceof AuthLost) return;
      state.loading = false;
      updateHeader();
      note(`could not load the groups: ${err.message}`, true);
      return;
    }
    if (gen !== state.loadGen) return;
    state.loading = false;
    // The run may have been picked again since the list was read: the page's request_id rules.
    run.request_id = body.request_id || run.request_id;
    state.offset = body.offset;
    state.total = body.total;
    history.replaceState(null, "", `#${new URLSearchParams({ run: run.name, offset: String(body.offset) })}`);
    renderPage(body.groups || []);
    updateHeader();
  }

  function goPage(delta) {
    if (!state.run || state.loading) return;
    const offset = state.offset + delta * state.pageSize;
    if (offset < 0) return note("this is the first page");
    if (offset >= state.total) return note("this is the last page");
    loadPage(offset);
  }

  ui.prev.addEventListener("click", () => goPage(-1));
  ui.next.addEventListener("click", () => goPage(1));

  function leavePage() {
    const p = state.page;
    if (!p) return;
    state.page = null;
    p.abort.abort();
    if (p.observer) p.observer.disconnect();
    for (const url of p.urls) URL.revokeObjectURL(url);
    p.urls.clear();
  }

  function renderPage(groups) {
    leavePage();
    const page = newPage();
    state.page = page;
    state.tiles = [];
    state.groupStarts = [];
    state.tileByImage = new Map();
    state.focus = -1;
    const frag = document.createDocumentFragment();
    groups.forEach((g, gi) => {
      const section = el("section", "group");
      section.dataset.groupId = g.group_id;
      const head = el("div", "group-head");
      const first = g.images.find((im) => im.capture_time);
      head.append(
        el("span", null, `group ${fmt.format(state.offset + gi + 1)}`),
        el("span", null, plural(g.size, "photo", "photos")),
        el("span", null, first ? first.capture_time : "no capture time"),
        el("span", "gid", g.group_id),
      );
      const row = el("div", "tiles");
      state.groupStarts.push(state.tiles.length);
      for (const im of g.images) row.append(makeTile(im, g, gi, page));
      section.append(head, row);
      frag.append(section);
    });
    if (!groups.length) frag.append(el("p", "empty", "no groups on this page"));
    ui.sheet.replaceChildren(frag);
    window.scrollTo(0, 0);
    for (const t of state.tiles) page.observer.observe(t.el);
    if (state.tiles.length) setFocus(0);
  }

  function makeTile(im, g, gi, page) {
    const tile = el("div", "tile");
    tile.dataset.imageId = im.image_id;
    tile.dataset.groupId = g.group_id;
    tile.dataset.index = String(state.tiles.length);
    tile.tabIndex = -1;
    const tip = [`${im.file_name}`, `rating ${im.rating}${im.label ? `, label ${im.label}` : ""}`];
    if (im.capture_time) tip.push(`taken ${im.capture_time}`);
    if (im.duplicate_of) tip.push(`duplicate of ${im.duplicate_of}`);
    for (const r of im.reasons || []) tip.push(`- ${r}`);
    tile.title = tip.join("\n");
    const thumb = el("div", "thumb");
    thumb.append(el("span", "none", im.thumb ? "…" : "no thumbnail"));
    const meta = el("div", "meta");
    const decision = MODEL_DECISIONS.has(im.decision) ? im.decision : "";
    meta.append(el("span", `badge ${decision}`, im.decision), el("span", null, `#${im.rank}`));
    if (typeof im.score === "number") meta.append(el("span", null, im.score.toFixed(3)));
    if (g.keeper === im.image_id) {
      tile.classList.add("model-keeper");
      meta.append(el("span", "star", "★ keeper"));
    }
    if (im.duplicate_of) meta.append(el("span", "dup", "dup"));
    const mine = el("div", "mine");
    tile.append(thumb, el("div", "name", im.file_name), meta, mine);
    const t = { el: tile, thumb, mine, imageId: im.image_id, groupId: g.group_id, group: gi, url: im.thumb, alt: im.file_name };
    state.tiles.push(t);
    state.tileByImage.set(im.image_id, t);
    paint(t);
    return tile;
  }

  ui.sheet.addEventListener("click", (ev) => {
    const tile = ev.target instanceof Element ? ev.target.closest(".tile") : null;
    if (tile) setFocus(Number(tile.dataset.index));
  });

  // ------------------------------------------------------------------ thumbnails

  // Lazy: a tile's thumbnail is fetched when it nears the viewport, at most MAX_THUMB_FETCHES at
  // once; a tile scrolled past before its turn is dropped from the wait list.
  function newPage() {
    const page = { abort: new AbortController(), urls: new Set(), waiting: [], wanted: new Set(), active: 0, observer: null };
    page.observer = new IntersectionObserver(
      (entries) => {
        for (const e of entries) {
          const t = state.tiles[Number(e.target.dataset.index)];
          if (!t || !t.url || t.started) continue;
          if (e.isIntersecting) {
            if (!page.wanted.has(t)) {
              page.wanted.add(t);
              page.waiting.push(t);
            }
          } else {
            page.wanted.delete(t);
          }
        }
        pump(page);
      },
      { rootMargin: "600px 0px" },
    );
    return page;
  }

  function pump(page) {
    while (page.active < MAX_THUMB_FETCHES && page.waiting.length) {
      const t = page.waiting.shift();
      if (!page.wanted.delete(t)) continue;
      t.started = true;
      page.active += 1;
      page.observer.unobserve(t.el);
      loadThumb(page, t).finally(() => {
        page.active -= 1;
        if (state.page === page) pump(page);
      });
    }
  }

  async function loadThumb(page, t) {
    let res;
    try {
      res = await api(t.url, { signal: page.abort.signal });
      if (!res.ok) {
        const body = await readJson(res);
        return thumbMissing(t, res.status === 404 ? "thumbnail missing" : new ApiError(res.status, body).message);
      }
      const blob = await res.blob();
      if (state.page !== page) return;
      const url = URL.createObjectURL(blob);
      page.urls.add(url);
      const img = document.createElement("img");
      img.alt = t.alt;
      img.decoding = "async";
      img.addEventListener("error", () => thumbMissing(t, "thumbnail does not decode"), { once: true });
      img.src = url;
      t.thumb.replaceChildren(img);
    } catch (err) {
      if (err instanceof AuthLost || (err && err.name === "AbortError")) return;
      thumbMissing(t, `thumbnail failed: ${err.message}`);
    }
  }

  function thumbMissing(t, why) {
    if (state.page && state.tileByImage.get(t.imageId) === t) t.thumb.replaceChildren(el("span", "none", why));
  }

  // ------------------------------------------------------------------ focus and keys

  function setFocus(i) {
    if (!state.tiles.length) return;
    const idx = Math.max(0, Math.min(state.tiles.length - 1, i));
    const old = state.tiles[state.focus];
    if (old) {
      old.el.classList.remove("focus");
      old.el.tabIndex = -1;
    }
    state.focus = idx;
    const t = state.tiles[idx];
    t.el.classList.add("focus");
    t.el.tabIndex = 0;
    t.el.focus({ preventScroll: true });
    t.el.scrollIntoView({ block: "nearest" });
  }

  function moveGroup(delta) {
    const t = state.tiles[state.focus];
    if (!t) return;
    const g = t.group + delta;
    if (g < 0) return note("first group of this page: p for the previous page");
    if (g >= state.groupStarts.length) return note("last group of this page: n for the next page");
    setFocus(state.groupStarts[g]);
  }

  const typing = (target) =>
    target instanceof HTMLInputElement ||
    target instanceof HTMLTextAreaElement ||
    target instanceof HTMLSelectElement ||
    (target instanceof HTMLElement && target.isContentEditable);

  document.addEventListener("keydown", (ev) => {
    if (ui.reviewView.hidden || typing(ev.target) || ev.isComposing) return;
    const mod = ev.ctrlKey || ev.metaKey;
    if (mod && !ev.altKey && !ev.shiftKey && (ev.key === "z" || ev.key === "Z")) {
      ev.preventDefault();
      undo();
      return;
    }
    if (mod || ev.altKey) return;
    const handlers = {
      a: () => decide("accepted"),
      x: () => decide("rejected"),
      r: () => decide("rejected"),
      k: () => decide("picked-as-keeper"),
      u: () => undo(),
      ArrowRight: () => setFocus(state.focus + 1),
      ArrowLeft: () => setFocus(state.focus - 1),
      ArrowDown: () => moveGroup(1),
      ArrowUp: () => moveGroup(-1),
      n: () => goPage(1),
      PageDown: () => goPage(1),
      p: () => goPage(-1),
      PageUp: () => goPage(-1),
      "?": () => toggleHelp(),
      Escape: () => toggleHelp(false),
    };
    const fn = handlers[ev.key.length === 1 ? ev.key.toLowerCase() : ev.key];
    if (!fn) return;
    ev.preventDefault();
    fn();
  });

  function toggleHelp(show) {
    ui.help.hidden = show === undefined ? !ui.help.hidden : !show;
  }
  ui.helpToggle.addEventListener("click", () => toggleHelp());

  ui.actions.addEventListener("click", (ev) => {
    const b = ev.target instanceof Element ? ev.target.closest("button[data-action]") : null;
    if (!b) return;
    if (b.dataset.action === "undo") undo();
    else decide(b.dataset.action);
  });

  // ------------------------------------------------------------------ decisions

  function paint(t) {
    const run = state.run;
    const k = key(run.request_id, t.imageId);
    const action = state.decisions.get(k) || "";
    const cls = t.el.classList;
    cls.toggle("accepted", action === "accepted");
    cls.toggle("rejected", action === "rejected");
    cls.toggle("keeper", action === "picked-as-keeper");
    const unsaved = sender.unsaved.get(k);
    cls.toggle("unsaved", Boolean(unsaved));
    cls.toggle("pending", !unsaved && sender.pending.has(k));
    t.el.dataset.state = action;
    t.mine.textContent = action ? `you: ${MINE[action]}` : "";
    if (unsaved) t.mine.title = unsaved;
    else t.mine.removeAttribute("title");
  }

  function paintKey(requestId, imageId) {
    if (!state.run || state.run.request_id !== requestId) return;
    const t = state.tileByImage.get(imageId);
    if (t) paint(t);
  }

  function decide(action) {
    const t = state.tiles[state.focus];
    if (!t || !DECISIONS.has(action)) return;
    const requestId = state.run.request_id;
    const k = key(requestId, t.imageId);
    const gk = key(requestId, t.groupId);
    const step = { requestId, imageId: t.imageId, groupId: t.groupId, prev: state.decisions.get(k) || "", prevKeeper: state.keepers.get(gk) };
    if (action === "picked-as-keeper") {
      // One keeper a group: the old pick is taken back first (an `undone` for it), so the
      // server never holds two (keeper feedback-export refuses a group with several keepers).
      if (step.prevKeeper && step.prevKeeper !== t.imageId) {
        send({ event_id: uuid(), request_id: requestId, image_id: step.prevKeeper, action: "undone", group_id: t.groupId });
        step.replaced = step.prevKeeper;
        state.decisions.delete(key(requestId, step.prevKeeper));
      }
      state.keepers.set(gk, t.imageId);
    } else if (step.prevKeeper === t.imageId) {
      state.keepers.delete(gk);
    }
    state.decisions.set(k, action);
    step.entry = send({ event_id: uuid(), request_id: requestId, image_id: t.imageId, action, group_id: t.groupId });
    state.undo.push(step);
    paint(t);
    if (step.prevKeeper && step.prevKeeper !== t.imageId) paintKey(requestId, step.prevKeeper);
    if (state.focus < state.tiles.length - 1) setFocus(state.focus + 1);
    else note("last photo of this page: n for the next page");
  }

  function undo() {
    const step = state.undo.pop();
    if (!step) return note("nothing to undo");
    const { requestId, imageId, groupId } = step;
    // The undone goes out after the event it takes back (one request at a time, in order); an
    // event the server refused was never recorded, so there is nothing to take back.
    if (step.entry.status !== "refused") {
      send({ event_id: uuid(), request_id: requestId, image_id: imageId, action: "undone", group_id: groupId });
    }
    if (step.replaced) {
      // The keeper this step replaced is the group's keeper again.
      send({ event_id: uuid(), request_id: requestId, image_id: step.replaced, action: "picked-as-keeper", group_id: groupId });
    }
    const k = key(requestId, imageId);
    if (step.prev) state.decisions.set(k, step.prev);
    else state.decisions.delete(k);
    const gk = key(requestId, groupId);
    if (step.prevKeeper) {
      state.keepers.set(gk, step.prevKeeper);
      state.decisions.set(key(requestId, step.prevKeeper), "picked-as-keeper");
      paintKey(requestId, step.prevKeeper);
    } else {
      state.keepers.delete(gk);
    }
    paintKey(requestId, imageId);
    const t = state.run && state.run.request_id === requestId ? state.tileByImage.get(imageId) : null;
    if (t) setFocus(Number(t.el.dataset.index));
    note(`undone: ${t ? t.alt : imageId}`);
  }

  // ------------------------------------------------------------------ sending

  function send(event) {
    const entry = { event, key: key(event.request_id, event.image_id), status: "queued" };
    sender.queue.push(entry);
    const list = sender.pending.get(entry.key) || [];
    list.push(entry);
    sender.pending.set(entry.key, list);
    flush();
    renderStatus();
    return entry;
  }

  // Entry no longer queued nor in flight.
  function settle(entry) {
    const list = (sender.pending.get(entry.key) || []).filter((e) => e !== entry);
    if (list.length) sender.pending.set(entry.key, list);
    else sender.pending.delete(entry.key);
  }

  function repaint(entries) {
    for (const e of entries) paintKey(e.event.request_id, e.event.image_id);
    renderStatus();
  }

  async function flush() {
    if (sender.inflight || sender.retryTimer || !sender.queue.length || !auth.token) return;
    const batch = sender.queue.splice(0, sender.batchLimit);
    sender.inflight = batch;
    for (const e of batch) e.status = "sending";
    renderStatus();
    let res = null;
    let body = null;
    try {
      res = await api("/v1/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ events: batch.map((e) => e.event), sync: true }),
      });
      body = await readJson(res);
    } catch (err) {
      sender.inflight = null;
      requeue(batch);
      if (err instanceof AuthLost) return repaint(batch); // resent after the next sign-in
      return retryLater(batch, `could not reach the server (${err.message})`, null);
    }
    sender.inflight = null;
    if (res.ok && body && body.durable === true) {
      sender.failures = 0;
      sender.retryError = "";
      for (const e of batch) {
        e.status = "saved";
        settle(e);
        sender.unsaved.delete(e.key);
        if (e.event.action === "undone") sender.undone += 1;
        else sender.saved += 1;
      }
      if (!sender.queue.length) sender.batchLimit = MAX_BATCH;
      repaint(batch);
      flush();
      return;
    }
    if (res.ok) {
      // Taken but not written: storage is failing. Resend until an answer says durable.
      requeue(batch);
      return retryLater(batch, `the server could not write them yet (${(body && body.last_error) || "no reason given"})`, res);
    }
    if (res.status === 503 || res.status === 429 || res.status === 408 || res.status >= 500) {
      requeue(batch);
      const why = res.status === 503 ? "storage is failing" : `the server answered ${res.status}`;
      return retryLater(batch, `${why}: ${new ApiError(res.status, body).message}`, res);
    }
    if (batch.length > 1) {
      // A refused batch: resend one by one, so only the bad event is refused.
      requeue(batch);
      sender.batchLimit = 1;
      flush();
      return;
    }
    const why = `the server refused a decision: ${new ApiError(res.status, body).message}`;
    for (const e of batch) {
      e.status = "refused";
      settle(e);
      sender.unsaved.set(e.key, why);
    }
    sender.refused += batch.length;
    sender.refusedError = why;
    repaint(batch);
    flush();
  }

  function requeue(batch) {
    for (const e of batch) e.status = "queued";
    sender.queue.unshift(...batch);
  }

  function retryLater(batch, why, res) {
    sender.failures += 1;
    const backoff = Math.min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (sender.failures - 1));
    const s = Math.min(RETRY_MAX_S, retryAfterS(res) || backoff);
    sender.retryError = why;
    for (const e of sender.queue) sender.unsaved.set(e.key, `not saved yet: ${why}`);
    sender.retryAt = Date.now() + s * 1000;
    sender.retryTimer = setTimeout(() => {
      sender.retryTimer = 0;
      flush();
    }, s * 1000);
    for (const e of sender.queue) paintKey(e.event.request_id, e.event.image_id);
    repaint(batch);
  }

  // ------------------------------------------------------------------ status line

  function note(text, bad) {
    state.note = text;
    state.noteBad = Boolean(bad);
    clearTimeout(state.noteTimer);
    state.noteTimer = setTimeout(() => {
      state.note = "";
      renderStatus();
    }, NOTE_MS);
    renderStatus();
  }

  function renderStatus() {
    const parts = [`${plural(sender.saved, "decision", "decisions")} saved`];
    if (sender.undone) parts.push(`${fmt.format(sender.undone)} undone`);
    const waiting = sender.queue.length + (sender.inflight ? sender.inflight.length : 0);
    let bad = state.noteBad && Boolean(state.note);
    if (sender.retryTimer && waiting) {
      const s = Math.max(0, Math.round((sender.retryAt - Date.now()) / 1000));
      parts.push(`${plural(waiting, "decision", "decisions")} NOT SAVED yet: ${sender.retryError}; retrying in ${s} s`);
      bad = true;
    } else if (waiting) {
      parts.push(`${fmt.format(waiting)} saving…`);
    }
    if (!auth.token && waiting) parts.push("sign in again to send them");
    if (sender.refused) {
      parts.push(`${plural(sender.refused, "decision", "decisions")} NOT SAVED (${sender.refusedError})`);
      bad = true;
    }
    if (state.note) parts.push(state.note);
    ui.status.textContent = parts.join(" · ");
    ui.status.classList.toggle("bad", bad);
  }

  // Refresh the retry countdown while waiting.
  setInterval(() => {
    if (sender.retryTimer) renderStatus();
  }, 1000);

  window.addEventListener("beforeunload", (ev) => {
    if (sender.queue.length || sender.inflight) {
      ev.preventDefault();
      ev.returnValue = "";
    }
  });
  window.addEventListener("pagehide", () => leavePage());

  // ------------------------------------------------------------------ start

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved, sessionStorage.getItem(CLIENT_KEY) || "");
  else showLogin("");
})();
