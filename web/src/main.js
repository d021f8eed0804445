// The rulewright editor: album, regions, copy / paste / context, matches and search, rewrite with
// progress, versions and aliases, dissection and ablation, edit specs as JSON (docs/web-api.md).
import "./style.css";
import { api, ApiError, enc, withToken } from "./api.js";
import * as M from "./mask.js";
import { curveOf, curveText, drawCurve, strengthAtX } from "./curve.js";
import { showViewStrength, wireViewStrength } from "./strength.js";

const ALBUM_SCALE = 2;      // album tiles: image pixels → CSS pixels
const STAGE_SCALE = 6;      // the work image
const SEARCH_SPAN = 4;      // Search looks at this many album pages from the start seed

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const state = {
  models: [],
  model: null,            // {name, arch, latest_version, resolution, aliases}
  versions: [],           // from GET .../versions
  aliases: [],
  defaultAlias: "production",   // the server's default alias (GET /api/models), the version opened first
  version: null,          // number being edited
  layers: [],
  defaultLayer: null,
  R: 64,
  albumStart: 0,
  albumSize: 24,
  showOriginal: false,
  searchOrder: null,      // [{seed, score, above, map_url}] when Search reordered the album
  matches: null,          // seed → {score, above, map_url} for the context-match overlay
  work: null,             // seed of the image worked on
  selections: new Map(),  // seed → {box} | {mask}
  copy: null,             // {seed, box|mask}
  paste: [],              // [{seed, dx, dy, exact?}] the copy moved by (dx, dy) onto seed
  context: [],            // [{seed, box|mask}]
  tool: "brush",
  specExtras: {},         // fields of a loaded spec the page has no control for (kept as they are)
  found: null,            // targets found by the last rewrite's search (spec "found"); null: search anew
  ablation: null,         // {layer, units: [..]}
  dissect: null,          // {layer, seed, units}
  job: null,              // {id, source, cancelUrl} of the rewrite job running
  rewriting: null,        // {cancelled} while a rewrite (draft, then final) runs
  curve: null,            // the shown version's strength curve (metrics.strength_curve)
  viewStrength: null,     // the album and work image draw the version's own edit at this strength (null: its own)
};

// ---- messages ---------------------------------------------------------------------------------

let messageTimer = null;

function say(text, kind = "info") {
  const box = $("message");
  box.hidden = false;
  box.className = `message ${kind}`;
  box.dataset.kind = kind;
  box.replaceChildren();
  const lines = Array.isArray(text) ? text : [text];
  box.append(el("strong", { text: lines[0] }));
  if (lines.length > 1) box.append(el("ul", {}, ...lines.slice(1).map((l) => el("li", { text: l }))));
  box.append(el("button", { class: "close", title: "Dismiss", "data-testid": "message-close", onclick: () => (box.hidden = true) }, "×"));
  clearTimeout(messageTimer);
  if (kind === "ok") messageTimer = setTimeout(() => (box.hidden = true), 8000);
}

function errorLines(exc, doing) {
  if (exc instanceof ApiError) {
    const lines = [`${doing} failed: ${exc.code}: ${exc.message}`];
    for (const v of exc.fieldViolations) lines.push(`${v.field}: ${v.description}`);
    return lines;
  }
  return [`${doing} failed: ${exc && exc.message ? exc.message : exc}`];
}

/** Run an async UI action: errors go to the message area, a deleted version refreshes the list. */
async function act(doing, fn) {
  try {
    return await fn();
  } catch (exc) {
    console.error(exc);
    const lines = errorLines(exc, doing);
    if (exc instanceof ApiError && exc.status === 404 && state.model) {
      const before = state.version;
      await loadVersions().catch(() => {});
      if (!state.versions.some((v) => v.number === before)) {
        lines.push(`Version ${before} of ${state.model.name} no longer exists; now showing version ${state.version}.`);
        await selectVersion(state.version).catch(() => {});
      }
    }
    say(lines, "error");
    return undefined;
  }
}

// ---- URLs -------------------------------------------------------------------------------------

function modelPath() {
  return `/api/models/${enc(state.model.name)}`;
}

function imageUrl(seed, version = state.version, ablate = true) {
  let url = `${modelPath()}/versions/${version}/images/${seed}.png`;
  const query = [];
  if (ablate && state.ablation && state.ablation.units.length) {
    query.push(`layer=${enc(state.ablation.layer)}`, `ablate=${state.ablation.units.join(",")}`);
  }
  if (ablate && state.viewStrength !== null && version === state.version) query.push(`strength=${state.viewStrength}`);
  if (query.length) url += `?${query.join("&")}`;
  return withToken(url);
}

function currentVersion() {
  return state.versions.find((v) => v.number === state.version) || null;
}

function shownVersion() {
  const v = currentVersion();
  if (state.showOriginal && v && v.parent) return v.parent;
  return state.version;
}

// ---- image pixels (for previews and thumbnails) ------------------------------------------------

const pixelCache = new Map();

function imagePixels(url) {
  if (!pixelCache.has(url)) {
    pixelCache.set(url, new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const c = document.createElement("canvas");
        c.width = img.naturalWidth;
        c.height = img.naturalHeight;
        const ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0);
        resolve(ctx.getImageData(0, 0, c.width, c.height));
      };
      let tries = 0;
      img.onerror = () => {
        if (tries < 3) {
          tries += 1;
          setTimeout(() => (img.src = `${url}${url.includes("?") ? "&" : "?"}retry=${tries}`), 400 * tries);
          return;
        }
        pixelCache.delete(url);
        reject(new Error(`could not load ${url}`));
      };
      img.src = url;
    }));
  }
  return pixelCache.get(url);
}

// Thumbnails of a long tray (found targets) load once the tray is open and they scroll into its
// view, not all at once: each is a render on the server.
let lazyThumbs = null;

function watchLazyThumbs() {
  if (lazyThumbs) lazyThumbs.disconnect();
  lazyThumbs = null;
  if (!$("found-block").open) return;
  lazyThumbs = new IntersectionObserver((entries) => {
    for (const e of entries) {
      if (!e.isIntersecting || !e.target.dataset.pending) continue;
      lazyThumbs.unobserve(e.target);
      e.target.loadThumb();
    }
  }, { root: $("found-tray"), rootMargin: "48px" });
  for (const c of $("found-tray").querySelectorAll(".thumb[data-pending]")) lazyThumbs.observe(c);
}

/** A small canvas: the seed's image with the region tinted (trays); ``lazy``: drawn once seen. */
function regionThumb(region, color, testid, lazy = false) {
  const c = el("canvas", { width: state.R, height: state.R, class: "thumb", "data-testid": testid });
  c.loadThumb = () => drawThumb(c, region, color);
  if (lazy) c.dataset.pending = "true";
  else c.loadThumb();
  return c;
}

/** A thumbnail <img> whose image is requested once the tray shows it (watchLazyThumbs). */
function lazyImage(url, alt, testid) {
  const img = el("img", { class: "thumb", alt, "data-testid": testid, "data-pending": "true" });
  img.onload = () => (img.dataset.loaded = "true");
  img.onerror = () => img.classList.add("broken");
  img.loadThumb = () => {
    delete img.dataset.pending;
    img.src = url;
  };
  return img;
}

