/* facegrad console: plain JS over the v1 REST API (no build step, no network beyond this server).
 *
 * Views are picked by the URL hash: #datasets, #jobs, #job/<id>, #sweeps, #sweep/<id>, #identify. Every API call sends
 * the X-API-Key kept in localStorage. The job form is built from the server's OpenAPI schema
 * (defaults and bounds come from facegrad/training/config.py), with one-line explanations added here.
 */
"use strict";

const KEY_STORE = "facegrad.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const SWEEP_FINAL = ["succeeded", "failed", "partial", "cancelled"];
const SWEEP_POLL_MS = 3000;
const POLL_MS = 1500;
const state = { datasets: [], models: [], schema: null, jobTimer: null, jobsTimer: null,
  jobId: null, selectedDataset: null, sweepTimer: null, sweepId: null, sweepsTimer: null,
  datasetsTimer: null, clipModes: null };

// --- small helpers -------------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

/** node.replaceChildren without the null/undefined/false entries (conditional parts). */
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined &&
    c !== false));
  return node;
}

const fmt = (x, d = 4) => (x === null || x === undefined || Number.isNaN(x)) ? "–"
  : (typeof x === "number" ? Number(x.toPrecision(d)).toString() : String(x));
const pct = (x) => (x === null || x === undefined) ? "–" : `${(100 * x).toFixed(1)}%`;
const when = (ts) => ts ? new Date(ts.endsWith("Z") || ts.includes("+") ? ts : ts + "Z")
  .toLocaleString() : "–";
const short = (id) => id ? id.slice(0, 8) : "–";

function clipText(clip) {
  if (!clip) return "–";
  const extra = Object.entries(clip).filter(([k]) => k !== "mode" && k !== "on_nonfinite")
    .map(([k, v]) => `${k}=${v}`);
  return clip.mode + (extra.length ? ` (${extra.join(", ")})` : "");
}

function notify(message, kind = "info") {
  const box = $("#notice");
  fill(box, el("span", { text: message }),
    el("button", { type: "button", title: "dismiss", text: "×", onclick: () => { box.hidden = true; } }));
  box.className = `notice ${kind}`;
  box.hidden = false;
  clearTimeout(notify.timer);
  if (kind !== "error") notify.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

// --- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function detailText(doc, text, status) {
  const d = doc && doc.detail !== undefined ? doc.detail : null;
  if (Array.isArray(d)) {
    return d.map((e) => {
      if (typeof e !== "object") return String(e);
      const loc = (e.loc || []).filter((x) => !["body", "query", "path"].includes(x)).join(".");
      return loc ? `${loc}: ${e.msg}` : e.msg;
    }).join("; ");
  }
  if (d !== null) return typeof d === "string" ? d : JSON.stringify(d);
  return (text || "").slice(0, 300) || `HTTP ${status}`;
}

async function api(method, path, body, extraHeaders = {}) {
  const headers = { ...extraHeaders };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers["X-API-Key"] = key;
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, { method, headers, body: payload });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  const text = await r.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch { doc = null; }
  if (!r.ok) {
    let msg = detailText(doc, text, r.status);
    if (r.status === 401) msg += " — enter the API key at the top right and press Save";
    throw new ApiError(r.status, msg);
  }
  return doc;
}
const get = (p) => api("GET", p);
const post = (p, b, h) => api("POST", p, b, h);

function failed(e) {
  notify(e.message || String(e), "error");
  console.error(e);
}

// --- routing -------------------------------------------------------------------------------

