// cxrembed serve: the page. Plain JS, no build step; every string from the server or the
// user goes into the DOM as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: null, store: null, lastQuery: null };

function readToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("cxrembed-token", fromHash);
    history.replaceState(null, "", location.pathname);
  }
  state.token = sessionStorage.getItem("cxrembed-token");
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function thumbUrl(imageId) {
  const url = "/api/thumb/" + encodeURIComponent(imageId);
  return state.token ? url + "?token=" + encodeURIComponent(state.token) : url;
}

function options() {
  const params = new URLSearchParams({ k: $("k").value });
  if ($("split").value) params.set("split", $("split").value);
  if ($("exclude-patient").checked) params.set("exclude_same_patient", "1");
  return params;
}

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------------------------
// Queries

function showQueryImage(query) {
  const preview = $("query-preview");
  if (query.kind === "image") return;  // useFile showed the file itself
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  if (query.kind === "id") {
    preview.src = thumbUrl(query.value);
    preview.alt = "query image " + query.value;
    preview.hidden = false;
    $("drop-text").textContent = "query: " + query.value;
  } else {
    preview.removeAttribute("src");
    preview.hidden = true;
    $("drop-text").replaceChildren(el("strong", "", "Drop an image"),
                                   " or press Enter to pick one");
  }
}

async function run(query) {
  state.lastQuery = query;
  showQueryImage(query);
  setStatus("searching…");
  const started = performance.now();
  try {
    let result;
    if (query.kind === "image") {
      const form = new FormData();
      form.append("image", query.file, query.file.name);
      result = await api("/api/search?" + options(), { method: "POST", body: form });
    } else {
      const params = options();
      params.set(query.kind === "id" ? "id" : "text", query.value);
      result = await api("/api/search?" + params);
    }
    const ms = Math.round(performance.now() - started);
    showResults(result, ms);
    if (query.kind !== "image") rememberInUrl(query);
  } catch (error) {
    setStatus(error.message, true);
  }
  if (query.kind === "image" && state.store && state.store.predictor) predict(query.file);
  else $("prediction").hidden = true;
}

async function predict(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    showPrediction(await api("/api/predict", { method: "POST", body: form }));
  } catch (error) {
    $("prediction").hidden = false;
    $("scores").replaceChildren(el("li", "error", error.message));
  }
}

// The address holds the last id or text query and its filters, so a view can be shared
// or reloaded: /?text=effusion&split=test&k=24&exclude_same_patient=1
function rememberInUrl(query) {
  const params = options();
  params.set(query.kind === "id" ? "id" : "text", query.value);
  history.replaceState(null, "", location.pathname + "?" + params);
}

function queryFromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.get("split")) $("split").value = params.get("split");
  const k = params.get("k");
  if (k && /^\d+$/.test(k)) {
    if (![...$("k").options].some((o) => o.value === k)) $("k").append(new Option(k, k));
    $("k").value = k;
  }
  $("exclude-patient").checked = ["1", "true"].includes(params.get("exclude_same_patient"));
  if (params.get("id")) {
    $("image-id").value = params.get("id");
    return { kind: "id", value: params.get("id") };
  }
  if (params.get("text")) {
    $("text").value = params.get("text");
    return { kind: "text", value: params.get("text") };
  }
  return null;
}

function describeQuery(query) {
  if (query.kind === "text") return `“${query.value}”`;
  if (query.kind === "id") return `${query.value} (patient ${query.patient_id})`;
  return `the image ${query.value}` + (query.patient_id != null ? ` (patient ${query.patient_id})` : "");
}

// ------------------------------------------------------------------------------------
// Rendering

function showResults(result, ms) {
  const hits = result.hits;
  const filters = [];
  if ($("split").value) filters.push(`${$("split").value} only`);
  if ($("exclude-patient").checked) filters.push("other patients only");
  $("results-title").hidden = false;
  $("results-title").textContent = `${hits.length} nearest to ${describeQuery(result.query)}` +
    (filters.length ? ` · ${filters.join(", ")}` : "");
  setStatus(`${hits.length} results in ${ms} ms`);
  const cards = hits.map((hit) => card(hit));
  $("results").replaceChildren(...cards);
}