function drawThumb(c, region, color) {
  const r = state.R;
  delete c.dataset.pending;
  imagePixels(imageUrl(region.seed, state.version, false)).then((pix) => {
    const ctx = c.getContext("2d");
    const out = new ImageData(new Uint8ClampedArray(pix.data), r, r);
    const alpha = M.regionAlpha(region, r);
    for (let i = 0; i < r * r; i++) {
      const a = (alpha[i] / 255) * 0.55;
      for (let k = 0; k < 3; k++) out.data[4 * i + k] = out.data[4 * i + k] * (1 - a) + color[k] * a;
    }
    ctx.putImageData(out, 0, 0);
    c.dataset.loaded = "true";
  }).catch(() => c.classList.add("broken"));
  return c;
}

// ---- models, versions, layers -------------------------------------------------------------------

async function loadModels() {
  const data = await api("GET", "/api/models");
  state.models = data.models || [];
  state.defaultAlias = data.default_alias || "production";   // what the bare model name means on this server
  $("alias-name").value = state.defaultAlias;
  const sel = $("model-select");
  sel.replaceChildren(...state.models.map((m) => el("option", { value: m.name, text: `${m.name} (${m.arch}, ${m.resolution}px)` })));
  if (!state.models.length) {
    say("The registry holds no models yet.", "error");
    return;
  }
  const wanted = new URLSearchParams(location.search).get("model");
  await selectModel(state.models.some((m) => m.name === wanted) ? wanted : state.models[0].name);
}

async function selectModel(name) {
  state.model = state.models.find((m) => m.name === name);
  $("model-select").value = name;
  state.R = state.model.resolution || 64;
  clearEdit();
  state.version = null;
  await loadVersions();
  await selectVersion(state.version);
}

async function loadVersions() {
  const data = await api("GET", `${modelPath()}/versions`);
  state.versions = (data.versions || []).slice().sort((a, b) => a.number - b.number);
  state.aliases = data.aliases || [];
  if (!state.versions.some((v) => v.number === state.version)) {
    const prod = state.aliases.find((a) => a.alias === state.defaultAlias);
    const fallback = prod && state.versions.some((v) => v.number === prod.version) ? prod.version : null;
    state.version = fallback ?? (state.versions.length ? state.versions[state.versions.length - 1].number : null);
  }
  renderVersionSelect();
  renderVersions();
}

async function selectVersion(n) {
  if (n === null || n === undefined) return;
  state.version = n;
  state.showOriginal = false;
  state.matches = null;
  state.searchOrder = null;
  $("toggle-matches").checked = false;
  $("version-select").value = String(n);
  setCurve(curveOf((currentVersion() || {}).metrics));
  const data = await api("GET", `${modelPath()}/versions/${n}/layers`);
  state.layers = data.layers || [];
  state.defaultLayer = data.default_layer;
  state.R = data.image_resolution || state.R;
  const sel = $("layer-select");
  const keep = sel.value;
  sel.replaceChildren(...state.layers.map((l) => el("option", {
    value: l.name, text: `${l.name} (${l.resolution}×${l.resolution}${Array.isArray(l.value_shape) ? `→${l.value_shape[1]}×${l.value_shape[2]}` : ""}, ${l.in_channels}→${l.out_channels} ch)`,
  })));
  sel.value = state.layers.some((l) => l.name === keep) ? keep : state.defaultLayer;
  updateRankLimit();
  state.viewStrength = null;
  showViewStrength(currentVersion());
  renderVersionSelect();
  renderVersions();
  renderAlbum();
  renderWork();
  renderTrays();
}

function updateRankLimit() {
  const layer = state.layers.find((l) => l.name === $("layer-select").value);
  if (layer) $("rank-input").max = String(layer.in_channels);
}

function aliasesOf(n) {
  return state.aliases.filter((a) => a.version === n).map((a) => a.alias);
}

function renderVersionSelect() {
  const sel = $("version-select");
  sel.replaceChildren(...state.versions.map((v) => {
    const names = aliasesOf(v.number);
    return el("option", { value: String(v.number), text: `v${v.number}${names.length ? ` (${names.join(", ")})` : ""}` });
  }));
  if (state.version !== null) sel.value = String(state.version);
  const v = currentVersion();
  $("version-info").textContent = v ? `${v.kind || ""}${v.parent ? ` from v${v.parent}` : ""} by ${v.author || "?"}` : "";
}

function specSummary(spec) {
  if (!spec || typeof spec !== "object") return "";
  if (!spec.layer && spec.source) return `imported from ${spec.source}`;
  const parts = [`${spec.op || "rewrite"} ${spec.layer || ""}`];
  if (spec.rank) parts.push(`rank ${spec.rank}`);
  if (spec.steps) parts.push(`${spec.steps} steps`);
  const rdesc = (r) => `${r.seed}${r.box ? ` [${r.box.join(",")}]` : " (mask)"}`;
  if (spec.copy) parts.push(`copy ${rdesc(spec.copy)}`);
  if (spec.paste && spec.paste.length) parts.push(`paste ${spec.paste.map(rdesc).join("; ")}`);
  parts.push(spec.context && spec.context.length ? `context ${spec.context.length} region(s)` : "context: the pasted regions");
  return parts.join(" · ");
}

/** What the version is beyond its spec: its description, strength and, for an edit not fitted
 * here, where it came from (another version's delta at a new strength, or an adapter). */
function originText(v) {
  const parts = [];
  const description = v.spec && typeof v.spec.description === "string" ? v.spec.description : "";
  if (description) parts.push(`“${description}”`);
  if (v.kind === "edit" && Number.isFinite(v.strength)) parts.push(`strength ${v.strength}`);
  if (v.rescaled_from) parts.push(`v${v.rescaled_from}'s edit rescaled, no fit`);
  if (v.adapter) parts.push(`imported from an adapter of ${v.adapter}`);
  return parts.join(" · ");
}

function lineageText(v) {
  const chain = Array.isArray(v.lineage) && v.lineage.length ? v.lineage : [v.number];
  return chain.map((n) => `v${n}`).join(" → ");
}

function when(t) {
  if (!t) return "";
  const d = typeof t === "number" ? new Date(t * (t < 1e12 ? 1000 : 1)) : new Date(t);
  return Number.isNaN(d.getTime()) ? String(t) : d.toLocaleString();
}

function renderVersions() {
  const list = $("versions");
  const aliasName = () => $("alias-name").value.trim() || state.defaultAlias;
  list.replaceChildren(...state.versions.slice().reverse().map((v) => {
    const names = aliasesOf(v.number);
    return el("li", { "data-testid": `version-${v.number}`, class: v.number === state.version ? "current" : "" },
      el("div", { class: "row" },
        el("strong", { text: `v${v.number}` }),
        ...names.map((a) => el("span", { class: "badge", "data-testid": `alias-badge-${a}`, text: a })),
        el("span", { class: "muted", text: `${v.kind || ""} by ${v.author || "?"} ${when(v.created)}` })),
      el("div", { class: "muted small", "data-testid": `version-lineage-${v.number}`, text: `lineage ${lineageText(v)}` }),
      originText(v) ? el("div", { class: "small", "data-testid": `version-origin-${v.number}`, text: originText(v) }) : null,
      el("div", { class: "small", "data-testid": `version-spec-${v.number}`, text: specSummary(v.spec) }),
      v.metrics && Object.keys(v.metrics).length ? el("div", { class: "muted small mono", text: metricsText(v.metrics) }) : null,
      el("div", { class: "row" },
        el("button", { "data-testid": `version-open-${v.number}`, onclick: () => act(`Opening v${v.number}`, () => selectVersion(v.number)) }, "Open"),
        el("button", { "data-testid": `version-promote-${v.number}`, onclick: () => act(`Promoting v${v.number}`, () => promote(v.number, aliasName())) }, "Promote")));
  }));
  const aliases = $("aliases");
  aliases.replaceChildren(...state.aliases.map((a) => el("div", { class: "alias", "data-testid": `alias-${a.alias}` },
    el("div", { class: "row" },
      el("strong", { text: a.alias }), el("span", { "data-testid": `alias-version-${a.alias}`, text: `→ v${a.version}` }),
      el("button", { "data-testid": `alias-rollback-${a.alias}`, onclick: () => act(`Rolling back ${a.alias}`, () => rollback(a.alias)) }, "Roll back")),
    el("ul", { class: "history small" }, ...(a.history || []).slice().reverse().map((h) => el("li", {
      text: `${h.from ? `v${h.from}` : "(new)"} → v${h.to} by ${h.author || "?"} ${when(h.time)}${h.reason ? `: ${h.reason}` : ""}`,
    }))))));
}