function route() {
  const [view, arg] = (location.hash.slice(1) || "datasets").split("/");
  stopJobPolling();
  stopSweepPolling();
  clearInterval(state.jobsTimer);
  clearInterval(state.sweepsTimer);
  clearTimeout(state.datasetsTimer);
  const page = (view === "job" || view === "sweep") && arg ? view
    : (["datasets", "jobs", "sweeps", "identify"].includes(view) ? view : "datasets");
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${page}`;
  const tab = page === "job" ? "jobs" : page === "sweep" ? "sweeps" : page;
  for (const a of document.querySelectorAll("#tabs a")) {
    a.classList.toggle("active", a.dataset.tab === tab);
  }
  if (page === "datasets") loadDatasets().catch(failed);
  if (page === "jobs") {
    Promise.all([loadDatasets(), buildJobForm()]).catch(failed);
    loadJobs().catch(failed);
    state.jobsTimer = setInterval(() => { if (!document.hidden) loadJobs().catch(() => {}); },
      3000);
  }
  if (page === "job") {
    if (!state.datasets.length) loadDatasets().catch(() => {});
    openJob(arg);
  }
  if (page === "sweeps") {
    loadDatasets().catch(failed);
    buildSweepChoices().catch(failed);
    loadSweeps().catch(failed);
    state.sweepsTimer = setInterval(() => {
      if (!document.hidden) loadSweeps().catch(() => {});
    }, 3000);
  }
  if (page === "sweep") {
    if (!state.datasets.length) loadDatasets().catch(() => {});
    openSweep(arg);
  }
  if (page === "identify") loadModels().catch(failed);
}

// --- readiness and the key -----------------------------------------------------------------

async function checkReady() {
  const badge = $("#ready");
  try {
    const r = await fetch("/readyz");
    const doc = await r.json();
    badge.textContent = r.ok ? "ready" : "not ready";
    badge.className = `ready ${r.ok ? "ok" : "bad"}`;
    badge.title = r.ok ? "database and broker answer" : (doc.detail || "not ready");
  } catch {
    badge.textContent = "offline";
    badge.className = "ready bad";
  }
}

function setupKey() {
  const input = $("#api-key");
  input.value = localStorage.getItem(KEY_STORE) || "";
  const save = () => {
    const v = input.value.trim();
    if (v) localStorage.setItem(KEY_STORE, v); else localStorage.removeItem(KEY_STORE);
    notify(v ? "API key saved in this browser" : "API key cleared");
    route();
  };
  $("#api-key-save").addEventListener("click", save);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); });
}

// --- drop zones ----------------------------------------------------------------------------

function dropZone(zone, input, onFiles) {
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
  input.addEventListener("change", () => {
    if (input.files.length) onFiles([...input.files]);
    input.value = "";
  });
}

// --- datasets ------------------------------------------------------------------------------

let pendingUpload = null;

function setupDatasets() {
  dropZone($("#ds-drop"), $("#ds-file"), (files) => {
    pendingUpload = files[0];
    $("#ds-drop-text").textContent = `${pendingUpload.name} (${(pendingUpload.size / 1048576)
      .toFixed(1)} MiB) — press Upload`;
    $("#ds-drop").classList.add("has-file");
    $("#ds-upload").disabled = false;
  });
  $("#ds-upload").addEventListener("click", uploadDataset);
  $("#ds-refresh").addEventListener("click", () => loadDatasets().catch(failed));
}

async function uploadDataset() {
  if (!pendingUpload) return;
  const form = new FormData();
  form.append("file", pendingUpload, pendingUpload.name);
  const name = $("#ds-name").value.trim();
  if (name) form.append("name", name);
  form.append("detect", $("#ds-detect").value);
  $("#ds-upload").disabled = true;
  $("#ds-upload-status").textContent = "uploading …";
  try {
    // answered once the upload is received and checked (202); the ingest is followed below
    let ds = await post("/v1/datasets", form, { Prefer: "respond-async" });
    pendingUpload = null;
    $("#ds-drop-text").textContent = "Drop a .zip or .npz here, or click to choose";
    $("#ds-drop").classList.remove("has-file");
    state.selectedDataset = ds.id;
    showDataset(ds);
    await loadDatasets();
    while (ds.status === "ingesting") {
      $("#ds-upload-status").textContent = `${ds.name}: ${ingestText(ds)}`;
      await new Promise((done) => setTimeout(done, POLL_MS));
      ds = await get(`/v1/datasets/${ds.id}`);
      if (state.selectedDataset === ds.id) showDataset(ds);
    }
    if (ds.status === "failed") {
      $("#ds-upload-status").textContent = "";
      notify(`dataset ${ds.name} failed: ${ds.error}`, "error");
    } else {
      $("#ds-upload-status").textContent = `uploaded: ${ds.num_identities} identities, ` +
        `${ds.num_images} images`;
      notify(`dataset ${ds.name} uploaded`);
    }
    await loadDatasets();
  } catch (e) {
    $("#ds-upload-status").textContent = "";
    failed(e);
  } finally {
    $("#ds-upload").disabled = !pendingUpload;
  }
}

/** "ingesting: 120 of 400 files (3 rejected)", "ready", "failed". */
function ingestText(ds) {
  if (ds.status !== "ingesting") return ds.status;
  const p = ds.progress || {};
  const rejected = Object.keys(ds.rejected || {}).length;
  return `ingesting: ${p.done || 0} of ${p.total || "?"} files` +
    (rejected ? ` (${rejected} rejected)` : "");
}

function showDataset(ds) {
  const box = $("#ds-detail");
  const counts = Object.entries(ds.identities || {}).sort((a, b) => a[0].localeCompare(b[0],
    undefined, { numeric: true }));
  const most = Math.max(1, ...counts.map(([, n]) => n));
  const rejected = Object.entries(ds.rejected || {});
  fill(box,
    el("div", { class: "card-head" },
      el("h2", {}, "Dataset ", el("span", { id: "ds-detail-name", text: ds.name })),
      el("a", { href: "#jobs", class: "button ghost", onclick: () => { state.selectedDataset = ds.id; } },
        "Train on it →")),
    el("div", { class: "muted" }, `${ds.num_identities} identities · ${ds.num_images} images · ` +
      `detect=${ds.detect} · ${ds.source_format} · `, el("code", { text: ds.id })),
    ds.status === "ingesting" ? el("div", { id: "ds-ingest" },
      el("div", { class: "muted", text: ingestText(ds) }),
      el("div", { class: "bar" }, el("div", { style: `width:${Math.round(100 *
        ((ds.progress || {}).done || 0) / Math.max(1, (ds.progress || {}).total || 0))}%` })))
      : null,
    ds.status === "failed" ? el("div", { class: "notice error", id: "ds-error",
      style: "margin:8px 0", text: `failed: ${ds.error}` }) : null,
    ...(ds.warnings || []).map((w) => el("div", { class: "notice", style: "margin:8px 0" }, w)),
    el("div", { class: "scroll" },
      el("table", { class: "list small", id: "ds-identities" },
        el("thead", {}, el("tr", {}, el("th", { text: "identity" }),
          el("th", { class: "num", text: "images" }))),
        el("tbody", {}, counts.map(([label, n]) => el("tr", {},
          el("td", { text: label }),
          el("td", { class: "num" }, String(n),
            el("span", { class: "countbar", style: `width:${Math.round(60 * n / most)}px` }))))))),
    rejected.length ? el("h3", { style: "margin-top:12px" }, `${rejected.length} rejected files`)
      : el("div", { class: "muted", style: "margin-top:8px", text: "no rejected files" }),
    rejected.length ? el("div", { class: "scroll" }, el("table", { class: "list small", id: "ds-rejected" },
      el("thead", {}, el("tr", {}, el("th", { text: "file" }), el("th", { text: "reason" }))),
      el("tbody", {}, rejected.map(([f, why]) => el("tr", {}, el("td", { text: f }),
        el("td", { text: why })))))) : null,
  );
}

async function loadDatasets() {
  const doc = await get("/v1/datasets?limit=200");
  state.datasets = doc.items;
  const body = $("#ds-table tbody");
  fill(body, ...doc.items.map((d) => el("tr", {
    class: `click${d.id === state.selectedDataset ? " selected" : ""}`,
    onclick: () => { state.selectedDataset = d.id; showDataset(d); loadDatasets().catch(failed); },
  },
  el("td", { text: d.name }), el("td", { class: "ds-status", text: ingestText(d) }),
  el("td", { class: "num", text: d.num_identities }),
  el("td", { class: "num", text: d.num_images }),
  el("td", { class: "num", text: Object.keys(d.rejected || {}).length }),
  el("td", { text: d.detect }), el("td", { text: when(d.created_at) }),
  el("td", {}, el("code", { text: short(d.id), title: d.id })),
  el("td", {}, el("a", { href: "#jobs", onclick: (e) => { e.stopPropagation(); state.selectedDataset = d.id; } },
    "train")))));
  if (!doc.items.length) {
    fill(body, el("tr", {}, el("td", { colspan: 9, class: "muted",
      text: "no datasets yet: upload one above" })));
  }
  const ready = doc.items.filter((d) => d.status === "ready");  // jobs take ready datasets only
  for (const sel of [$("#job-dataset"), $("#sw-dataset")]) {
    const keep = state.selectedDataset || sel.value;
    fill(sel, ...ready.map((d) => el("option", { value: d.id,
      text: `${d.name} — ${d.num_identities} identities, ${d.num_images} images (${short(d.id)})` })));
    if (keep && ready.some((d) => d.id === keep)) sel.value = keep;
  }
  // while one is ingesting and the list is in view, the list is read again
  clearTimeout(state.datasetsTimer);
  if (doc.items.some((d) => d.status === "ingesting") && !$("#view-datasets").hidden) {
    state.datasetsTimer = setTimeout(() => {
      if (!$("#view-datasets").hidden) loadDatasets().catch(() => {});
    }, POLL_MS);
  }
  return doc.items;
}

// --- the job form, from the OpenAPI schema -------------------------------------------------

const BASIC = ["architecture", "epochs", "batch_size", "learning_rate", "optimizer.name",
  "image_size", "seed"];
const HIDDEN = ["dataset_id", "clip", "privacy"];
const HELP = {
  epochs: "Passes over the training images (dlib_resnet: 0 uses the pretrained network as it is).",
  batch_size: "Images per optimizer step.",
  learning_rate: "Peak step size; the schedule decays it.",
  image_size: "Faces are resized to this square side: smaller trains faster (dlib_resnet: 150).",
  seed: "The same seed gives the same split, initialisation and augmentation.",
  "optimizer.name": "sgd (uses momentum), adam or adamw; empty: sgd for dlib_resnet, adamw " +
    "otherwise.",
  "optimizer.weight_decay": "Weight decay (decoupled for adamw, L2 for sgd/adam).",
  "optimizer.nesterov": "Nesterov momentum (sgd with momentum > 0 only).",
};
const CLIP_HELP = {
  none: "No clipping: the raw gradient is applied. Useful as the baseline.",
  value: "Clamp every gradient element to ±clip_value (Keras clipvalue, torch clip_grad_value_).",
  norm: "Rescale the gradient when its p-norm exceeds max_norm (torch clip_grad_norm_; " +
    "per_tensor scope = Keras clipnorm).",
  threshold: "The origin document's rule: T = alpha · max|g|, every element with |g| > T is set to 0.",
  agc: "Adaptive gradient clipping (NFNets): each unit's gradient norm is kept under " +
    "clip_factor × its weight norm.",
  autoclip: "AutoClip: clip the global norm to a percentile of the norms seen so far.",
  per_example: "Clip each example's gradient to max_norm on its own (DP-SGD). Give a target " +
    "ε below to train with differential privacy (noise added, ε accounted).",
};
const PRIVACY_HELP = {
  target_epsilon: "Train privately to this ε (noise chosen to reach it); empty: no privacy.",
  noise_multiplier: "Or: the noise σ (sd σ·max_norm); the job reports the ε it reached.",
  delta: "δ of (ε, δ)-DP: below 1 / the number of people.",
  unit: "person: protect each person (all their photos); image: each photo.",
  accountant: "prv (tight) or rdp (an upper bound).",
};
const CLIP_PARAM_HELP = {
  clip_value: "Each gradient element is clamped to ±clip_value.",
  max_norm: "Largest allowed gradient norm; larger gradients are scaled down to it.",
  norm_type: "p of the p-norm (2 = Euclidean, or 'inf' for the largest element).",
  scope: "global: all gradients as one vector. per_tensor: each weight tensor on its own.",
  alpha: "T = alpha · max|g|; in (0, 1]. Smaller zeroes more elements.",
  clip_factor: "Allowed ratio of a unit's gradient norm to its weight norm.",
  eps: "Floor for the weight norm, so zero-initialised weights can still move.",
  exempt_output: "Leave the final classifier layer unclipped (as in the paper).",
  percentile: "Clip to this percentile of past norms: 10 clips most steps, 90 only outliers.",
  warmup_steps: "Steps that only record norms before clipping starts.",
  history_size: "How many past norms the percentile looks at.",
  on_nonfinite: "NaN/inf gradient: 'skip' the step and count it, or 'fail' the job.",
};

function resolve(schema, node) {
  while (node && node.$ref) node = schema.components.schemas[node.$ref.split("/").pop()];
  return node;
}

function firstLine(text) {
  return (text || "").split("\n\n")[0].replace(/\s+/g, " ").trim();
}

function fieldFor(path, prop, help) {
  const id = `f-${path.replace(/\./g, "-")}`;
  let input;
  let kind;
  const enumValues = prop.enum || (prop.const !== undefined ? [prop.const] : null);
  if (enumValues) {
    kind = "enum";
    input = el("select", {}, enumValues.map((v) => el("option", { value: v, text: v })));
    if (prop.default !== undefined) input.value = prop.default;
  } else if (prop.type === "boolean") {
    kind = "bool";
    input = el("input", { type: "checkbox" });
    input.checked = !!prop.default;
  } else if (prop.type === "integer" || prop.type === "number") {
    kind = prop.type === "integer" ? "int" : "number";
    input = el("input", { type: "number", step: kind === "int" ? "1" : "any",
      min: prop.minimum ?? prop.exclusiveMinimum, max: prop.maximum ?? prop.exclusiveMaximum });
    if (prop.default !== undefined) input.value = prop.default;
  } else {
    kind = prop.anyOf ? "numstr" : "text";
    input = el("input", { type: "text" });
    if (prop.default !== undefined) input.value = prop.default;
  }
  input.id = id;
  input.dataset.path = path;
  input.dataset.kind = kind;
  const bounds = [];
  if (prop.minimum !== undefined) bounds.push(`≥ ${prop.minimum}`);
  if (prop.exclusiveMinimum !== undefined) bounds.push(`> ${prop.exclusiveMinimum}`);
  if (prop.maximum !== undefined) bounds.push(`≤ ${prop.maximum}`);
  if (prop.exclusiveMaximum !== undefined) bounds.push(`< ${prop.exclusiveMaximum}`);
  const dflt = prop.default === null ? "empty: the architecture's default"
    : prop.default !== undefined ? `default ${prop.default}` : "";
  const meta = [dflt, bounds.join(", ")].filter(Boolean).join("; ");
  const parts = path.split(".");
  const label = parts[0] === "optimizer" ? (parts[1] === "name" ? "optimizer"
    : `optimizer ${parts[1]}`) : parts[parts.length - 1];
  return el("div", { class: "field" },
    el("label", { for: id, text: label.replace(/_/g, " ") }), input,
    el("div", { class: "help" }, help || firstLine(prop.description) || "",
      meta ? el("span", { class: "muted" }, ` (${meta})`) : null));
}

async function buildJobForm() {
  if (state.schema) return;
  const openapi = await get("/openapi.json");
  const body = openapi.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
  const job = resolve(openapi, body);
  const basic = $("#job-basic");
  const advanced = $("#job-advanced");
  const basicFields = {};
  for (const [name, raw] of Object.entries(job.properties)) {
    if (HIDDEN.includes(name)) continue;
    const prop = resolve(openapi, raw);
    if (prop.type === "object" && prop.properties) {
      for (const [sub, subRaw] of Object.entries(prop.properties)) {
        const path = `${name}.${sub}`;
        const f = fieldFor(path, resolve(openapi, subRaw), HELP[path]);
        if (BASIC.includes(path)) basicFields[path] = f; else advanced.append(f);
      }
      continue;
    }
    const f = fieldFor(name, prop, HELP[name]);
    if (BASIC.includes(name)) basicFields[name] = f; else advanced.append(f);
  }
  fill(basic, ...BASIC.filter((p) => basicFields[p]).map((p) => basicFields[p]));

  const clipModes = {};
  const clipProp = job.properties.clip;
  for (const ref of clipProp.oneOf || clipProp.anyOf || []) {
    const cls = resolve(openapi, ref);
    clipModes[cls.properties.mode.const] = cls;
  }
  // the registered modes (GET /v1/clip-modes), in the registry's order, with their labels
  const labels = Object.fromEntries((await clipModeList()).map((m) => [m.name, m.label]));
  // the privacy settings (DP-SGD), offered with clip mode per_example
  const privacyRef = (job.properties.privacy.anyOf || []).find((b) => b.$ref);
  const privacy = privacyRef ? resolve(openapi, privacyRef) : null;
  state.schema = { clipModes, labels, privacy };
  const select = $("#clip-mode");
  const order = Object.keys(labels).filter((m) => clipModes[m]);
  fill(select, ...order.map((m) => el("option", { value: m, text: m, title: labels[m] })));
  select.value = clipModes.norm ? "norm" : order[0];
  select.addEventListener("change", renderClipParams);
  renderClipParams();
  $("#job-form").addEventListener("submit", submitJob);
}

function renderClipParams() {
  const mode = $("#clip-mode").value;
  const cls = state.schema.clipModes[mode];
  $("#clip-mode-help").textContent = CLIP_HELP[mode] || state.schema.labels[mode] ||
    firstLine(cls.description);
  const fields = Object.entries(cls.properties).filter(([n]) => n !== "mode")
    .sort(([a], [b]) => (a === "on_nonfinite") - (b === "on_nonfinite"))
    .map(([n, p]) => fieldFor(`clip.${n}`, p, CLIP_PARAM_HELP[n]));
  const privacy = state.schema.privacy;
  if (mode === "per_example" && privacy) {  // empty ε and σ: per-example clipping only
    for (const n of ["target_epsilon", "noise_multiplier", "delta", "unit", "accountant"]) {
      const p = resolve({ components: {} }, privacy.properties[n]);
      const prop = p.anyOf ? { ...p, ...(p.anyOf.find((b) => b.type !== "null") || {}) } : p;
      fields.push(fieldFor(`privacy.${n}`, prop, PRIVACY_HELP[n]));
    }
  }
  fill($("#clip-params"), ...fields);
}

function readForm(form) {
  const out = {};
  for (const input of form.querySelectorAll("[data-path]")) {
    let v;
    const kind = input.dataset.kind;
    if (kind === "bool") v = input.checked;
    else if (kind === "int" || kind === "number") {
      if (input.value === "") continue;
      v = Number(input.value);
    } else if (kind === "numstr") {
      if (input.value.trim() === "") continue;
      v = Number.isNaN(Number(input.value)) ? input.value.trim() : Number(input.value);
    } else v = input.value;
    const parts = input.dataset.path.split(".");
    let node = out;
    for (const p of parts.slice(0, -1)) node = node[p] = node[p] || {};
    node[parts[parts.length - 1]] = v;
  }
  return out;
}

async function submitJob(e) {
  e.preventDefault();
  const body = readForm($("#job-form"));
  if (body.privacy && body.privacy.target_epsilon === undefined
      && body.privacy.noise_multiplier === undefined) {
    delete body.privacy;  // per-example clipping without privacy
  }
  if (!body.dataset_id) {
    notify("upload a dataset first (Datasets tab)", "error");
    return;
  }
  $("#job-submit").disabled = true;
  $("#job-form-status").textContent = "queueing …";
  try {
    const job = await post("/v1/jobs", body);
    $("#job-form-status").textContent = "";
    notify(`job ${short(job.id)} queued`);
    location.hash = `#job/${job.id}`;
  } catch (err) {
    $("#job-form-status").textContent = "";
    failed(err);
  } finally {
    $("#job-submit").disabled = false;
  }
}