function card(hit) {
  const item = el("li");
  const button = el("button", "card");
  button.type = "button";
  button.title = `Search from ${hit.image_id}`;
  button.setAttribute("aria-label",
    `#${hit.rank} ${hit.image_id}, similarity ${hit.similarity.toFixed(3)}, ` +
    `${hit.labels.length ? hit.labels.join(", ") : "no finding"}; search from it`);
  const img = el("img", "thumb");
  img.alt = "";
  img.loading = "lazy";
  img.src = thumbUrl(hit.image_id);
  img.addEventListener("error", () => img.replaceWith(el("div", "thumb missing", "image not found")));
  const head = el("div", "line");
  head.append(el("span", "rank", `#${hit.rank}`), el("span", "sim", hit.similarity.toFixed(4)));
  const bar = el("div", "bar");
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(1, hit.similarity)) * 100}%`;
  bar.append(fill);
  const labels = el("div", "labels");
  if (hit.labels.length) hit.labels.forEach((name) => labels.append(el("span", "chip", name)));
  else labels.append(el("span", "chip none", "No Finding"));
  const meta = el("div", "meta muted",
    `${hit.image_id} · patient ${hit.patient_id} · ${hit.split} · ${hit.view}`);
  button.append(img, head, bar, labels, meta);
  button.addEventListener("click", () => {
    $("image-id").value = hit.image_id;
    run({ kind: "id", value: hit.image_id });
  });
  item.append(button);
  return item;
}

function showPrediction(result) {
  $("prediction").hidden = false;
  const head = result.head;
  $("prediction-source").textContent = `· ${head.kind} head ${head.source}` +
    (head.calibration && head.calibration !== "none" ? `, ${head.calibration} calibration` : "") +
    (head.threshold_rule ? `, thresholds: ${head.threshold_rule}` : "");
  $("prediction-note").textContent = head.note ||
    "bar: probability; mark: the class's threshold; bold: called positive";
  const known = (s) => (s.score == null ? -1 : s.score);
  const rows = [...result.scores].sort((a, b) => known(b) - known(a)).map((s) => {
    const row = el("li", s.positive ? "positive" : "");
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = `${(s.score || 0) * 100}%`;
    bar.append(fill);
    if (s.threshold != null) {
      const mark = el("i", "threshold");
      mark.style.left = `${s.threshold * 100}%`;
      mark.title = `threshold ${s.threshold.toFixed(3)}`;
      bar.append(mark);
    }
    const value = (s.score == null ? "n/a" : s.score.toFixed(3)) +
      (s.threshold != null ? ` / ${s.threshold.toFixed(3)}` : "");
    const name = el("span", "name", s.label + (s.positive ? " ✓" : ""));
    row.title = s.score == null ? "not calibrated (too few validation positives)" :
      `probability ${s.score.toFixed(4)}` + (s.threshold != null ?
        `, threshold ${s.threshold.toFixed(4)}` : "") + (s.positive ? ": positive" : "");
    row.append(name, bar, el("span", "value", value));
    return row;
  });
  $("scores").replaceChildren(...rows);
}

function showStore(store) {
  state.store = store;
  const splits = Object.entries(store.splits).map(([s, n]) => `${s} ${n.toLocaleString()}`);
  $("store-info").textContent =
    `${store.store}: ${store.images.toLocaleString()} images of ` +
    `${store.patients.toLocaleString()} patients (${splits.join(", ")}) · ${store.model} · ` +
    `index ${store.index.kind}` +
    ` · ${store.centring.centred ? "centred" : "uncentred"} vectors` +
    (store.predictor ? ` · head ${store.predictor.source}` : "");
  $("store-info").title = `similarity: cosine of ${store.centring.centred ? "centred" :
    "uncentred"} vectors (${store.centring.reason})`;
  $("id-examples").replaceChildren(...store.examples.map((id) => {
    const option = el("option"); option.value = id; return option;
  }));
  if (!store.text_queries) {
    $("text").disabled = true;
    $("text").placeholder = "this store's encoder has no text tower";
  }
  if (store.examples.length) $("image-id").placeholder = "e.g. " + store.examples[0];
}

// ------------------------------------------------------------------------------------
// Input

function useFile(file) {
  if (!file) return;
  const dicom = /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
  if (!dicom && !/^image\/(png|jpeg)$/.test(file.type)) {
    setStatus(`${file.name} is not a PNG, JPEG or DICOM image`, true);
    return;
  }
  const preview = $("query-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  if (dicom) {  // browsers cannot show DICOM: the server decodes it
    preview.removeAttribute("src");
    preview.hidden = true;
  } else {
    preview.src = URL.createObjectURL(file);
    preview.alt = "query image " + file.name;
    preview.hidden = false;
  }
  $("drop-text").textContent = file.name;
  run({ kind: "image", file });
}

function wire() {
  const drop = $("drop");
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("image-file").click(); }
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
  $("image-file").addEventListener("change", (event) => useFile(event.target.files[0]));
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (text) run({ kind: "text", value: text });
  });
  $("id-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("image-id").value.trim();
    if (id) run({ kind: "id", value: id });
  });
  for (const id of ["split", "k", "exclude-patient"]) {
    $(id).addEventListener("change", () => { if (state.lastQuery) run(state.lastQuery); });
  }
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing) { event.preventDefault(); $("text").focus(); }
  });
}

async function start() {
  readToken();
  wire();
  try {
    showStore(await api("/api/store"));
  } catch (error) {
    $("store-info").textContent = "";
    setStatus(error.message, true);
    return;
  }
  const query = queryFromUrl();
  if (query) run(query);
}

start();