function metricsText(m) {
  return Object.entries(m).filter(([, v]) => typeof v === "number").slice(0, 4)
    .map(([k, v]) => `${k} ${Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(2) : v.toFixed(4)}`).join(" · ");
}

async function promote(n, alias) {
  const current = state.aliases.find((a) => a.alias === alias);
  const body = { version: n, reason: "promoted from the editor" };
  // compare-and-set: the alias as this page last saw it (expected_version 0: a new alias)
  if (current && current.etag) body.etag = current.etag;
  else if (current) body.expected_version = current.version;
  else body.expected_version = 0;
  await api("PUT", `${modelPath()}/aliases/${enc(alias)}`, body);
  await loadVersions();
  say(`${alias} now points at v${n}.`, "ok");
}

async function rollback(alias) {
  const out = await api("POST", `${modelPath()}/aliases/${enc(alias)}/rollback`, { reason: "rolled back from the editor" });
  await loadVersions();
  const now = state.aliases.find((a) => a.alias === alias);
  say(`${alias} rolled back to v${now ? now.version : out && out.version}.`, "ok");
}

// ---- album --------------------------------------------------------------------------------------

function albumSeeds() {
  if (state.searchOrder) {
    const page = state.searchOrder.slice(0, state.albumSize);
    return page.map((m) => m.seed);
  }
  return Array.from({ length: state.albumSize }, (_, i) => state.albumStart + i);
}

// A press on a tile must end in a click on it: the browser drops a click whose pressed element left
// the page, or whose release lands on another element. A render between press and release does
// both (typing a page size or start seed, then pressing a tile, applies the value as the press takes
// the focus), so renders asked for meanwhile wait until the release.
const albumPress = { down: false, pending: false };

function albumPressed() {
  albumPress.down = true;
}

function albumReleased() {
  if (!albumPress.down) return;
  albumPress.down = false;
  if (albumPress.pending) {
    albumPress.pending = false;
    setTimeout(renderAlbum, 0);     // after the click the release is about to dispatch
  }
}

function renderAlbum() {
  if (albumPress.down) {
    albumPress.pending = true;
    return;
  }
  const album = $("album");
  const shown = shownVersion();
  const v = currentVersion();
  $("toggle-original").textContent = state.showOriginal ? "Show edited" : "Show original";
  $("toggle-original").disabled = !(v && v.parent);
  $("album-showing").textContent = state.version === null ? "" :
    state.showOriginal ? `original (v${shown})` : `v${shown}${v && v.parent ? " (edited)" : ""}`;
  $("album-showing").dataset.version = String(shown);
  $("btn-search-clear").hidden = !state.searchOrder;
  $("ablation-row").hidden = !state.ablation;
  if (state.ablation) $("ablation-info").textContent = `Ablating unit(s) ${state.ablation.units.join(", ")} of ${state.ablation.layer}`;
  const pasted = new Set(state.paste.map((p) => p.seed));
  const ctx = new Set(state.context.map((c) => c.seed));
  const matchBy = new Map();
  if (state.searchOrder) for (const m of state.searchOrder) matchBy.set(m.seed, m);
  else if (state.matches) for (const [s, m] of state.matches) matchBy.set(s, m);
  album.replaceChildren(...albumSeeds().map((seed) => {
    const m = matchBy.get(seed);
    const classes = ["tile"];
    if (seed === state.work) classes.push("work");
    if (state.copy && state.copy.seed === seed) classes.push("copy");
    if (pasted.has(seed)) classes.push("paste");
    if (ctx.has(seed)) classes.push("context");
    const img = el("img", { src: imageUrl(seed, shown), alt: `seed ${seed}`, "data-testid": `album-img-${seed}`, draggable: "false",
      width: state.R * ALBUM_SCALE, height: state.R * ALBUM_SCALE });
    retryOnError(img, () => albumImageFailed());
    const overlay = m && m.map_url && (state.matches || state.searchOrder)
      ? el("img", { class: "overlay", src: withToken(m.map_url), alt: "", "data-testid": `album-match-${seed}`, draggable: "false" })
      : null;
    return el("figure", { class: classes.join(" "), "data-testid": `album-tile-${seed}`, "data-seed": seed, onclick: () => setWork(seed) },
      img, overlay,
      el("figcaption", {}, `${seed}`, m ? el("span", { class: m.above ? "score above" : "score", text: ` ${Number(m.score).toFixed(2)}` }) : null));
  }));
}

/** Retry a failed image a few times (the server may answer 503/500 while it is busy), then give up. */
function retryOnError(img, giveUp) {
  let tries = 0;
  img.addEventListener("load", () => (tries = 0));
  img.addEventListener("error", () => {
    const src = img.getAttribute("src");
    if (!src) return;
    if (tries < 3) {
      tries += 1;
      setTimeout(() => {
        if (img.getAttribute("src") === src && img.isConnected) {
          img.src = `${src}${src.includes("?") ? "&" : "?"}retry=${tries}`;
        }
      }, 400 * tries);
      return;
    }
    img.classList.add("broken");
    if (giveUp) giveUp();
  });
}

let failedNotice = 0;
function albumImageFailed() {
  const now = Date.now();
  if (now - failedNotice < 3000) return;
  failedNotice = now;
  act("Loading the album", async () => {
    // A missing image usually means the version was deleted meanwhile: ask the server.
    await api("GET", `${modelPath()}/versions/${shownVersion()}/layers`);
    throw new Error("some images did not load (the server answered an error); use Refresh or page the album to retry");
  });
}

async function toggleOriginal() {
  const v = currentVersion();
  if (!v || !v.parent) {
    say(`v${state.version} has no parent: it is the original.`, "error");
    return;
  }
  state.showOriginal = !state.showOriginal;
  renderAlbum();
  renderWork();
}

function contextForSearch() {
  if (state.context.length) return state.context;
  return state.paste.map((p) => ({ seed: p.seed, ...pasteRegion(p) }));
}

async function searchBody(extra) {
  const ctx = contextForSearch();
  if (!ctx.length) throw new Error("Context matches need context regions: select a region and click Add to context");
  return {
    model: state.model.name, version: state.version, layer: $("layer-select").value,
    context: await Promise.all(ctx.map((r) => M.regionToSpec(r, state.R))), rank: 1, ...extra,
  };
}

async function showMatches(on) {
  if (!on) {
    state.matches = null;
    renderAlbum();
    return;
  }
  const seeds = albumSeeds();
  const out = await api("POST", "/api/search", await searchBody({ seeds, top: seeds.length }));
  state.matches = new Map((out.matches || []).map((m) => [m.seed, m]));
  renderAlbum();
  say(`Context response over ${seeds.length} images (threshold ${Number(out.threshold).toFixed(3)}).`, "ok");
}