// --- job list ------------------------------------------------------------------------------

function progressCell(job) {
  const p = job.progress || {};
  const frac = job.status === "succeeded" ? 1 : (p.fraction || 0);
  return el("td", {}, el("span", { class: "minibar" },
    el("div", { style: `width:${Math.round(100 * frac)}%` })),
  `${p.epoch || 0}/${p.epochs || "?"}`);
}

async function loadJobs() {
  const doc = await get("/v1/jobs?limit=100");
  const names = Object.fromEntries(state.datasets.map((d) => [d.id, d.name]));
  const body = $("#jobs-table tbody");
  fill(body, ...doc.items.map((j) => el("tr", {
    class: "click", onclick: () => { location.hash = `#job/${j.id}`; },
  },
  el("td", {}, el("span", { class: `badge ${j.status}`, text: j.status })),
  progressCell(j),
  el("td", { text: names[j.dataset_id] || short(j.dataset_id) }),
  el("td", { text: `${j.config.architecture}, ${j.config.epochs} ep` }),
  el("td", { text: clipText(j.config.clip) }),
  el("td", { class: "num", text: pct((j.metrics || {}).val_acc) }),
  el("td", { text: when(j.created_at) }),
  el("td", {}, el("a", { href: `#job/${j.id}` }, el("code", { text: short(j.id) }))))));
  if (!doc.items.length) {
    fill(body, el("tr", {}, el("td", { colspan: 8, class: "muted",
      text: "no jobs yet: start one above" })));
  }
}

