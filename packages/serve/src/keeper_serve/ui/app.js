// keeper review page: triage the groups of `keeper pick` runs with the keyboard, or (query mode)
// one /v1/select answer over the server's corpus: /v1/search finds the candidates by the query's
// text, /v1/select ranks them, and the sheet shows them as one group named by the query.
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
  const QUERY = "#query"; // the run list's query-mode entry: never a run name ([A-Za-z0-9]...)
  const QUERY_K = 32; // candidates /v1/search finds by default
  const QUERY_MAX_K = 64;
  const QUERY_TOP_K = 10; // the picks /v1/select is asked for
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
    queryForm: $("query-form"),
    query: $("query"),
    queryK: $("query-k"),
    queryGo: $("query-go"),
    stages: $("stages"),
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
    mode: "runs", // or "query"
    select: { ok: false, why: "" }, // whether query mode can be used, and why not
    // What the sheet shows: the selected run's entry of /v1/review/runs, or in query mode
    // {query, request_id, answer, count} of the shown /v1/select answer. Decisions key on its
    // request_id.
    run: null,
    lastQuery: null, // the latest answer's {run, ids, hits}: back to query mode shows it again
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
    noteSticky: false,
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

  // Unicode's bidirectional controls shown as <U+202E>: a file named "IMG_\u202egpj.exe" would
  // otherwise read "IMG_exe.jpg" (keeper_core.htmltext does the same on keeper's HTML pages).
  const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

  function shown(text) {
    return String(text).replace(
      BIDI_CONTROLS,
      (c) => `<U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}>`,
    );
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = shown(text);
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
    ui.loginError.textContent = message ? shown(message) : "";
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
      state.lastQuery = null;
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
    showRuns(Array.isArray(body.runs) ? body.runs : [], body.select);
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

  // Query mode needs a corpus (/v1/select by ids, thumbnails) and a search index (the candidates).
  function queryMode(select) {
    if (!select) return { ok: false, why: "this server does not offer query mode" };
    const missing = [];
    if (select.corpus_images === null || select.corpus_images === undefined) missing.push("args.corpus");
    if (!select.search) missing.push("args.search");
    if (missing.length) return { ok: false, why: `query mode needs ${missing.join(" and ")}` };
    return { ok: true, why: "", images: select.corpus_images };
  }

  function showRuns(runs, select) {
    state.runs = runs;
    state.select = queryMode(select);
    ui.run.replaceChildren();
    for (const r of runs) {
      const label = r.error
        ? `${r.name}: cannot be read (${r.error})`
        : `${r.name}: ${plural(r.groups, "group", "groups")}, ${plural(r.images, "image", "images")}`;
      const opt = el("option", null, label);
      opt.value = r.name;
      opt.disabled = Boolean(r.error);
      ui.run.append(opt);
    }
    const q = state.select;
    const qopt = el("option", null, q.ok ? `query the corpus… (${plural(q.images, "image", "images")})` : `query the corpus: ${q.why}`);
    qopt.value = QUERY;
    qopt.disabled = !q.ok;
    ui.run.append(qopt);
    ui.run.disabled = !runs.length && !q.ok;
    const wanted = new URLSearchParams(location.hash.slice(1));
    if (wanted.get("mode") === "query" && q.ok) return enterQuery(wanted.get("q") || "", wanted.get("k"));
    setMode("runs");
    if (wanted.get("mode") === "query") note(q.why, true, true);
    if (!runs.length) {
      if (q.ok) return enterQuery("", null);
      showEmpty("empty", `no runs configured: set review.runs in the app's args (${q.why})`);
      return;
    }
    const usable = runs.filter((r) => !r.error);
    const run = usable.find((r) => r.name === wanted.get("run")) || usable[0];
    if (!run) {
      showEmpty("empty error", "no run can be read: see each run's error in the list");
      return;
    }
    const offset = run.name === wanted.get("run") ? Number.parseInt(wanted.get("offset") || "0", 10) : 0;
    selectRun(run, Number.isFinite(offset) && offset > 0 ? offset : 0);
  }

  // Nothing to triage: no tiles, so no key decides anything.
  function showEmpty(cls, message) {
    state.loadGen += 1;
    state.loading = false;
    state.run = null;
    renderPage([], message, cls);
    updateHeader();
  }

  function selectRun(run, offset) {
    setMode("runs");
    state.run = run;
    ui.run.value = run.name;
    state.total = run.groups;
    updateHeader();
    loadPage(offset);
  }

  ui.run.addEventListener("change", () => {
    if (ui.run.value === QUERY) {
      if (state.select.ok) enterQuery(ui.query.value.trim(), ui.queryK.value, state.lastQuery);
      return;
    }
    const run = state.runs.find((r) => r.name === ui.run.value);
    if (run && !run.error) selectRun(run, 0);
  });

  function setMode(mode) {
    if (state.mode !== mode) {
      // The other mode's tiles go at once: a key must never decide on them under this mode's id.
      state.loadGen += 1;
      state.loading = false;
      state.run = null;
      renderPage([], "");
      if (state.noteSticky) note("");
    }
    state.mode = mode;
    ui.queryForm.hidden = mode !== "query";
    ui.prev.hidden = mode === "query"; // one sheet: paging does not apply
    ui.next.hidden = mode === "query";
  }

  function stagesText(stages) {
    return (stages || [])
      .filter((st) => !st.skipped)
      .map((st) => `${st.name} ${fmt.format(st.n_in)}→${fmt.format(st.n_kept)}`)
      .join(" · ");
  }

  function updateHeader() {
    if (state.mode === "query") return updateQueryHeader();
    ui.stages.textContent = "";
    const r = state.run;
    ui.ranker.textContent = r ? shown(`ranker: ${r.ranker}`) : "";
    ui.clipModel.textContent = r ? shown(`CLIP: ${r.clip_model}`) : "";
    ui.finished.textContent = r && r.finished ? shown(`finished ${r.finished}`) : "";
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

  // ------------------------------------------------------------------ query mode

  function clampK(raw) {
    const n = Number.parseInt(String(raw ?? ""), 10);
    return Number.isFinite(n) ? Math.min(QUERY_MAX_K, Math.max(1, n)) : QUERY_K;
  }

  // The hash keeps the mode and the query, so a reload returns to them (never the token).
  function queryHash(query, k) {
    const h = new URLSearchParams({ mode: "query" });
    if (query) h.set("q", query);
    if (k !== QUERY_K) h.set("k", String(k));
    history.replaceState(null, "", `#${h}`);
  }

  // `last`: the answer shown before, shown again as it was (its request_id, so its decisions).
  function enterQuery(query, k, last) {
    setMode("query");
    ui.run.value = QUERY;
    ui.query.value = query;
    ui.queryK.value = String(clampK(k));
    if (last && last.run.query === query) {
      ui.queryK.value = String(last.run.k);
      queryHash(query, last.run.k);
      state.run = last.run;
      renderPage([queryGroup(query, last.run.answer, last.ids, last.hits)], "");
      updateHeader();
      return;
    }
    if (query) return runQuery(query, clampK(k));
    queryHash("", clampK(k));
    showEmpty("empty", "type what you are looking for and press Enter: /v1/search finds the candidates, /v1/select ranks them");
    ui.query.focus();
  }

  function updateQueryHeader() {
    const r = state.run;
    const a = r && r.answer;
    const models = (a && a.models) || {};
    ui.ranker.textContent = "";
    ui.clipModel.textContent = models.clip_model ? shown(`CLIP: ${models.clip_model}`) : "";
    ui.finished.textContent = "";
    ui.stages.textContent = a ? shown(stagesText(a.stages)) : "";
    ui.weights.hidden = !(models.clip_random_weights || (models.vlm && models.vlm.random_weights));
    ui.pageInfo.textContent = r ? plural(r.count, "candidate", "candidates") : state.loading ? "searching…" : "";
    ui.queryGo.disabled = state.loading;
  }

  // An error of /v1/search or /v1/select in plain words.
  function queryError(what, err) {
    if (!(err instanceof ApiError)) return `${what} failed: could not reach the server (${err.message})`;
    const why = {
      unknown_id: "the search index and the corpus differ: the index found an image args.corpus does not hold (build the index from the corpus table)",
      no_corpus: "this server has no corpus (args.corpus)",
      search_not_configured: "this server has no search index (args.search)",
      k_out_of_range: "too many candidates for this server (search.max_k): lower the number",
      over_limit: "more picks than this server allows (select.max_top_k)",
      too_many_images: "more candidates than this server takes in one /v1/select",
    }[err.code];
    if (why) return `${what} failed: ${why}. (${err.message})`;
    if (err.status === 503) return `${what} is not available right now: ${err.message}. Try again in a few seconds`;
    return `${what} failed: the server answered ${err.status} (${err.message})`;
  }

  async function runQuery(query, k) {
    const gen = ++state.loadGen;
    state.loading = true;
    state.run = null;
    queryHash(query, k);
    renderPage([], `searching for “${query}”…`);
    note("");
    updateHeader();
    const post = (body) => ({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const fail = (what, err) => {
      if (gen !== state.loadGen || err instanceof AuthLost) return;
      state.loading = false;
      const message = queryError(what, err);
      renderPage([], message, "empty error");
      updateHeader();
      note(message, true, true);
    };
    let found;
    try {
      found = await apiJson("/v1/search", post({ text: query, k }));
    } catch (err) {
      return fail("the search", err);
    }
    if (gen !== state.loadGen) return;
    const uris = new Map(); // image_id -> its first result (byte-identical copies share an id)
    for (const hit of found.results || []) if (!uris.has(hit.image_id)) uris.set(hit.image_id, hit);
    const ids = [...uris.keys()];
    if (!ids.length) {
      state.loading = false;
      renderPage([], "the search found nothing in the index");
      updateHeader();
      return;
    }
    let answer;
    try {
      answer = await apiJson(
        "/v1/select",
        post({ positive: [query], ids, candidates: "all", top_k: Math.min(QUERY_TOP_K, ids.length) }),
      );
    } catch (err) {
      return fail("the selection", err);
    }
    if (gen !== state.loadGen) return;
    state.loading = false;
    // The server logged this answer's offers under group_id = the query (vlm_query, or the first
    // positive prompt), so the decisions name the same group.
    state.run = { query, k, request_id: answer.request_id, answer, count: ids.length };
    state.lastQuery = { run: state.run, ids, hits: uris };
    renderPage([queryGroup(query, answer, ids, uris)], "");
    updateHeader();
  }

  const SCORES = ["final", "rerank", "clip"]; // the latest score a candidate got, as its offer row

  function latestScore(c) {
    for (const name of SCORES) if (typeof c[name] === "number") return { name, value: c[name] };
    return null;
  }

  // The picks first, in pick order; then the rest as the offers log ranks them: the later the
  // stage that dropped them, the sooner; then by their latest score.
  function queryGroup(query, answer, ids, hits) {
    const stages = (answer.stages || []).map((st) => st.name);
    const depth = (c) => (c.dropped_at === null || c.dropped_at === undefined ? stages.length : stages.indexOf(c.dropped_at));
    const byIndex = new Map((answer.candidates || []).map((c) => [c.index, c]));
    const picks = (answer.picks || []).filter((i) => byIndex.has(i));
    const chosen = new Set(picks);
    const rest = [...byIndex.values()]
      .filter((c) => !chosen.has(c.index))
      .sort((x, y) => {
        const sx = latestScore(x);
        const sy = latestScore(y);
        return depth(y) - depth(x) || (sy ? sy.value : -Infinity) - (sx ? sx.value : -Infinity) || x.index - y.index;
      });
    const order = [...picks.map((i) => byIndex.get(i)), ...rest];
    const tiles = order.map((c) => {
      const id = ids[c.index];
      const hit = hits.get(id) || {};
      const uri = hit.image_uri || "";
      const name = uri ? uri.slice(uri.lastIndexOf("/") + 1) || uri : id.slice(0, 12);
      const pick = picks.indexOf(c.index);
      const score = latestScore(c);
      const tip = [name, uri || `image ${id}`];
      if (typeof hit.score === "number") tip.push(`search cosine ${hit.score.toFixed(3)}`);
      const all = [["clip", "clip"], ["head", "aesthetic"], ["rerank", "rerank"], ["vlm", "vlm"], ["final", "final"]];
      tip.push(all.map(([f, label]) => `${label} ${typeof c[f] === "number" ? c[f].toFixed(3) : "–"}`).join(", "));
      tip.push(pick >= 0 ? `pick ${pick + 1} of ${picks.length}` : `dropped at ${c.dropped_at}: ${c.reason}`);
      const meta = [
        pick >= 0
          ? el("span", "badge keep", `pick ${pick + 1}`)
          : el("span", `badge ${c.dropped_at === "top_k" ? "alternate" : "reject"}`, `out: ${c.dropped_at}`),
      ];
      if (score) {
        const span = el("span", null, score.value.toFixed(3));
        span.title = shown(score.name);
        meta.push(span);
      }
      if (pick === 0) meta.push(el("span", "star", "★ keeper"));
      return {
        imageId: id,
        name,
        title: tip.join("\n"),
        url: `/v1/review/corpus/thumbs/${encodeURIComponent(id)}`,
        meta,
        keeper: pick === 0,
      };
    });
    return {
      id: query,
      head: [
        el("span", null, "query"),
        el("span", "gid", query),
        el("span", null, plural(tiles.length, "candidate", "candidates")),
        el("span", null, plural(picks.length, "pick", "picks")),
        el("span", "gid", `request ${answer.request_id}`),
      ],
      tiles,
    };
  }

  ui.queryForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const query = ui.query.value.trim();
    if (!query) return note("type a query first", true);
    const k = clampK(ui.queryK.value);
    ui.queryK.value = String(k);
    runQuery(query, k);
  });

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
    renderPage(runGroups(body.groups || []), "no groups on this page");
    updateHeader();
  }

  function goPage(delta) {
    if (state.mode === "query") return note("query mode shows one sheet: no pages");
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

  // The sheet, from either mode: groups of {id, head: [nodes], tiles: [{imageId, name, title,
  // url, meta: [nodes], keeper}]}; `empty` is shown when there are none.
  function renderPage(groups, empty, emptyCls) {
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
      section.dataset.groupId = g.id;
      const head = el("div", "group-head");
      head.append(...g.head);
      const row = el("div", "tiles");
      state.groupStarts.push(state.tiles.length);
      for (const d of g.tiles) row.append(makeTile(d, g.id, gi));
      section.append(head, row);
      frag.append(section);
    });
    if (!groups.length) frag.append(el("p", emptyCls || "empty", empty));
    ui.sheet.replaceChildren(frag);
    // The answer the decisions refer to, for whoever reads the page (tests, extensions).
    if (state.run) ui.sheet.dataset.requestId = state.run.request_id;
    else delete ui.sheet.dataset.requestId;
    window.scrollTo(0, 0);
    for (const t of state.tiles) page.observer.observe(t.el);
    if (state.tiles.length) setFocus(0);
  }

  function runGroups(groups) {
    return groups.map((g, gi) => {
      const first = g.images.find((im) => im.capture_time);
      return {
        id: g.group_id,
        head: [
          el("span", null, `group ${fmt.format(state.offset + gi + 1)}`),
          el("span", null, plural(g.size, "photo", "photos")),
          el("span", null, first ? first.capture_time : "no capture time"),
          el("span", "gid", g.group_id),
        ],
        tiles: g.images.map((im) => runTile(im, g)),
      };
    });
  }

  function runTile(im, g) {
    const tip = [`${im.file_name}`, `rating ${im.rating}${im.label ? `, label ${im.label}` : ""}`];
    if (im.capture_time) tip.push(`taken ${im.capture_time}`);
    if (im.duplicate_of) tip.push(`duplicate of ${im.duplicate_of}`);
    for (const r of im.reasons || []) tip.push(`- ${r}`);
    const decision = MODEL_DECISIONS.has(im.decision) ? im.decision : "";
    const meta = [el("span", `badge ${decision}`, im.decision), el("span", null, `#${im.rank}`)];
    if (typeof im.score === "number") meta.push(el("span", null, im.score.toFixed(3)));
    const keeper = g.keeper === im.image_id;
    if (keeper) meta.push(el("span", "star", "★ keeper"));
    if (im.duplicate_of) meta.push(el("span", "dup", "dup"));
    return { imageId: im.image_id, name: im.file_name, title: tip.join("\n"), url: im.thumb, meta, keeper };
  }

  function makeTile(d, groupId, gi) {
    const tile = el("div", "tile");
    tile.dataset.imageId = d.imageId;
    tile.dataset.groupId = groupId;
    tile.dataset.index = String(state.tiles.length);
    tile.tabIndex = -1;
    tile.title = shown(d.title);
    const thumb = el("div", "thumb");
    thumb.append(el("span", "none", d.url ? "…" : "no thumbnail"));
    const meta = el("div", "meta");
    meta.append(...d.meta);
    if (d.keeper) tile.classList.add("model-keeper");
    const mine = el("div", "mine");
    tile.append(thumb, el("div", "name", d.name), meta, mine);
    const t = { el: tile, thumb, mine, imageId: d.imageId, groupId, group: gi, url: d.url, alt: d.name };
    state.tiles.push(t);
    state.tileByImage.set(d.imageId, t);
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
      img.alt = shown(t.alt);
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
    const q = state.mode === "query";
    if (g < 0) return note(q ? "the query's answer is one group" : "first group of this page: p for the previous page");
    if (g >= state.groupStarts.length) return note(q ? "the query's answer is one group" : "last group of this page: n for the next page");
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
    if (unsaved) t.mine.title = shown(unsaved);
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
    else note(state.mode === "query" ? "last candidate of this answer" : "last photo of this page: n for the next page");
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

  // A sticky note (a failed query) stays until the next note or mode.
  function note(text, bad, sticky) {
    state.note = text ? shown(text) : text; // an error may quote a file's name
    state.noteBad = Boolean(bad);
    state.noteSticky = Boolean(sticky && text);
    clearTimeout(state.noteTimer);
    if (!state.noteSticky) {
      state.noteTimer = setTimeout(() => {
        state.note = "";
        renderStatus();
      }, NOTE_MS);
    }
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
    ui.status.textContent = shown(parts.join(" · ")); // errors may quote file names
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