async function runSearch() {
  const a = state.albumStart, b = state.albumStart + state.albumSize * SEARCH_SPAN;
  const out = await api("POST", "/api/search", await searchBody({ seed_range: [a, b], top: state.albumSize }));
  const matches = (out.matches || []).slice().sort((x, y) => y.score - x.score);
  state.searchOrder = matches;
  renderAlbum();
  say(`Album ordered by context response: best ${Math.min(matches.length, state.albumSize)} of seeds ${a}–${b - 1}.`, "ok");
}

// ---- the work image and its region --------------------------------------------------------------

function setWork(seed) {
  state.work = seed;
  renderAlbum();
  renderWork();
}

function selection(seed = state.work) {
  return state.selections.get(seed) || null;
}

function pasteRegion(p) {
  return p.exact ? { ...p.exact } : M.translate(state.copy, state.R, p.dx, p.dy);
}

const stage = { canvas: null, drag: null, preview: null };

function setTool(tool) {
  state.tool = tool;
  for (const b of document.querySelectorAll("button.tool")) b.classList.toggle("active", b.dataset.tool === tool);
  $("work-canvas").dataset.tool = tool;
}

function renderWork() {
  const img = $("work-image");
  const canvas = $("work-canvas");
  const size = state.R * STAGE_SCALE;
  canvas.width = size;
  canvas.height = size;
  img.width = size;
  img.height = size;
  $("stage").style.width = `${size}px`;
  $("stage").style.height = `${size}px`;
  if (state.work === null || state.version === null) {
    img.removeAttribute("src");
    $("work-seed").textContent = "click an image in the album";
    drawStage();
    return;
  }
  const src = imageUrl(state.work, shownVersion());
  if (img.dataset.src !== src) img.src = img.dataset.src = src;    // not again while a retry of it loads
  const roles = [];
  if (state.copy && state.copy.seed === state.work) roles.push("copy source");
  if (state.paste.some((p) => p.seed === state.work)) roles.push("paste target");
  if (state.context.some((c) => c.seed === state.work)) roles.push("context");
  $("work-seed").textContent = `seed ${state.work}${roles.length ? ` — ${roles.join(", ")}` : ""}`;
  $("work-seed").dataset.seed = String(state.work);
  drawStage();
}

async function pastePreview(p) {
  // The copy's pixels, moved by (dx, dy), over the target (what the rewrite aims for).
  const r = state.R;
  const pix = await imagePixels(imageUrl(state.copy.seed, state.version, false));
  const alpha = M.regionAlpha(state.copy, r);
  const out = new ImageData(r, r);
  for (let y = 0; y < r; y++) {
    for (let x = 0; x < r; x++) {
      const sx = x - p.dx, sy = y - p.dy;
      if (sx < 0 || sy < 0 || sx >= r || sy >= r) continue;
      const si = sy * r + sx, di = y * r + x;
      for (let k = 0; k < 3; k++) out.data[4 * di + k] = pix.data[4 * si + k];
      out.data[4 * di + 3] = alpha[si];
    }
  }
  return out;
}

function drawStage() {
  const canvas = $("work-canvas");
  const ctx = canvas.getContext("2d");
  const r = state.R, s = STAGE_SCALE;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.work === null) return;
  ctx.imageSmoothingEnabled = false;
  const tmp = document.createElement("canvas");
  tmp.width = r;
  tmp.height = r;
  const tctx = tmp.getContext("2d");
  drawSelection(ctx);
  // the pasted copy on this image, over the selection
  const p = state.paste.find((q) => q.seed === state.work);
  if (p && state.copy) {
    const token = (stage.previewToken = {});
    const draw = (data) => {
      if (stage.previewToken !== token) return;
      stage.preview = data;
      tctx.putImageData(data, 0, 0);
      ctx.globalAlpha = 0.85;
      ctx.drawImage(tmp, 0, 0, r * s, r * s);
      ctx.globalAlpha = 1;
      outlinePaste(ctx, p);
    };
    if (stage.preview && stage.previewFor === `${p.seed}:${p.dx}:${p.dy}:${state.version}`) draw(stage.preview);
    else {
      stage.previewFor = `${p.seed}:${p.dx}:${p.dy}:${state.version}`;
      pastePreview(p).then(draw).catch(() => outlinePaste(ctx, p));
    }
  }
}

function outlinePaste(ctx, p) {
  const b = M.regionBBox(pasteRegion(p), state.R);
  if (!b) return;
  const s = STAGE_SCALE;
  ctx.save();
  ctx.setLineDash([6, 4]);
  ctx.lineWidth = 2;
  ctx.strokeStyle = "#3ddc84";
  ctx.strokeRect(b[0] * s + 1, b[1] * s + 1, (b[2] - b[0]) * s - 2, (b[3] - b[1]) * s - 2);
  ctx.fillStyle = "#3ddc84";
  ctx.font = "12px sans-serif";
  ctx.fillText("paste (drag with Move paste)", b[0] * s + 3, Math.max(12, b[1] * s - 4));
  ctx.restore();
}

function drawSelection(ctx) {
  const r = state.R, s = STAGE_SCALE;
  const sel = selection();
  if (sel) {
    const alpha = M.regionAlpha(sel, r);
    const data = new ImageData(r, r);
    for (let i = 0; i < r * r; i++) {
      data.data[4 * i] = 255;
      data.data[4 * i + 1] = 60;
      data.data[4 * i + 2] = 60;
      data.data[4 * i + 3] = Math.round(alpha[i] * 0.5);
    }
    const tmp = document.createElement("canvas");
    tmp.width = r;
    tmp.height = r;
    tmp.getContext("2d").putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(tmp, 0, 0, r * s, r * s);
    const b = M.regionBBox(sel, r);
    if (b) {
      ctx.strokeStyle = "#ff5050";
      ctx.lineWidth = 1;
      ctx.strokeRect(b[0] * s + 0.5, b[1] * s + 0.5, (b[2] - b[0]) * s - 1, (b[3] - b[1]) * s - 1);
    }
  }
  if (stage.drag && stage.drag.kind === "box") {
    const { x0, y0, x1, y1 } = stage.drag;
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = "#ffd24d";
    ctx.lineWidth = 2;
    ctx.strokeRect(Math.min(x0, x1) * s, Math.min(y0, y1) * s, Math.abs(x1 - x0) * s, Math.abs(y1 - y0) * s);
    ctx.setLineDash([]);
  }
}

function imagePoint(ev) {
  const rect = $("work-canvas").getBoundingClientRect();
  const r = state.R;
  return [((ev.clientX - rect.left) / rect.width) * r, ((ev.clientY - rect.top) / rect.height) * r];
}

function brushAt(x, y, erase) {
  const r = state.R;
  let sel = selection();
  if (!sel || sel.box) {
    sel = { mask: sel ? M.regionAlpha(sel, r).slice() : M.emptyMask(r) };
    state.selections.set(state.work, sel);
  }
  const radius = Math.max(1, Number($("brush-radius").value) || 4);
  M.stamp(sel.mask, r, x, y, radius, erase);
}

function clampPaste(p, dx, dy) {
  const b = M.regionBBox(state.copy, state.R);
  const r = state.R;
  return [Math.min(r - b[2], Math.max(-b[0], dx)), Math.min(r - b[3], Math.max(-b[1], dy))];
}