// --- one job: summary and live charts ------------------------------------------------------

function stopJobPolling() {
  clearTimeout(state.jobTimer);
  state.jobTimer = null;
  state.jobId = null;
}

function openJob(id) {
  state.jobId = id;
  $("#job-id").textContent = id;
  $("#job-status").textContent = "…";
  fill($("#job-summary"));
  fill($("#epoch-table tbody"));
  for (const c of document.querySelectorAll("#view-job .chart")) {
    if (window.Plotly) Plotly.purge(c);
    fill(c);
  }
  $("#job-cancel").onclick = async () => {
    try {
      await post(`/v1/jobs/${id}/cancel`);
      notify("cancel requested: the job stops at its next step");
    } catch (e) { failed(e); }
  };
  const tick = async () => {
    if (state.jobId !== id) return;
    try {
      const [job, metrics] = await Promise.all([get(`/v1/jobs/${id}`),
        get(`/v1/jobs/${id}/metrics`)]);
      if (state.jobId !== id) return;
      renderJob(job);
      renderCharts(metrics.history, job);
      if (TERMINAL.includes(job.status)) return;
    } catch (e) {
      failed(e);
      if (e.status === 404) return;
    }
    state.jobTimer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function renderJob(job) {
  const status = $("#job-status");
  status.textContent = job.status;
  status.className = `badge ${job.status}`;
  $("#job-cancel").hidden = TERMINAL.includes(job.status);
  const p = job.progress || {};
  const frac = job.status === "succeeded" ? 1 : (p.fraction || 0);
  $("#job-bar").style.width = `${Math.round(100 * frac)}%`;
  const c = job.clipping || {};
  const m = job.metrics || {};
  const cfg = job.config || {};
  const ds = state.datasets.find((d) => d.id === job.dataset_id);
  const item = (label, ...value) => el("div", {}, el("b", { text: label }), ...value);
  fill($("#job-summary"),
    item("progress", `epoch ${p.epoch || 0} of ${p.epochs || cfg.epochs}, step ${p.step || 0}` +
      (p.steps_total ? ` of ${p.steps_total}` : "")),
    item("dataset", ds ? `${ds.name} ` : "", el("code", { text: short(job.dataset_id) })),
    item("training", `${cfg.architecture}, batch ${cfg.batch_size}, lr ${cfg.learning_rate} ` +
      `(${cfg.lr_schedule}), ${(cfg.optimizer || {}).name}, ${cfg.image_size}px`),
    item("clip", el("span", { id: "job-clip", text: clipText(cfg.clip) })),
    item("train", `loss ${fmt(m.train_loss)} · acc ${pct(m.train_acc)}`),
    item("validation", `loss ${fmt(m.val_loss)} · acc ${pct(m.val_acc)}`),
    fineTuningItem(item, (m.open_set || {}).fine_tuning),
    descriptorItem(item, (m.open_set || {}).descriptor_choice),
    privacyItem(item, cfg.privacy, m),
    c.examples ? item("examples clipped", `${c.examples.clipped} of ${c.examples.count} ` +
      `(${pct(c.examples.clip_fraction)}); norm before: mean ${fmt(c.examples.norm_mean)}, ` +
      `max ${fmt(c.examples.norm_max)}`) : null,
    item("steps clipped", `${c.clipped_steps || 0} of ${c.steps || 0} (${pct(c.clip_fraction)})` +
      (c.skipped_steps ? `, ${c.skipped_steps} skipped (non-finite)` : "") +
      (c.zeroed ? `, ${c.zeroed} elements zeroed` : "")),
    item("gradient norm", `before: mean ${fmt((c.grad_norm_pre || {}).mean)}, max ` +
      `${fmt((c.grad_norm_pre || {}).max)} · after: mean ${fmt((c.grad_norm_post || {}).mean)}` +
      (c.threshold !== null && c.threshold !== undefined ? ` · threshold ${fmt(c.threshold)}` : "")),
    item("model", job.model_id ? el("a", { href: "#identify", onclick: () => {
      state.preferModel = job.model_id; } }, el("code", { text: short(job.model_id) }), " identify →")
      : "–"),
    item("created", when(job.created_at)),
    item("finished", when(job.finished_at)),
    item("worker", `${job.worker || "–"}${job.attempts > 1 ? ` (attempt ${job.attempts}, resumed ` +
      `from epoch ${job.resumed_from_epoch})` : ""}`),
    job.error ? el("div", { class: "error" }, el("b", { text: "error" }), job.error) : null,
  );
}

const LAYOUT = {
  margin: { l: 56, r: 12, t: 28, b: 40 },
  xaxis: { title: { text: "epoch" }, dtick: 1, zeroline: false },
  legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", traceorder: "normal" },
  font: { size: 11 },
  paper_bgcolor: "rgba(0,0,0,0)",
  plot_bgcolor: "#fbfcfe",
};
const CONFIG = { displaylogo: false, responsive: true,
  modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };

function line(x, y, name, extra = {}) {
  return { x, y, name, type: "scatter", mode: "lines+markers", connectgaps: false, ...extra };
}

function renderCharts(history, job) {
  renderEpochTable(history);
  if (!window.Plotly) {
    for (const c of document.querySelectorAll("#view-job .chart")) {
      fill(c, el("p", { class: "muted", text: "charts need plotly.js: the server " +
        "serves it from the 'plotly' Python package (pip install plotly)" }));
    }
    return;
  }
  const x = history.map((r) => r.epoch);
  const col = (f) => history.map(f);
  const clip = (r) => r.clipping || {};
  const waiting = history.length ? [] : [{ text: job.status === "queued" ? "queued …"
    : "waiting for the first epoch …", showarrow: false, xref: "paper", yref: "paper",
    x: 0.5, y: 0.5, font: { size: 13, color: "#6b7383" } }];
  const layout = (extra) => ({ ...LAYOUT, annotations: waiting, ...extra,
    xaxis: { ...LAYOUT.xaxis, ...(history.length > 20 ? { dtick: undefined } : {}) } });

  Plotly.react("chart-loss", [
    line(x, col((r) => r.train_loss), "train"),
    line(x, col((r) => r.val_loss), "validation"),
  ], layout({ yaxis: { title: { text: "cross-entropy" } } }), CONFIG);

  // a private job: the privacy spent (epsilon, whole run so far) beside accuracy
  const eps = col((r) => r.epsilon ?? null);
  const private_ = eps.some((v) => v !== null);
  Plotly.react("chart-acc", [
    line(x, col((r) => r.train_acc), "train"),
    line(x, col((r) => r.val_acc), "validation"),
    ...(private_ ? [line(x, eps, "ε spent", { yaxis: "y2",
      line: { color: "#7a4cc2", dash: "dot" } })] : []),
  ], layout({ yaxis: { title: { text: "accuracy" }, tickformat: ".0%", range: [0, 1.02] },
    ...(private_ ? { yaxis2: { title: { text: "ε" }, overlaying: "y", side: "right",
      rangemode: "tozero" }, margin: { ...LAYOUT.margin, r: 48 } } : {}) }),
  CONFIG);

  const pre = (k) => col((r) => (clip(r).grad_norm_pre || {})[k] ?? null);
  const post = (k) => col((r) => (clip(r).grad_norm_post || {})[k] ?? null);
  const thr = col((r) => clip(r).threshold ?? null);
  const all = [...pre("mean"), ...pre("max"), ...post("mean"), ...thr]
    .filter((v) => typeof v === "number");
  const logY = all.length && Math.min(...all) > 0 && Math.max(...all) / Math.min(...all) > 30;
  const traces = [
    line(x, pre("mean"), "before clipping (mean)", { line: { color: "#d9534f" } }),
    line(x, pre("max"), "before (max)", { line: { color: "#d9534f", dash: "dot" },
      marker: { size: 4 } }),
    line(x, post("mean"), "after clipping (mean)", { line: { color: "#2f6fde" } }),
  ];
  if (thr.some((v) => v !== null)) {
    traces.push(line(x, thr, "clip threshold", { mode: "lines",
      line: { color: "#222", dash: "dash", shape: "hv" } }));
  }
  Plotly.react("chart-norm", traces, layout({
    yaxis: { title: { text: "global L2 norm" }, type: logY ? "log" : "linear" } }), CONFIG);

  Plotly.react("chart-clip", [
    { x, y: col((r) => clip(r).clip_fraction ?? 0), name: "clipped", type: "bar",
      marker: { color: "#2f6fde" },
      hovertemplate: "epoch %{x}: %{y:.1%} of steps clipped<extra></extra>" },
    { x, y: col((r) => (clip(r).steps ? (clip(r).skipped_steps || 0) / clip(r).steps : 0)),
      name: "skipped (non-finite)", type: "bar", marker: { color: "#c53030" },
      hovertemplate: "epoch %{x}: %{y:.1%} skipped<extra></extra>" },
  ], layout({ barmode: "stack", yaxis: { title: { text: "share of steps" }, tickformat: ".0%",
    range: [0, 1.02] } }), CONFIG);
}

function renderEpochTable(history) {
  fill($("#epoch-table tbody"), ...history.map((r) => {
    const c = r.clipping || {};
    const pre = c.grad_norm_pre || {};
    const post = c.grad_norm_post || {};
    return el("tr", {}, [r.epoch, fmt(r.train_loss), pct(r.train_acc), fmt(r.val_loss),
      pct(r.val_acc), pct(c.clip_fraction), fmt(pre.mean), fmt(pre.max), fmt(post.mean),
      fmt(c.threshold), fmt(r.lr, 3), fmt(r.epoch_seconds, 3)]
      .map((v) => el("td", { class: "num", text: v })));
  }));
}

// --- sweeps: a grid of jobs, its leaderboard and per-setting curves ------------------------

const SWEEP_METRICS = ["val_acc", "best_val_loss", "final_val_loss", "epochs_to_90pct",
  "known_named", "strangers_rejected", "tpir_at_fpir_0.05", "skipped_steps", "clip_fraction",
  "grad_norm_pre", "grad_norm_post", "wall_seconds", "epsilon"];
const METRIC_NAMES = { val_acc: "val acc", best_val_loss: "best val loss",
  final_val_loss: "final val loss", epochs_to_90pct: "epochs to 90%", known_named: "known named",
  strangers_rejected: "strangers rejected", "tpir_at_fpir_0.05": "TPIR @ FPIR 0.05",
  skipped_steps: "skipped steps", clip_fraction: "steps clipped", grad_norm_pre: "norm pre",
  grad_norm_post: "norm post", wall_seconds: "seconds", epsilon: "ε" };
// a private job's guarantee: (ε, δ) for one person or one photo, and how it was reached
function privacyItem(item, asked, m) {
  if (!asked) return null;
  const rec = m.privacy;
  if (!rec) {
    return item("privacy", `DP-SGD per ${asked.unit || "person"}, ε so far ` +
      `${m.epsilon === undefined ? "–" : fmt(m.epsilon)} (δ ${asked.delta})`);
  }
  return item("privacy", `(ε ${fmt(rec.epsilon)}, δ ${rec.delta})-DP per ${rec.unit}: ` +
    `σ ${fmt(rec.noise_multiplier)}, q ${fmt(rec.sample_rate, 3)}, ${rec.steps_done} steps, ` +
    `${rec.accountant} accountant`);
}

/** One network's or descriptor's figures on the held-out people. */
const heldOutFigures = (f) =>
  `verify ${pct(f.verify_accuracy)}, TAR@FAR1% ${pct(f["verify_tar_at_far_0.01"])}`;

// the held-out people's verification, pretrained → fine-tuned, and the network the model kept
function fineTuningItem(item, ft) {
  if (!ft || !ft.pretrained || !ft.fine_tuned) return null;
  const v = heldOutFigures;
  // a share below 1: the fine-tuned network is that average of trained and pretrained weights
  const share = ft.fine_tuned_share != null && ft.fine_tuned_share < 1
    ? ` (${pct(ft.fine_tuned_share)} of the trained weights)` : "";
  const kept = ft.kept === "fine_tuned" ? "fine-tuned" : "pretrained";
  // descriptor 'auto' took fused: the two networks judged again, each beside SFace
  const f = ft.in_fused;
  const fused = f && f.pretrained && f.fine_tuned
    ? `; beside SFace ${v(f.pretrained)} → ${v(f.fine_tuned)}` : "";
  return item("held-out people", `${(ft.held_out || []).length}: pretrained ${v(ft.pretrained)}` +
    ` → fine-tuned${share} ${v(ft.fine_tuned)}${fused}; kept ${kept}`);
}

/** Descriptor 'auto': flip_mean against fused on the held-out people, and the one kept. */
function descriptorItem(item, dc) {
  if (!dc || !dc.flip_mean || !dc.fused) return null;
  const v = heldOutFigures;
  return item("descriptor", `flip_mean ${v(dc.flip_mean)} → fused ${v(dc.fused)}; ` +
    `kept ${dc.chosen}`);
}

const PCT_METRICS = ["val_acc", "known_named", "strangers_rejected", "tpir_at_fpir_0.05",
  "clip_fraction"];
// the sweep form's clip modes, from GET /v1/clip-modes: each mode's main parameter at its
// default and bounds (and its scope where it has one); the baseline and norm ticked at first
let SWEEP_CLIPS = [];
const SWEEP_TICKED = ["none", "norm"];

/** The registered clip modes (GET /v1/clip-modes), fetched once. */
async function clipModeList() {
  if (!state.clipModes) {
    const modes = (await get("/v1/clip-modes")).items;
    state.clipModes = modes;
  }
  return state.clipModes;
}

function sweepClip(m) {
  const k = m.knob;
  return { mode: m.name, label: m.label, param: k ? k.name : null, value: k ? k.default : null,
    min: k ? k.minimum ?? k.exclusive_minimum : null,
    max: k ? k.maximum ?? k.exclusive_maximum : null,
    scope: m.fields.includes("scope"), checked: SWEEP_TICKED.includes(m.name) };
}
const PALETTE = ["#2f6fde", "#d9534f", "#1f8a4c", "#b7791f", "#7b4fd0", "#0f9aa8", "#c2417d",
  "#5a6b86", "#8a9a1f", "#e07b00"];
const sweepCache = { histories: {}, configs: {}, colors: {}, board: null, sweep: null };

/** A setting's colour: fixed the first time the page sees it, so re-ranking keeps colours. */
function settingColor(label) {
  const c = sweepCache.colors;
  if (!(label in c)) c[label] = PALETTE[Object.keys(c).length % PALETTE.length];
  return c[label];
}

function settingText(setting, label) {
  if (label) return label;  // the server's compact text: clip=norm:max_norm=5,scope=per_tensor
  return Object.entries(setting || {}).map(([k, v]) => {
    if (k === "clip") return clipText(v);
    if (k === "learning_rate") return `lr ${v}`;
    return `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`;
  }).join(", ") || "–";
}

function statText(name, s) {
  if (!s || s.mean === null || s.mean === undefined) return "–";
  const f = PCT_METRICS.includes(name) ? pct : (x) => fmt(x);
  return f(s.mean) + (s.sd !== null && s.sd !== undefined && (s.n || 0) > 1 ? ` ± ${f(s.sd)}`
    : "");
}

function sweepDone(p) {
  return (p.succeeded || 0) + (p.failed || 0) + (p.cancelled || 0);
}

function sweepCounts(p) {
  return ["queued", "running", "succeeded", "failed", "cancelled"].filter((k) => p[k])
    .map((k) => `${p[k]} ${k}`).join(" · ");
}

function metricOptions(select, chosen) {
  fill(select, ...SWEEP_METRICS.map((m) => el("option", { value: m,
    text: METRIC_NAMES[m] || m })));
  select.value = chosen || "val_acc";
}

/** The sweep form's choices from the server: clip modes (GET /v1/clip-modes) and
 * architectures (the job schema's), built once. */
async function buildSweepChoices() {
  if (SWEEP_CLIPS.length) return;
  const [modes, openapi] = await Promise.all([clipModeList(), get("/openapi.json")]);
  const body = openapi.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
  const arch = resolve(openapi, resolve(openapi, body).properties.architecture);
  const archSelect = $("#sw-architecture");
  fill(archSelect, ...arch.enum.map((a) => el("option", { value: a, text: a })));
  archSelect.value = arch.enum.includes("seed_cnn") ? "seed_cnn" : arch.default;
  $("#sw-architecture-help").textContent = firstLine(arch.description);
  SWEEP_CLIPS = modes.map(sweepClip);
  fill($("#sw-clips"), ...SWEEP_CLIPS.map((c) => el("div", { class: "clip-choice" },
    el("label", { title: CLIP_HELP[c.mode] || c.label },
      el("input", { type: "checkbox", id: `sw-clip-${c.mode}`, checked: !!c.checked }), c.mode),
    c.param ? el("label", { class: "muted", for: `sw-clip-${c.mode}-${c.param}` },
      c.param.replace(/_/g, " ")) : el("span", { class: "muted", text: "baseline" }),
    c.param ? el("input", { type: "number", step: "any", id: `sw-clip-${c.mode}-${c.param}`,
      value: c.value, min: c.min, max: c.max, title: CLIP_PARAM_HELP[c.param] }) : null,
    c.scope ? el("select", { id: `sw-clip-${c.mode}-scope`, title: CLIP_PARAM_HELP.scope },
      el("option", { value: "global", text: "global" }),
      el("option", { value: "per_tensor", text: "per_tensor" })) : null)));
}

function setupSweeps() {
  metricOptions($("#sw-metric"), "val_acc");
  $("#sweep-form").addEventListener("submit", submitSweep);
  $("#sweeps-refresh").addEventListener("click", () => loadSweeps().catch(failed));
  $("#sweep-metric").addEventListener("change", () => {
    if (state.sweepId) refreshSweep(state.sweepId, true).catch(failed);
  });
}

function readSweepForm() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const base = { dataset_id: $("#sw-dataset").value, architecture: $("#sw-architecture").value };
  for (const [key, id] of [["epochs", "#sw-epochs"], ["image_size", "#sw-image_size"],
    ["batch_size", "#sw-batch_size"]]) {
    if (num(id) !== null) base[key] = num(id);
  }
  const lrs = $("#sw-lrs").value.split(/[\s,;]+/).filter(Boolean).map(Number);
  if (lrs.some((x) => Number.isNaN(x))) throw new Error("learning rates: numbers separated by commas");
  if (!lrs.length && num("#sw-lr") !== null) base.learning_rate = num("#sw-lr");
  const clips = [];
  for (const c of SWEEP_CLIPS) {
    if (!$(`#sw-clip-${c.mode}`).checked) continue;
    const clip = { mode: c.mode };
    if (c.param) {
      const v = $(`#sw-clip-${c.mode}-${c.param}`).value;
      if (v !== "") clip[c.param] = Number(v);
    }
    if (c.scope) clip.scope = $(`#sw-clip-${c.mode}-scope`).value;
    clips.push(clip);
  }
  if (!clips.length) throw new Error("tick at least one clip mode to compare");
  const seeds = Math.max(1, num("#sw-seeds") || 1);
  const grid = { clip: clips, seed: [...Array(seeds).keys()] };
  if (lrs.length) grid.learning_rate = lrs;
  const name = $("#sw-name").value.trim() || [
    `clip ${clips.map((c) => c.mode + (SWEEP_CLIPS.find((x) => x.mode === c.mode).param
      ? ` ${c[SWEEP_CLIPS.find((x) => x.mode === c.mode).param]}` : "")).join(", ")}`,
    lrs.length ? `lr ${lrs.join(", ")}` : null,
    `${seeds} seed${seeds > 1 ? "s" : ""}`].filter(Boolean).join("; ");
  return { name: name.slice(0, 200), base, grid, metric: $("#sw-metric").value };
}

async function submitSweep(e) {
  e.preventDefault();
  const status = $("#sweep-form-status");
  status.className = "muted";
  if (!$("#sw-dataset").value) {
    notify("upload a dataset first (Datasets tab)", "error");
    return;
  }
  let body;
  try {
    body = readSweepForm();
  } catch (err) {
    status.className = "error";
    status.textContent = err.message;
    return;
  }
  $("#sweep-submit").disabled = true;
  status.textContent = "queueing …";
  try {
    const sweep = await post("/v1/sweeps", body);
    status.textContent = "";
    notify(`sweep ${sweep.name || short(sweep.id)} queued: ${(sweep.job_ids || []).length} jobs`);
    location.hash = `#sweep/${sweep.id}`;
  } catch (err) {
    status.className = "error";
    status.textContent = err.message;
    failed(err);
  } finally {
    $("#sweep-submit").disabled = false;
  }
}

async function loadSweeps() {
  const doc = await get("/v1/sweeps?limit=100");
  const body = $("#sweeps-table tbody");
  fill(body, ...doc.items.map((s) => {
    const p = s.progress || {};
    const jobs = p.jobs || (s.job_ids || []).length;
    return el("tr", { class: "click", onclick: () => { location.hash = `#sweep/${s.id}`; } },
      el("td", { text: s.name || "–" }),
      el("td", {}, el("span", { class: `badge ${s.status}`, text: s.status })),
      el("td", {}, el("span", { class: "minibar" },
        el("div", { style: `width:${Math.round(100 * (p.fraction || 0))}%` })),
      `${sweepDone(p)}/${jobs} jobs`),
      el("td", { text: METRIC_NAMES[s.metric] || s.metric || "–" }),
      el("td", { text: when(s.created_at) }),
      el("td", {}, el("a", { href: `#sweep/${s.id}` }, el("code", { text: short(s.id) }))));
  }));
  if (!doc.items.length) {
    fill(body, el("tr", {}, el("td", { colspan: 6, class: "muted",
      text: "no sweeps yet: start one above" })));
  }
}

function stopSweepPolling() {
  clearTimeout(state.sweepTimer);
  state.sweepTimer = null;
  state.sweepId = null;
}

function openSweep(id) {
  state.sweepId = id;
  sweepCache.histories = {};
  sweepCache.configs = {};
  sweepCache.colors = {};
  sweepCache.board = null;
  sweepCache.sweep = null;
  $("#sweep-id").textContent = short(id);
  $("#sweep-id").title = id;
  $("#sweep-name").textContent = "";
  $("#sweep-status").textContent = "…";
  $("#sweep-status").className = "badge";
  $("#sweep-cancel").hidden = true;
  fill($("#sweep-summary"));
  fill($("#sweep-board thead"));
  fill($("#sweep-board tbody"));
  fill($("#sweep-jobs tbody"));
  $("#sweep-metric").dataset.sweep = "";
  for (const c of document.querySelectorAll("#view-sweep .chart")) {
    if (window.Plotly) Plotly.purge(c);
    fill(c);
  }
  $("#sweep-cancel").onclick = async () => {
    try {
      const s = await post(`/v1/sweeps/${id}/cancel`);
      notify(`sweep cancelled: queued jobs dropped, a running one stops at its next step`);
      renderSweep(s);
    } catch (e) { failed(e); }
  };
  $("#sweep-csv").onclick = () => downloadCsv(id).catch(failed);
  const tick = async () => {
    if (state.sweepId !== id) return;
    let final = false;
    try {
      final = await refreshSweep(id, false);
    } catch (e) {
      failed(e);
      if (e.status === 404) return;
    }
    if (state.sweepId !== id || final) return;
    state.sweepTimer = setTimeout(tick, SWEEP_POLL_MS);
  };
  tick();
}

/** Fetch the sweep, its leaderboard and the histories of its jobs; draw. True when final. */
async function refreshSweep(id, boardOnly) {
  const select = $("#sweep-metric");
  let sweep = sweepCache.sweep;
  if (!boardOnly || !sweep) {
    sweep = await get(`/v1/sweeps/${id}`);
    if (state.sweepId !== id) return true;
    if (select.dataset.sweep !== id) {  // the first answer: rank by the sweep's own metric
      metricOptions(select, sweep.metric);
      select.dataset.sweep = id;
    }
  }
  const board = await get(`/v1/sweeps/${id}/leaderboard?metric=` +
    encodeURIComponent(select.value || sweep.metric || "val_acc"));
  if (state.sweepId !== id) return true;
  sweepCache.sweep = sweep;
  sweepCache.board = board;
  renderSweep(sweep);
  renderBoard(board);
  if (boardOnly) return SWEEP_FINAL.includes(sweep.status);
  // a finished job's history never changes: fetch it once
  const want = (sweep.job_ids || []).filter((j) => !(sweepCache.histories[j] &&
    TERMINAL.includes(sweepCache.histories[j].status)));
  const got = await Promise.all(want.map((j) => get(`/v1/jobs/${j}/metrics`)
    .catch(() => null)));
  const unknown = (sweep.job_ids || []).filter((j) => !sweepCache.configs[j]);
  const jobs = await Promise.all(unknown.map((j) => get(`/v1/jobs/${j}`).catch(() => null)));
  if (state.sweepId !== id) return true;
  want.forEach((j, i) => { if (got[i]) sweepCache.histories[j] = got[i]; });
  unknown.forEach((j, i) => { if (jobs[i]) sweepCache.configs[j] = jobs[i].config || {}; });
  renderSweepJobs(sweep, board);
  renderSweepCharts(sweep, board);
  return SWEEP_FINAL.includes(sweep.status);
}

async function downloadCsv(id) {
  const headers = {};
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers["X-API-Key"] = key;
  const metric = $("#sweep-metric").value || "val_acc";
  const r = await fetch(`/v1/sweeps/${id}/leaderboard?format=csv&metric=` +
    encodeURIComponent(metric), { headers });
  const text = await r.text();
  if (!r.ok) {
    let doc = null;
    try { doc = JSON.parse(text); } catch { doc = null; }
    throw new ApiError(r.status, detailText(doc, text, r.status));
  }
  const a = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/csv" })),
    download: `sweep-${short(id)}-${metric}.csv` });
  document.body.append(a);
  a.click();
  a.remove();
}