function onPointerDown(ev) {
  if (state.work === null) {
    say("Click an image in the album first, then draw on it.", "error");
    return;
  }
  ev.preventDefault();
  $("work-canvas").setPointerCapture(ev.pointerId);
  const [x, y] = imagePoint(ev);
  if (state.tool === "brush" || state.tool === "erase") {
    stage.drag = { kind: "brush", erase: state.tool === "erase", x, y };
    brushAt(x, y, stage.drag.erase);
  } else if (state.tool === "box") {
    stage.drag = { kind: "box", x0: x, y0: y, x1: x, y1: y };
  } else if (state.tool === "move") {
    const p = state.paste.find((q) => q.seed === state.work);
    if (!p) {
      say("Nothing is pasted on this image: click Paste first.", "error");
      return;
    }
    stage.drag = { kind: "move", x, y, dx: p.dx, dy: p.dy, p };
  }
  drawStage();
}

function onPointerMove(ev) {
  const d = stage.drag;
  if (!d) return;
  const [x, y] = imagePoint(ev);
  if (d.kind === "brush") {
    const steps = Math.max(1, Math.ceil(Math.hypot(x - d.x, y - d.y) / 0.5));
    for (let i = 1; i <= steps; i++) brushAt(d.x + ((x - d.x) * i) / steps, d.y + ((y - d.y) * i) / steps, d.erase);
    d.x = x;
    d.y = y;
  } else if (d.kind === "box") {
    d.x1 = x;
    d.y1 = y;
  } else if (d.kind === "move") {
    const [dx, dy] = clampPaste(d.p, d.dx + Math.round(x - d.x), d.dy + Math.round(y - d.y));
    if (dx !== d.p.dx || dy !== d.p.dy) {
      d.p.dx = dx;
      d.p.dy = dy;
      delete d.p.exact;
    }
  }
  drawStage();
}

function onPointerUp() {
  const d = stage.drag;
  stage.drag = null;
  if (!d) return;
  if (d.kind === "box") {
    const r = state.R;
    const x0 = Math.max(0, Math.floor(Math.min(d.x0, d.x1))), x1 = Math.min(r, Math.ceil(Math.max(d.x0, d.x1)));
    const y0 = Math.max(0, Math.floor(Math.min(d.y0, d.y1))), y1 = Math.min(r, Math.ceil(Math.max(d.y0, d.y1)));
    if (x1 - x0 >= 1 && y1 - y0 >= 1 && (Math.abs(d.x1 - d.x0) > 0.3 || Math.abs(d.y1 - d.y0) > 0.3)) {
      state.selections.set(state.work, { box: [x0, y0, x1, y1] });
    }
  } else if (d.kind === "move") {
    renderTrays();
  }
  drawStage();
}

function requireRegion(what) {
  if (state.work === null) throw new Error(`${what} needs an image: click one in the album`);
  const sel = selection();
  if (M.regionEmpty(sel, state.R)) {
    throw new Error(`The mask is empty: paint (Brush) or drag (Box) a region on seed ${state.work} before ${what}`);
  }
  return { seed: state.work, ...(sel.box ? { box: sel.box.slice() } : { mask: sel.mask.slice() }) };
}

function pageCheck(fn) {
  try {
    fn();
  } catch (exc) {
    say(exc.message, "error");
  }
}

function doCopy() {
  pageCheck(() => {
    state.copy = requireRegion("Copy");
    stage.preview = null;
    // Paste targets keep their offsets; exact loaded regions no longer match the new copy.
    for (const p of state.paste) delete p.exact;
    renderTrays();
    renderAlbum();
    renderWork();
    say(`Copied a region of seed ${state.copy.seed}. Click another image and Paste.`, "ok");
  });
}

function doPaste() {
  pageCheck(() => {
    if (!state.copy) throw new Error("Paste needs a copied region first: select a region and click Copy");
    if (state.work === null) throw new Error("Paste needs a target: click an image in the album");
    if (state.work === state.copy.seed) throw new Error("Paste onto another image than the one copied from");
    if (!state.paste.some((p) => p.seed === state.work)) state.paste.push({ seed: state.work, dx: 0, dy: 0 });
    setTool("move");
    renderTrays();
    renderAlbum();
    renderWork();
    say(`Pasted onto seed ${state.work}: drag the green outline to position it.`, "ok");
  });
}

function doAddContext() {
  pageCheck(() => {
    const region = requireRegion("Add to context");
    state.context.push(region);
    renderTrays();
    renderAlbum();
    invalidateMatches();
    say(`Context: ${state.context.length} region(s).`, "ok");
  });
}

function invalidateMatches() {
  if (state.matches || state.searchOrder) {
    state.matches = null;
    state.searchOrder = null;
    $("toggle-matches").checked = false;
    renderAlbum();
  }
}

function renderTrays() {
  const copyTray = $("copy-tray");
  copyTray.replaceChildren(state.copy
    ? el("div", { class: "item", "data-testid": "copy-item" }, regionThumb(state.copy, [255, 60, 60], "copy-thumb"),
      el("span", { text: `seed ${state.copy.seed}` }),
      el("button", { class: "remove", "data-testid": "copy-remove", title: "Forget the copy", onclick: () => { state.copy = null; state.paste = []; renderTrays(); renderAlbum(); renderWork(); } }, "×"))
    : el("span", { class: "muted small", text: "nothing copied" }));
  const pasteTray = $("paste-tray");
  $("paste-count").textContent = state.paste.length ? `(${state.paste.length})` : "";
  pasteTray.replaceChildren(...(state.paste.length && state.copy ? state.paste.map((p, i) => el("div", { class: "item", "data-testid": `paste-item-${i}` },
    regionThumb({ seed: p.seed, ...pasteRegion(p) }, [61, 220, 132], `paste-thumb-${i}`),
    el("span", { text: `seed ${p.seed} (${p.dx >= 0 ? "+" : ""}${p.dx}, ${p.dy >= 0 ? "+" : ""}${p.dy})`, class: "clickable", onclick: () => setWork(p.seed) }),
    el("button", { class: "remove", "data-testid": `paste-remove-${i}`, title: "Remove", onclick: () => { state.paste.splice(i, 1); renderTrays(); renderAlbum(); renderWork(); } }, "×")))
    : [el("span", { class: "muted small", text: "no paste targets" })]));
  const ctxTray = $("context-tray");
  $("context-count").textContent = state.context.length ? `(${state.context.length})` : "";
  ctxTray.replaceChildren(...(state.context.length ? state.context.map((c, i) => el("div", { class: "item", "data-testid": `context-item-${i}` },
    regionThumb(c, [80, 140, 255], `context-thumb-${i}`),
    el("span", { text: `seed ${c.seed}`, class: "clickable", onclick: () => setWork(c.seed) }),
    el("button", { class: "remove", "data-testid": `context-remove-${i}`, title: "Remove", onclick: () => { state.context.splice(i, 1); invalidateMatches(); renderTrays(); renderAlbum(); } }, "×")))
    : [el("span", { class: "muted small", text: "none: the pasted regions are the context" })]));
  const foundTray = $("found-tray");
  const found = state.found || [];
  $("found-count").textContent = state.found ? `(${found.length})` : "";
  foundTray.replaceChildren(...(found.length ? found.map((f, i) => el("div", { class: "item", "data-testid": `found-item-${i}` },
    f.box ? regionThumb({ seed: f.seed, box: f.box.slice() }, [255, 190, 40], `found-thumb-${i}`, true)
      : lazyImage(imageUrl(f.seed, state.version, false), `seed ${f.seed}`, `found-thumb-${i}`),
    el("span", { text: `seed ${f.seed}`, class: "clickable", onclick: () => setWork(f.seed) }),
    el("button", { class: "remove", "data-testid": `found-remove-${i}`, title: "Leave this target out of the next rewrite", onclick: () => { state.found.splice(i, 1); renderTrays(); } }, "×")))
    : [el("span", { class: "muted small", text: state.found ? "none: the next rewrite uses your pastes only" : "the next rewrite searches for more targets" })]));
  watchLazyThumbs();
}

function clearEdit() {
  state.selections.clear();
  state.copy = null;
  state.paste = [];
  state.context = [];
  state.work = null;
  state.ablation = null;
  state.dissect = null;
  state.specExtras = {};
  state.found = null;
  $("dissect-units").replaceChildren();
  renderTrays();
}

// ---- rewrite ----------------------------------------------------------------------------------

function intField(id, name, lo, hi) {
  const raw = $(id).value.trim();
  const n = Number(raw);
  if (!/^\d+$/.test(raw) || !Number.isInteger(n) || n < lo || (hi && n > hi)) {
    throw new Error(`${name} must be a whole number${hi ? ` from ${lo} to ${hi}` : ` of at least ${lo}`}, got "${raw}"`);
  }
  return n;
}

/** The Strength field as a number; NaN when blank (the service's default: the chosen strength). */
function strengthValue() {
  const raw = $("strength-input").value.trim();
  if (raw === "") return NaN;
  const strength = Number(raw);
  if (!Number.isFinite(strength) || strength < -10 || strength > 10) {
    throw new Error(`Strength must be a number from -10 to 10 (or blank for the default), got "${raw}"`);
  }
  return strength;
}

async function buildSpec() {
  if (!state.copy) throw new Error("A rewrite needs a copied region: select a region and click Copy");
  if (!state.paste.length) throw new Error("A rewrite needs at least one paste target: click another image and Paste");
  const layer = state.layers.find((l) => l.name === $("layer-select").value);
  const rank = intField("rank-input", "Rank", 1, layer ? layer.in_channels : 0);
  const steps = $("steps-input").value.trim() === "" ? undefined : intField("steps-input", "Steps", 1, 100000);
  const strength = strengthValue();
  const R = state.R;
  const spec = {
    // the quality said out loud: a spec that lists found targets and no quality means the draft's
    quality: "final",
    ...state.specExtras,
    model: state.model.name,
    layer: $("layer-select").value,
    rank,
    copy: await M.regionToSpec(state.copy, R),
    paste: await Promise.all(state.paste.map((p) => M.regionToSpec({ seed: p.seed, ...pasteRegion(p) }, R))),
  };
  if (steps !== undefined) spec.steps = steps;
  if (Number.isFinite(strength)) spec.strength = strength;
  if (state.context.length) spec.context = await Promise.all(state.context.map((c) => M.regionToSpec(c, R)));
  else delete spec.context;
  if (state.found) spec.found = state.found.map((f) => ({ ...f }));
  else delete spec.found;
  return spec;
}

// The draft shown first: the user's own pastes only (no search), few steps, at the chosen strength
// or 1 — seconds where the final fit (found targets, more steps) takes tens of them.
const DRAFT_STEPS = 50;
const DRAFT_SHARE = 0.15;     // of the progress bar, when a draft runs first
const PREVIEW_COUNT = 6;

function draftSpec(spec) {
  const draft = { ...spec, quality: "draft", steps: Math.min(spec.steps ?? DRAFT_STEPS, DRAFT_STEPS),
                  strength: spec.strength ?? 1, search: { ...(spec.search || {}), targets: 0 } };
  delete draft.found;
  return draft;
}

/** Seeds to preview: the paste targets, then the album's first seeds, PREVIEW_COUNT in all. */
function previewSeeds() {
  const seeds = [...new Set(state.paste.map((p) => p.seed))];
  for (const s of albumSeeds()) if (seeds.length < PREVIEW_COUNT && !seeds.includes(s)) seeds.push(s);
  return seeds.slice(0, PREVIEW_COUNT);
}

function setProgress(fraction, status, loss) {
  const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
  $("rewrite-progress").value = pct;
  $("rewrite-percent").textContent = `${pct}%`;
  $("rewrite-percent").dataset.value = String(pct);
  if (status !== undefined) $("rewrite-status").textContent = status;
  if (loss !== undefined) $("rewrite-loss").textContent = loss;
}

function busy(on) {
  $("btn-rewrite").disabled = on;
  $("btn-cancel").disabled = !on;
}

/** A job's own failure (its error event), as opposed to one of posting it. */
class JobFailed extends Error {
  constructor(err) {
    super(err.message);
    this.apiError = err;
  }
}

/**
 * POST a rewrite and follow its events; resolves with the result. Progress fills the bar from
 * ``span[0]`` to ``span[1]``, the status naming the ``phase`` (one bar for draft and final).
 */
async function runJob(phase, span, body) {
  const job = await api("POST", "/api/rewrites", body);
  return new Promise((resolve, reject) => {
    const source = new EventSource(withToken(job.events_url));
    state.job = { id: job.job, source, cancelUrl: job.cancel_url };
    let finished = false;
    const finish = () => {
      finished = true;
      source.close();
      state.job = null;
    };
    const parse = (ev) => {
      try {
        return JSON.parse(ev.data);
      } catch {
        return {};
      }
    };
    source.addEventListener("progress", (ev) => {
      const p = parse(ev);
      const step = p.step ?? p.done ?? 0, steps = p.steps ?? p.total ?? 0;
      const stage = p.stage || "working";
      const loss = typeof p.loss === "number" ? `loss ${p.loss.toFixed(5)}` : undefined;
      const within = stage === "optimize" && steps ? step / steps : 0;
      setProgress(span[0] + (span[1] - span[0]) * within, `${phase} — ${stage}: ${step}/${steps}`, loss);
      $("rewrite-status").dataset.stage = stage;
      $("rewrite-status").dataset.phase = phase;
    });
    source.addEventListener("result", (ev) => {
      finish();
      resolve(parse(ev));
    });
    source.addEventListener("error", (ev) => {
      if (ev.data !== undefined && ev.data !== null && ev.data !== "") {
        const body = parse(ev);     // the job's own error event
        finish();
        reject(new JobFailed(new ApiError(body.error && body.error.code === "CANCELLED" ? 499 : 400, body)));
        return;
      }
      if (!finished && source.readyState === EventSource.CLOSED) {
        finish();
        reject(new Error("lost the rewrite's progress stream (the server closed it)"));
      }
    });
  });
}

/** The preview strip: each seed's original (the parent) beside its edited render. */
function showPreviews(result, label, parent) {
  const strip = $("preview-strip");
  const previews = Array.isArray(result.previews) ? result.previews : [];
  strip.hidden = !previews.length;
  strip.dataset.kind = label.kind;
  $("preview-label").textContent = label.text;
  $("previews").replaceChildren(...previews.map((p) => el("figure", { class: "preview", "data-testid": `preview-${p.seed}` },
    el("img", { src: imageUrl(p.seed, parent, false), alt: `seed ${p.seed}, original`, width: state.R * 1.5, height: state.R * 1.5 }),
    el("img", { src: withToken(p.url), alt: `seed ${p.seed}, ${label.kind}`, width: state.R * 1.5, height: state.R * 1.5,
                "data-testid": `preview-img-${p.seed}`, class: "edited" }),
    el("figcaption", { text: `seed ${p.seed}` }))));
}