function renderSweep(sweep) {
  const status = $("#sweep-status");
  status.textContent = sweep.status;
  status.className = `badge ${sweep.status}`;
  $("#sweep-name").textContent = sweep.name || "";
  $("#sweep-cancel").hidden = SWEEP_FINAL.includes(sweep.status);
  const p = sweep.progress || {};
  const jobs = p.jobs || (sweep.job_ids || []).length;
  $("#sweep-bar").style.width = `${Math.round(100 * (p.fraction || 0))}%`;
  const base = sweep.base || {};
  const ds = state.datasets.find((d) => d.id === sweep.dataset_id);
  const grid = sweep.grid || {};
  const item = (label, ...value) => el("div", {}, el("b", { text: label }), ...value);
  fill($("#sweep-summary"),
    item("progress", el("span", { id: "sweep-progress",
      text: `${sweepDone(p)} of ${jobs} jobs finished` }),
    sweepCounts(p) ? ` (${sweepCounts(p)})` : ""),
    item("dataset", ds ? `${ds.name} ` : "", el("code", { text: short(sweep.dataset_id) })),
    item("base", Object.entries(base).filter(([k]) => k !== "dataset_id")
      .map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ") || "–"),
    item("grid", Object.entries(grid).map(([k, vs]) => `${(vs || []).length} × ${k}`)
      .join(" · ") || "–"),
    item("clip modes", (grid.clip || []).map(clipText).join(" | ") || "–"),
    item("ranked by", METRIC_NAMES[sweep.metric] || sweep.metric || "–"),
    item("created", when(sweep.created_at)),
    item("finished", when(sweep.finished_at)),
  );
}

function renderBoard(board) {
  const metric = board.metric;
  const others = SWEEP_METRICS.filter((m) => m !== metric);
  const best = board.direction === "min" ? "lowest first" : "highest first";
  fill($("#sweep-board thead"), el("tr", {},
    el("th", { text: "#" }), el("th", { text: "setting" }),
    el("th", { class: "num", text: "runs" }), el("th", { class: "num", text: "succeeded" }),
    el("th", { class: "num", text: "failed" }),
    el("th", { class: "num metric", text: `${METRIC_NAMES[metric] || metric} (${best})` }),
    ...others.map((m) => el("th", { class: "num", text: METRIC_NAMES[m] || m }))));
  const rows = board.rows || [];
  fill($("#sweep-board tbody"), ...rows.map((r, i) => {
    const ms = r.metrics || {};
    return el("tr", {},
      el("td", { text: i + 1 }),
      el("td", { class: "setting" }, el("span", { class: "swatch",
        style: `background:${settingColor(settingText(r.setting, r.label))}` }),
      settingText(r.setting, r.label)),
      el("td", { class: "num", text: r.runs }), el("td", { class: "num", text: r.succeeded }),
      el("td", { class: "num", text: r.failed }),
      el("td", { class: "num metric", text: statText(metric, ms[metric]) }),
      ...others.map((m) => el("td", { class: "num", text: statText(m, ms[m]) })));
  }));
  if (!rows.length) {
    fill($("#sweep-board tbody"), el("tr", {}, el("td", { colspan: 6 + others.length,
      class: "muted", text: "no settings yet" })));
  }
}

/** Each job's setting label and colour, from the leaderboard's rows (ranked order). */
function jobSettings(board) {
  const out = {};
  for (const r of board.rows || []) {
    const label = settingText(r.setting, r.label);
    for (const j of r.job_ids || []) out[j] = { label, color: settingColor(label) };
  }
  return out;
}

function renderSweepJobs(sweep, board) {
  const settings = jobSettings(board);
  fill($("#sweep-jobs tbody"), ...(sweep.job_ids || []).map((j) => {
    const h = sweepCache.histories[j] || { history: [], status: "…" };
    const s = settings[j] || { label: "–" };
    const cfg = sweepCache.configs[j] || {};
    const last = h.history[h.history.length - 1] || {};
    return el("tr", { class: "click", onclick: () => { location.hash = `#job/${j}`; } },
      el("td", {}, el("span", { class: `badge ${h.status}`, text: h.status })),
      el("td", {}, s.color ? el("span", { class: "swatch", style: `background:${s.color}` })
        : null, s.label),
      el("td", { text: cfg.seed ?? "–" }),
      el("td", { text: `${h.history.length}/${cfg.epochs ?? "?"}` }),
      el("td", { class: "num", text: pct(last.val_acc) }),
      el("td", {}, el("a", { href: `#job/${j}` }, el("code", { text: short(j) }))));
  }));
}

/** Mean over runs, epoch by epoch (runs without that epoch left out). */
function meanCurve(runs, value) {
  const byEpoch = new Map();
  for (const hist of runs) {
    for (const r of hist) {
      const v = value(r);
      if (typeof v !== "number" || !Number.isFinite(v)) continue;
      if (!byEpoch.has(r.epoch)) byEpoch.set(r.epoch, []);
      byEpoch.get(r.epoch).push(v);
    }
  }
  const x = [...byEpoch.keys()].sort((a, b) => a - b);
  return { x, y: x.map((e) => byEpoch.get(e).reduce((a, b) => a + b, 0) / byEpoch.get(e).length) };
}

function renderSweepCharts(sweep, board) {
  const ids = ["sweep-chart-acc", "sweep-chart-loss", "sweep-chart-pre", "sweep-chart-post"];
  if (!window.Plotly) {
    for (const c of ids) {
      fill($(`#${c}`), el("p", { class: "muted", text: "charts need plotly.js: the server " +
        "serves it from the 'plotly' Python package (pip install plotly)" }));
    }
    return;
  }
  const clip = (r) => r.clipping || {};
  const groups = (board.rows || []).map((r) => ({
    name: settingText(r.setting, r.label), color: settingColor(settingText(r.setting, r.label)),
    runs: (r.job_ids || []).map((j) => (sweepCache.histories[j] || {}).history || [])
      .filter((h) => h.length) }));
  const any = groups.some((g) => g.runs.length);
  const waiting = any ? [] : [{ text: sweep.status === "queued" ? "queued …"
    : "waiting for the first epoch …", showarrow: false, xref: "paper", yref: "paper",
  x: 0.5, y: 0.5, font: { size: 13, color: "#6b7383" } }];
  const maxEpoch = Math.max(0, ...groups.flatMap((g) => g.runs.map((h) => h.length)));
  const layout = (extra) => ({ ...LAYOUT, annotations: waiting, showlegend: true, ...extra,
    xaxis: { ...LAYOUT.xaxis, ...(maxEpoch > 20 ? { dtick: undefined } : {}) } });
  const chart = (id, value, yaxis, extraTraces = () => []) => {
    const traces = [];
    for (const g of groups) {
      if (!g.runs.length) continue;
      if (g.runs.length > 1) {  // each run thin, under the mean
        for (const h of g.runs) {
          traces.push(line(h.map((r) => r.epoch), h.map((r) => value(r) ?? null), g.name, {
            mode: "lines", legendgroup: g.name, showlegend: false, hoverinfo: "skip",
            opacity: 0.3, line: { color: g.color, width: 1 } }));
        }
      }
      const m = meanCurve(g.runs, value);
      traces.push(line(m.x, m.y, g.runs.length > 1 ? `${g.name} (mean of ${g.runs.length})`
        : g.name, { legendgroup: g.name, line: { color: g.color, width: 2.5 } }));
      traces.push(...extraTraces(g));
    }
    Plotly.react(id, traces, layout({ yaxis }), CONFIG);
  };
  chart("sweep-chart-acc", (r) => r.val_acc,
    { title: { text: "validation accuracy" }, tickformat: ".0%", range: [0, 1.02] });
  chart("sweep-chart-loss", (r) => r.val_loss, { title: { text: "validation cross-entropy" } });
  const pre = (r) => (clip(r).grad_norm_pre || {}).mean;
  const post = (r) => (clip(r).grad_norm_post || {}).mean;
  const all = groups.flatMap((g) => g.runs.flat()).flatMap((r) => [pre(r), post(r),
    clip(r).threshold]).filter((v) => typeof v === "number" && v > 0);
  const logY = all.length && Math.max(...all) / Math.min(...all) > 30;
  const normAxis = { title: { text: "global L2 norm" }, type: logY ? "log" : "linear" };
  const threshold = (g) => {
    const t = meanCurve(g.runs, (r) => clip(r).threshold);
    return t.x.length ? [line(t.x, t.y, `${g.name}: threshold`, { legendgroup: g.name,
      line: { color: g.color, dash: "dash", width: 1.5 }, marker: { size: 4, symbol: "x" } })]
      : [];
  };
  chart("sweep-chart-pre", pre, normAxis, threshold);
  chart("sweep-chart-post", post, normAxis, threshold);
}

// --- identify ------------------------------------------------------------------------------

async function loadModels() {
  const doc = await get("/v1/models?limit=100");
  state.models = doc.items;
  const sel = $("#id-model");
  const keep = state.preferModel || sel.value;
  fill(sel, ...doc.items.map((m, i) => el("option", { value: m.id,
    text: `${short(m.id)} — ${m.architecture}, ${m.labels.length} identities, val acc ` +
      `${pct((m.metrics || {}).val_acc)}, clip ${clipText(m.clip)}${i === 0 ? " (newest)" : ""}` })));
  if (keep && doc.items.some((m) => m.id === keep)) sel.value = keep;
  state.preferModel = null;
  if (!doc.items.length) {
    fill(sel, el("option", { value: "", text: "no model yet: train one (Jobs tab)" }));
  }
}

function setupIdentify() {
  dropZone($("#id-drop"), $("#id-file"), identifyFiles);
}

async function identifyFiles(files) {
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const model = $("#id-model").value;
  if (model) form.append("model_id", model);
  const k = $("#id-topk").value;
  if (k) form.append("top_k", k);
  const t = $("#id-threshold").value;
  if (t !== "") form.append("threshold", t);
  $("#id-status").textContent = `identifying ${files.length} image(s) …`;
  try {
    const doc = await post("/v1/identify", form);
    $("#id-status").textContent = `model ${short(doc.model_id)}, threshold ${fmt(doc.threshold, 3)}`;
    const cards = await Promise.all(doc.results.map((res, i) => resultCard(res, files[i])));
    fill($("#id-results"), ...cards);
  } catch (e) {
    $("#id-status").textContent = "";
    failed(e);
  }
}

async function resultCard(res, file) {
  const canvas = el("canvas");
  try {
    const bmp = await createImageBitmap(file);
    const scale = Math.min(1, 480 / Math.max(bmp.width, bmp.height));
    canvas.width = Math.round(bmp.width * scale);
    canvas.height = Math.round(bmp.height * scale);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
    ctx.lineWidth = Math.max(2, canvas.width / 120);
    ctx.font = `${Math.max(12, canvas.width / 18)}px sans-serif`;
    res.faces.forEach((f, n) => {
      if (!f.box) return;
      const [bx, by, bw, bh] = f.box.map((v) => v * scale);
      ctx.strokeStyle = f.identity === null ? "#e0a000" : "#2f6fde";
      ctx.strokeRect(bx, by, bw, bh);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillText(String(n + 1), bx + 3, by + parseInt(ctx.font, 10));
    });
  } catch {
    canvas.width = 0; // a format the browser cannot draw (e.g. PGM): the answer still shows
  }
  const faces = res.faces.map((f, n) => el("div", { class: "face" },
    el("div", {},
      res.faces.length > 1 ? el("span", { class: "muted", text: `face ${n + 1}: ` }) : null,
      el("span", { class: `who${f.identity === null ? " unknown" : ""}`,
        text: f.identity === null ? "unknown" : f.identity }),
      el("span", { class: "conf", text: `confidence ${fmt(f.confidence, 3)}` })),
    el("div", { class: "cands" }, f.candidates.map((c, i) => el("div", {
      class: `cand${i === 0 && f.identity !== null ? " top" : ""}` },
    el("span", { class: "name", text: c.identity, title: c.identity }),
    el("span", { class: "track" }, el("div", {
      style: `width:${Math.max(0, Math.min(100, 100 * c.confidence)).toFixed(1)}%` })),
    el("span", { class: "v", text: c.confidence.toFixed(3) }))))));
  return el("div", { class: "card result" },
    el("div", { class: "pic" }, canvas),
    el("div", { class: "faces" },
      el("h3", { text: res.filename }),
      faces.length ? faces : el("div", { class: "muted", text: res.note || "no face found" })));
}

// --- start ---------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  setupDatasets();
  setupIdentify();
  setupSweeps();
  checkReady();
  setInterval(() => { if (!document.hidden) checkReady(); }, 15000);
  route();
});