async function startRewrite() {
  if (state.job || state.rewriting) {
    say("A rewrite is already running: wait for it or cancel it.", "error");
    return;
  }
  let spec;
  try {
    spec = await buildSpec();
  } catch (exc) {
    say(exc.message, "error");
    return;
  }
  const parent = state.version;
  const seeds = previewSeeds();
  const draft = $("toggle-draft").checked;
  state.rewriting = { cancelled: false };
  busy(true);
  setProgress(0, `submitting (from v${parent})`, "");
  $("rewrite-status").dataset.stage = "";
  const base = { model: state.model.name, version: parent, preview_seeds: seeds };
  try {
    if (draft) await runDraft(base, spec, parent);
    if (state.rewriting.cancelled) throw new JobFailed(new ApiError(499, { error: { code: "CANCELLED", message: "cancelled" } }));
    const r = await runJob("final", [draft ? DRAFT_SHARE : 0, 1], { ...base, spec, request_id: crypto.randomUUID() });
    setProgress(1, `done: v${r.version} from v${r.parent ?? parent}`);
    showPreviews(r, { kind: "final", text: `Final: v${r.version}${r.metrics && r.metrics.strength_curve ? ` at strength ${r.metrics.strength_curve.chosen ?? spec.strength ?? ""}` : ""}` }, parent);
    state.found = Array.isArray(r.found) ? r.found : null;
    renderTrays();
    await act("Loading the new version", async () => {
      await loadVersions();
      await selectVersion(r.version);
      setCurve(curveOf(r.metrics) || curveOf((currentVersion() || {}).metrics));
      say(`Rewrite done: version ${r.version} (from v${r.parent ?? parent}). Toggle original / edited to compare.`, "ok");
    });
  } catch (exc) {
    rewriteFailed(exc);
  } finally {
    state.rewriting = null;
    state.job = null;
    busy(false);
  }
}

/** The draft: a dry run whose previews show while the final fit runs; its failure only notes it. */
async function runDraft(base, spec, parent) {
  const d = draftSpec(spec);
  try {
    const r = await runJob("draft", [0, DRAFT_SHARE], { ...base, spec: d, dry_run: true });
    showPreviews(r, { kind: "draft", text: `Draft preview (your ${spec.paste.length} paste(s), ${d.steps} steps, strength ${d.strength}): the final fit is running…` }, parent);
    if (curveOf(r.metrics)) setCurve(curveOf(r.metrics));
  } catch (exc) {
    if (!(exc instanceof JobFailed) || exc.apiError.code === "CANCELLED") throw exc;
    $("preview-label").textContent = `No draft preview (${exc.message}); the final fit is running…`;
  }
}

function rewriteFailed(exc) {
  const err = exc instanceof JobFailed ? exc.apiError : exc;
  if (err instanceof ApiError && err.code === "CANCELLED") {
    setProgress(0, "cancelled", "");
    say("Rewrite cancelled: no version was created.", "info");
  } else if (exc instanceof JobFailed || err instanceof ApiError) {
    setProgress(0, "failed", "");
    act("Rewrite", async () => { throw err; });
  } else {
    setProgress(0, "lost", "");
    say(`Rewrite: ${err.message}`, "error");
  }
}

async function cancelRewrite() {
  if (state.rewriting) state.rewriting.cancelled = true;
  if (!state.job) return;
  $("rewrite-status").textContent = "cancelling…";
  await act("Cancel", () => api("POST", state.job.cancelUrl, {}));
}

// ---- the strength curve -----------------------------------------------------------------------

function setCurve(curve) {
  state.curve = curve;
  renderCurve();
}

function sliderStrength() {
  try {
    return strengthValue();
  } catch {
    return NaN;
  }
}

function renderCurve() {
  const box = $("strength-curve-box");
  const canvas = $("strength-curve");
  box.hidden = !state.curve;
  if (!state.curve) return;
  const slider = sliderStrength();
  const drawn = drawCurve(canvas, state.curve, slider);
  canvas.dataset.points = String(state.curve.points.length);
  canvas.dataset.chosen = state.curve.chosen === null ? "" : String(state.curve.chosen);
  canvas.dataset.slider = Number.isFinite(slider) ? String(slider) : "";
  canvas.dataset.sliderX = drawn.sliderX === null ? "" : drawn.sliderX.toFixed(1);
  canvas.dataset.chosenX = drawn.chosenX === null ? "" : drawn.chosenX.toFixed(1);
  $("strength-curve-info").replaceChildren(
    el("span", { class: "key detected", text: "detected" }), " ", el("span", { class: "key side", text: "side effect" }), " ",
    el("span", { class: "key chosen", text: "chosen" }), " ", el("span", { class: "key slider", text: "Strength" }),
    el("br"), curveText(state.curve, slider));
}

function pickStrength(ev) {
  if (!state.curve) return;
  const canvas = $("strength-curve");
  const rect = canvas.getBoundingClientRect();
  const x = ((ev.clientX - rect.left) / rect.width) * canvas.width;
  const s = strengthAtX(state.curve, sliderStrength(), canvas.width, x);
  $("strength-input").value = String(Math.round(s * 20) / 20);
  renderCurve();
}

// ---- dissection and ablation ------------------------------------------------------------------

async function doDissect() {
  let region;
  try {
    region = requireRegion("Dissect");
  } catch (exc) {
    say(exc.message, "error");
    return;
  }
  const layer = $("layer-select").value;
  $("dissect-info").textContent = "dissecting…";
  const out = await act("Dissect", async () => api("POST", "/api/dissect", {
    model: state.model.name, version: state.version, layer, region: await M.regionToSpec(region, state.R), top: 8,
  }));
  if (!out) {
    $("dissect-info").textContent = "";
    return;
  }
  state.dissect = { layer: out.layer || layer, seed: region.seed, units: out.units || [] };
  renderDissect();
}

function renderDissect() {
  const d = state.dissect;
  const box = $("dissect-units");
  if (!d) {
    box.replaceChildren();
    return;
  }
  $("dissect-info").textContent = `top ${d.units.length} units of ${d.layer} for seed ${d.seed}`;
  const chosen = new Set(state.ablation && state.ablation.layer === d.layer ? state.ablation.units : []);
  box.replaceChildren(...d.units.map((u) => el("label", { class: "unit", "data-testid": `dissect-unit-${u.unit}` },
    el("span", { class: "unit-img" },
      el("img", { src: imageUrl(d.seed, state.version, false), alt: "", width: state.R * 2, height: state.R * 2 }),
      u.map_url ? el("img", { class: "overlay", src: withToken(u.map_url), alt: `unit ${u.unit}`, "data-testid": `dissect-map-${u.unit}` }) : null),
    el("span", { class: "row" },
      el("input", { type: "checkbox", value: String(u.unit), "data-testid": `dissect-check-${u.unit}`, checked: chosen.has(u.unit), onchange: updateAblateButton }),
      el("span", { text: `unit ${u.unit}` }),
      el("span", { class: "muted small", text: `IoU ${Number(u.iou).toFixed(3)}` })))));
  updateAblateButton();
}

function chosenUnits() {
  return [...document.querySelectorAll('#dissect-units input[type="checkbox"]:checked')].map((c) => Number(c.value));
}

function updateAblateButton() {
  $("btn-ablate").disabled = !chosenUnits().length;
}

function doAblate() {
  const units = chosenUnits();
  if (!units.length || !state.dissect) {
    say("Choose one or more units to ablate (tick them under Dissect).", "error");
    return;
  }
  state.ablation = { layer: state.dissect.layer, units };
  renderAlbum();
  renderWork();
  say(`Album rendered with unit(s) ${units.join(", ")} of ${state.ablation.layer} zeroed.`, "ok");
}

function clearAblation() {
  state.ablation = null;
  renderAlbum();
  renderWork();
}

// ---- edit specs as JSON -----------------------------------------------------------------------

async function saveSpec() {
  let spec;
  try {
    spec = await buildSpec();
  } catch (exc) {
    say(exc.message, "error");
    return;
  }
  const text = `${JSON.stringify(spec, null, 2)}\n`;
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const a = el("a", { href: url, download: `${spec.name || "edit"}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  say("Edit spec saved as JSON.", "ok");
}

async function loadSpec(file) {
  const R = state.R;
  let spec;
  try {
    spec = JSON.parse(await file.text());
  } catch (exc) {
    say(`Load spec failed: ${file.name} is not JSON (${exc.message})`, "error");
    return;
  }
  try {
    if (!spec || typeof spec !== "object" || Array.isArray(spec)) throw new Error("an edit spec is a JSON object");
    const copy = spec.copy ? await M.regionFromSpec(spec.copy, R, "copy") : null;
    const paste = await Promise.all((spec.paste || []).map((p, i) => M.regionFromSpec(p, R, `paste[${i}]`)));
    const context = await Promise.all((spec.context || []).map((c, i) => M.regionFromSpec(c, R, `context[${i}]`)));
    if (paste.length && !copy) throw new Error("paste targets need a copy region");
    const notes = [];
    if (spec.model && spec.model !== state.model.name) notes.push(`the spec was written for model ${spec.model}`);
    if (spec.layer && !state.layers.some((l) => l.name === spec.layer)) throw new Error(`layer ${spec.layer} is not a layer of ${state.model.name}`);
    clearEdit();
    state.copy = copy;
    const [ccx, ccy] = copy ? M.center(M.regionAlpha(copy, R), R) : [0, 0];
    state.paste = paste.map((p) => {
      const [px, py] = M.center(M.regionAlpha(p, R), R);
      return { seed: p.seed, dx: Math.round(px - ccx), dy: Math.round(py - ccy), exact: p.box ? { box: p.box } : { mask: p.mask } };
    });
    state.context = context;
    for (const r of [copy, ...context]) if (r) state.selections.set(r.seed, r.box ? { box: r.box.slice() } : { mask: r.mask.slice() });
    if (spec.layer) $("layer-select").value = spec.layer;
    if (spec.rank !== undefined) $("rank-input").value = String(spec.rank);
    $("steps-input").value = spec.steps === undefined ? "" : String(spec.steps);
    $("strength-input").value = spec.strength === undefined ? "" : String(spec.strength);
    renderCurve();
    const { model, layer, rank, steps, strength: _s, found, copy: _c, paste: _p, context: _x, ...extras } = spec;
    state.found = Array.isArray(found) ? found : null;
    state.specExtras = extras;
    state.work = copy ? copy.seed : null;
    updateRankLimit();
    renderTrays();
    renderAlbum();
    renderWork();
    say([`Loaded ${spec.name ? `"${spec.name}"` : file.name}: copy ${copy ? `seed ${copy.seed}` : "none"}, ${paste.length} paste, ${context.length} context.`, ...notes], "ok");
  } catch (exc) {
    say(`Load spec failed: ${exc.message}`, "error");
  }
}

// ---- wiring -----------------------------------------------------------------------------------

function wire() {
  retryOnError($("work-image"));
  $("model-select").addEventListener("change", (e) => act("Opening the model", () => selectModel(e.target.value)));
  $("version-select").addEventListener("change", (e) => act("Opening the version", () => selectVersion(Number(e.target.value))));
  wireViewStrength((strength) => { state.viewStrength = strength; renderAlbum(); renderWork(); });
  $("layer-select").addEventListener("change", () => { updateRankLimit(); invalidateMatches(); });
  $("album-start").addEventListener("change", (e) => {
    state.albumStart = Math.max(0, Math.floor(Number(e.target.value) || 0));
    e.target.value = String(state.albumStart);
    state.searchOrder = null;
    refreshAlbumPage();
  });
  $("album-size").addEventListener("change", (e) => {
    state.albumSize = Math.min(96, Math.max(1, Math.floor(Number(e.target.value) || 24)));
    e.target.value = String(state.albumSize);
    refreshAlbumPage();
  });
  $("album").addEventListener("pointerdown", albumPressed);
  for (const end of ["pointerup", "pointercancel"]) window.addEventListener(end, albumReleased, true);
  window.addEventListener("blur", albumReleased);     // the window's own (elements' blur does not bubble)
  $("album-prev").addEventListener("click", () => page(-1));
  $("album-next").addEventListener("click", () => page(1));
  $("toggle-original").addEventListener("click", toggleOriginal);
  $("toggle-matches").addEventListener("change", async (e) => {
    const on = e.target.checked;
    const ok = await act("Context matches", async () => { await showMatches(on); return true; });
    if (!ok) e.target.checked = false;
  });
  $("btn-search").addEventListener("click", () => act("Search", runSearch));
  $("btn-search-clear").addEventListener("click", () => { state.searchOrder = null; renderAlbum(); });
  $("btn-ablate-clear").addEventListener("click", clearAblation);
  for (const b of document.querySelectorAll("button.tool")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("region-clear").addEventListener("click", () => { if (state.work !== null) state.selections.delete(state.work); drawStage(); });
  const canvas = $("work-canvas");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  $("btn-copy").addEventListener("click", doCopy);
  $("btn-paste").addEventListener("click", doPaste);
  $("btn-add-context").addEventListener("click", doAddContext);
  $("btn-dissect").addEventListener("click", doDissect);
  $("btn-ablate").addEventListener("click", doAblate);
  $("btn-rewrite").addEventListener("click", startRewrite);
  $("btn-found-reset").addEventListener("click", (e) => { e.preventDefault(); state.found = null; renderTrays(); });
  $("strength-input").addEventListener("input", renderCurve);
  $("found-block").addEventListener("toggle", watchLazyThumbs);
  $("strength-curve").addEventListener("click", pickStrength);
  $("btn-cancel").addEventListener("click", cancelRewrite);
  $("btn-refresh").addEventListener("click", () => act("Refreshing versions", async () => { await loadVersions(); renderAlbum(); }));
  $("alias-name").addEventListener("change", renderVersions);
  $("btn-save-spec").addEventListener("click", saveSpec);
  $("spec-file").addEventListener("change", (e) => {
    const f = e.target.files && e.target.files[0];
    if (f) loadSpec(f).finally(() => (e.target.value = ""));
  });
}

function page(delta) {
  if (state.searchOrder) {
    state.searchOrder = null;
  }
  state.albumStart = Math.max(0, state.albumStart + delta * state.albumSize);
  $("album-start").value = String(state.albumStart);
  refreshAlbumPage();
}

function refreshAlbumPage() {
  renderAlbum();
  if ($("toggle-matches").checked) act("Context matches", () => showMatches(true));
}

async function start() {
  wire();
  setTool("brush");
  renderTrays();
  const ok = await act("Loading models", async () => { await loadModels(); return true; });
  document.body.dataset.ready = ok ? "true" : "error";
}

start();
