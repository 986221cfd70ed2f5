// medge field app: the page a phone opens. Plain JavaScript, no build step, nothing from the internet.
// Routes (in the URL hash, so a reload stays where it was): #/malaria, #/cells, #/oct, #/cases, #/case/<id>.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { health: null, malariaFiles: [], malariaDupes: [], octFile: null, busy: false };

// ------------------------------------------------------------ small helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function pct(v) { return v === null || v === undefined ? "n/a" : `${Number(v).toFixed(1)}%`; }
function when(iso) {
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

const NETWORK_MESSAGE = "Cannot reach the device. Check that this phone is on the device's Wi-Fi or network, then try again.";

async function api(path, options) {
  let resp;
  try {
    resp = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  } catch (e) {
    throw new ApiError(0, NETWORK_MESSAGE);
  }
  if (resp.status === 204) return null;
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new ApiError(resp.status, (body && body.error) || `The device answered with an error (${resp.status}).`);
  return body;
}

function showError(err) {
  if (err && err.status === 401) { showCodeView(); return; }
  const box = $("#error");
  box.textContent = (err && err.message) || String(err);
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}
function clearError() { $("#error").hidden = true; $("#error").textContent = ""; }

// ------------------------------------------------------------ progress

let progressTimer = null;
function progress(text, fraction) {
  const box = $("#progress");
  box.hidden = false;
  $("#progress-text").textContent = text;
  const bar = $("#progress-bar");
  if (fraction === null || fraction === undefined) bar.parentElement.classList.add("indeterminate");
  else { bar.parentElement.classList.remove("indeterminate"); bar.style.width = `${Math.round(fraction * 100)}%`; }
}
function analysing(what) {
  const t0 = Date.now();
  clearInterval(progressTimer);
  const tick = () => progress(`Analysing ${what}… ${Math.round((Date.now() - t0) / 1000)} s`, null);
  tick();
  progressTimer = setInterval(tick, 1000);
}
function progressDone() { clearInterval(progressTimer); $("#progress").hidden = true; }

// Upload with XMLHttpRequest: fetch cannot report upload progress.
function upload(form) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/cases");
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) progress(`Sending photos… ${Math.round(100 * e.loaded / e.total)}%`, e.loaded / e.total);
    };
    xhr.upload.onload = () => analysing(form.get("kind") === "oct" ? "the scan" : `${form.getAll("files").length} field photo(s)`);
    xhr.onerror = () => reject(new ApiError(0, NETWORK_MESSAGE));
    xhr.onload = () => {
      const body = xhr.response;
      if (xhr.status === 201) resolve(body);
      else reject(new ApiError(xhr.status, (body && body.error) || `The device answered with an error (${xhr.status}).`));
    };
    xhr.send(form);
  });
}

// ------------------------------------------------------------ views

const VIEWS = ["code-view", "malaria-view", "cells-view", "oct-view", "cases-view", "case-view"];
function show(id, tab) {
  for (const v of VIEWS) document.getElementById(v).hidden = v !== id;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === tab);
}

function showCodeView() {
  show("code-view", null);
  $("#code-input").focus();
}

// The tabs that need a model on the device; one without its model is hidden (the Cases tab is always there).
const MODEL_TABS = ["malaria", "cells", "oct"];
function hasTab(tab) { return !state.health || tab in (state.health.models || {}); }
function firstTab() { return MODEL_TABS.find(hasTab) || "cases"; }
function showTabs() {
  for (const a of document.querySelectorAll("nav a")) {
    if (MODEL_TABS.includes(a.dataset.tab)) a.hidden = !hasTab(a.dataset.tab);
  }
}

async function route() {
  clearError();
  const hash = location.hash || `#/${firstTab()}`;
  const tab = (hash.match(/^#\/(malaria|cells|oct)$/) || [])[1];
  if (tab && !hasTab(tab)) { location.replace(`#/${firstTab()}`); return; }
  const m = hash.match(/^#\/case\/([0-9a-f-]+)$/);
  try {
    if (m) {
      show("case-view", "cases");
      $("#case-view").replaceChildren(el("p", { class: "muted", text: "Opening the case…" }));
      renderCase(await api(`/api/cases/${m[1]}`));
    } else if (hash === "#/cases") {
      show("cases-view", "cases");
      await loadCases();
    } else if (hash === "#/cells") {
      show("cells-view", "cells");
      await phoneModel();
    } else if (hash === "#/oct") {
      show("oct-view", "oct");
    } else if (hasTab("malaria")) {
      show("malaria-view", "malaria");
    } else {
      location.replace(`#/${firstTab()}`);
    }
  } catch (err) {
    showError(err);
  }
}

// ------------------------------------------------------------ picking photos

function thumbs(list, files, onRemove) {
  list.replaceChildren(...files.map((f, i) => {
    const url = URL.createObjectURL(f);
    const img = el("img", { src: url, alt: f.name });
    img.onload = () => URL.revokeObjectURL(url);
    const rm = el("button", { type: "button", class: "remove", "aria-label": `remove ${f.name}`, text: "×" });
    rm.onclick = () => onRemove(i);
    return el("li", {}, img, el("span", { text: `${i + 1}. ${f.name}` }), rm);
  }));
}

function refreshMalariaList() {
  thumbs($("#malaria-list"), state.malariaFiles, (i) => { state.malariaFiles.splice(i, 1); refreshMalariaList(); });
  $("#malaria-submit").textContent = state.malariaFiles.length > 1
    ? `Analyse slide (${state.malariaFiles.length} fields)` : "Analyse slide";
  const dupes = $("#malaria-dupes");
  dupes.replaceChildren(...state.malariaDupes.map((t) => el("p", { text: t })));
  dupes.hidden = !state.malariaDupes.length;
}
function refreshOctList() {
  thumbs($("#oct-list"), state.octFile ? [state.octFile] : [], () => { state.octFile = null; refreshOctList(); });
}

// The photo already in the list with the same bytes as `f` (compared byte for byte, only against photos of the
// same size; no hashing, which a plain-HTTP page cannot do with crypto.subtle), or null.
async function samePhoto(f, list) {
  const bytes = new Uint8Array(await f.arrayBuffer());
  for (const g of list) {
    if (g.size !== f.size) continue;
    const other = new Uint8Array(await g.arrayBuffer());
    if (other.every((b, i) => b === bytes[i])) return g;
  }
  return null;
}

async function addMalaria(input) {
  const picked = [...input.files];
  input.value = "";
  await addMalariaFiles(picked);
}
async function addMalariaFiles(picked) {
  const max = state.health ? state.health.limits.max_files : 12;
  for (const f of picked) {
    const same = await samePhoto(f, state.malariaFiles);
    if (same) {  // the device would count it once too (by sha256): say so now rather than send it
      state.malariaDupes.push(`Photo “${f.name}” is the same as photo “${same.name}”: counted once.`);
      continue;
    }
    if (state.malariaFiles.length >= max) { showError(new ApiError(413, `At most ${max} photos per slide.`)); break; }
    state.malariaFiles.push(f);
  }
  refreshMalariaList();
}

// ------------------------------------------------------------ the live camera (secure context only)

// Over HTTPS (or on the device itself) the page opens the rear camera and adds frames as field photos. On plain
// HTTP there is no getUserMedia: "Take photo" is the <input capture> that opens the phone's camera app.
const camera = { stream: null, shots: 0 };

function setupCamera() {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return;
  $("#malaria-live").hidden = false;
  $("#malaria-camera-label").hidden = true;
  $("#malaria-live").addEventListener("click", openCamera);
  $("#camera-shot").addEventListener("click", captureField);
  $("#camera-done").addEventListener("click", closeCamera);
}

async function openCamera() {
  clearError();
  if (camera.stream) return;
  try {
    camera.stream = await navigator.mediaDevices.getUserMedia({ audio: false,
      video: { facingMode: { ideal: "environment" }, width: { ideal: 4096 }, height: { ideal: 3072 } } });
  } catch (err) {  // refused, no camera, or busy: the phone's camera app instead
    $("#malaria-live").hidden = true;
    $("#malaria-camera-label").hidden = false;
    showError(new ApiError(0, `The camera could not be opened here (${err.name}). “Take photo” now opens the phone's camera app.`));
    return;
  }
  const video = $("#camera-video");
  video.srcObject = camera.stream;
  $("#camera").hidden = false;
  $("#camera-status").textContent = "Point the phone at the eyepiece, then “Add this field” for each field.";
  try { await video.play(); } catch (err) { console.warn(`camera preview: ${err.message}`); }
}

function captureField() {
  const video = $("#camera-video");
  if (!camera.stream || !video.videoWidth) { $("#camera-status").textContent = "The camera is still starting…"; return; }
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob(async (blob) => {
    if (!blob) { showError(new ApiError(0, "This frame could not be kept; try again.")); return; }
    camera.shots += 1;
    await addMalariaFiles([new File([blob], `camera-${camera.shots}.jpg`, { type: "image/jpeg", lastModified: Date.now() })]);
    $("#camera-status").textContent = `Field ${state.malariaFiles.length} added (${canvas.width}×${canvas.height}). ` +
      "Move to the next field and add it, or “Done”.";
  }, "image/jpeg", 0.92);
}

function closeCamera() {
  if (camera.stream) for (const t of camera.stream.getTracks()) t.stop();
  camera.stream = null;
  $("#camera-video").srcObject = null;
  $("#camera").hidden = true;
}

// ------------------------------------------------------------ the page kept on the phone (HTTPS only)

// Registered over HTTPS only: a phone on plain HTTP has no service worker, and the device's own loopback page
// (a secure context too) has no need of one.
function registerServiceWorker() {
  if (location.protocol !== "https:" || !("serviceWorker" in navigator)) return;
  navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch((err) => {
    // Typically: the phone went past the certificate warning instead of trusting the device's CA.
    console.warn(`the page will not be kept on this phone: ${err.message}`);
    $("#secure-link").replaceChildren("This page is not kept on this phone for use without the device: ",
      "the phone does not trust the device's certificate. Install ", el("a", { href: "/ca.crt", text: "the certificate" }),
      " and trust it, then reload.");
    $("#secure-link").hidden = false;
  });
}

// On the plain-HTTP page of a device started with --https: where the secure page is, and its certificate.
function secureLink() {
  const https = state.health && state.health.https;
  if (!https || location.protocol === "https:") return;
  const secure = new URL("/", location.href);  // this host, HTTPS, the device's HTTPS port
  secure.protocol = "https:";
  secure.port = String(https.port);
  $("#secure-link").replaceChildren("Camera and offline page: ", el("a", { href: secure.href, text: secure.href }),
    " (first install ", el("a", { href: https.ca_cert, text: "the device's certificate" }), ")");
  $("#secure-link").hidden = false;
}

async function submitCase(kind, formEl, files) {
  if (state.busy) return;
  clearError();
  if (!files.length) {
    showError(new ApiError(400, kind === "oct" ? "Choose a scan first." : "Take or choose at least one field photo first."));
    return;
  }
  if (kind === "malaria") closeCamera();
  const form = new FormData();
  form.append("kind", kind);
  form.append("subject", formEl.elements.subject.value);
  form.append("note", formEl.elements.note.value);
  for (const f of files) form.append("files", f, f.name);
  await sendCase(form, () => {
    formEl.reset();
    if (kind === "oct") { state.octFile = null; refreshOctList(); }
    else { state.malariaFiles = []; state.malariaDupes = []; refreshMalariaList(); }
  });
}

// Upload a case (a new one or a retake), then open it; `done` runs once the device has stored it.
async function sendCase(form, done) {
  state.busy = true;
  for (const b of document.querySelectorAll("form button[type=submit]")) b.disabled = true;
  progress("Sending photos… 0%", 0);
  try {
    const c = await upload(form);
    if (done) done(c);
    location.hash = `#/case/${c.id}`;  // the route renders it (and a reload finds it again)
  } catch (err) {
    showError(err);
  } finally {
    progressDone();
    state.busy = false;
    for (const b of document.querySelectorAll("form button[type=submit]")) b.disabled = false;
  }
}

// Retake field k of case c: a new case from the case's other photos (fetched back from the device, under their
// names) and the new photo in field k's place, linked to the old case (retake_of). The old case is not changed.
async function retakeField(c, k, file) {
  if (state.busy || !file) return;
  clearError();
  const form = new FormData();
  form.append("kind", "malaria");
  form.append("subject", c.subject || "");
  form.append("note", c.note || "");
  form.append("retake_of", c.id);
  try {
    progress("Fetching the case's other photos…", null);
    for (const [i, f] of c.result.fields.entries()) {
      if (i === k) { form.append("files", file, file.name); continue; }
      let resp;
      try { resp = await fetch(c.file_urls[f.photo], { credentials: "same-origin" }); }
      catch (e) { throw new ApiError(0, NETWORK_MESSAGE); }
      if (!resp.ok) throw new ApiError(resp.status, `The photo “${f.name}” could not be fetched from the device (${resp.status}).`);
      form.append("files", await resp.blob(), f.name);
    }
  } catch (err) {
    progressDone();
    showError(err);
    return;
  }
  await sendCase(form);
}

// ------------------------------------------------------------ one case

function modelLine(m) {
  if (!m) return null;
  return el("details", { class: "model" },
    el("summary", {}, `Model: ${m.name} ${m.format}, version ${m.version}, sha256 ${String(m.sha256).slice(0, 12)}…`),
    el("p", {}, `file ${m.file} · ${m.backend} · threshold ${m.threshold}`),
    el("p", { class: "mono" }, `sha256 ${m.sha256}`),
    m.created ? el("p", {}, `exported ${m.created}`) : null);
}

function figure(url, alt, caption, cls) {
  return el("figure", { class: cls || null },
    el("a", { href: url, target: "_blank", rel: "noopener" }, el("img", { src: url, alt: alt })),
    caption ? el("figcaption", {}, caption) : null);
}

function caseLine(c) {
  return [
    el("p", { class: "muted" }, `Case ${c.id} · ${when(c.created)}`, c.subject ? ` · ${c.subject}` : ""),
    c.note ? el("p", { class: "note", text: c.note }) : null,
  ];
}

// The verdict a health worker acts on (the device's `report`, edge_runtime/serve/verdict.py): the call, on what
// evidence, what to do, the count toward the counting rule, the time taken.
function verdictBlock(c) {
  const v = c.report, p = v.progress;
  let bar = null;
  if (p) {
    const meter = el("progress", { id: "count-bar", max: p.needed, value: Math.min(p.counted, p.needed) });
    bar = el("div", { class: "count", id: "count-progress" }, meter,
      el("p", { id: "count-text", text: p.text }), el("p", { class: "muted", text: `Counting rule: ${p.rule}.` }));
  }
  return [
    el("div", { class: `verdict ${v.state}`, id: "verdict" },
      el("p", { class: `headline ${v.state}`, id: "headline", text: v.verdict }),
      el("p", { id: "verdict-evidence", text: v.evidence }),
      el("p", { id: "verdict-action", text: v.action }),
      el("p", { class: "disclaimer", text: v.disclaimer })),
    bar,
    v.time ? el("p", { class: "muted", id: "time-taken", text: v.time }) : null,
    v.retake_of ? el("p", { id: "retake-of" }, "Retake of case ", el("a", { href: `#/case/${v.retake_of}`, text: v.retake_of }), ".") : null,
    v.duplicates.length ? el("div", { class: "notice", id: "duplicates" }, v.duplicates.map((t) => el("p", { text: t }))) : null,
  ];
}

// Fields whose cells were not counted, each with the reason and a button to photograph it again.
function unreadBlock(c) {
  const unread = c.report.unread_fields;
  if (!unread.length) return null;
  return el("div", { class: "warning", id: "unread-fields" },
    el("p", {}, el("strong", { text: `${unread.length} field(s) could not be read; their cells are not counted.` })),
    unread.map((f) => {
      const input = el("input", { class: "visually-hidden", type: "file", accept: "image/*", capture: "environment" });
      input.addEventListener("change", () => { const file = input.files[0]; input.value = ""; retakeField(c, f.field, file); });
      return el("div", { class: "unread", "data-field": f.field },
        el("p", { text: `Field ${f.field + 1}, “${f.name}”: ${f.reason}.` }),
        el("label", { class: "button secondary retake" }, `Retake field ${f.field + 1}`, input));
    }),
    el("p", { class: "muted", text: "A retake makes a new case from this case's other photos and the new one; this case stays as it is." }));
}

function guidanceBlock(c) {
  const rows = c.report.parasitemia;
  if (!rows.length) return null;
  return [el("h3", { text: "What the figures mean" }),
    el("dl", { class: "guidance", id: "parasitemia" }, rows.flatMap((g) => [
      el("dt", {}, el("strong", { text: `${g.label}: ` }), g.value), el("dd", { text: g.meaning })]))];
}

function renderMalaria(c) {
  const r = c.result, s = r.summary, u = c.file_urls;
  const rows = [
    ["Fields counted", s.decision ? `${s.decision.readable_fields} of ${s.fields}` : s.fields],
    ["Red cells counted", s.cells],
    ["Parasitized", s.parasitized],
    ["Uncertain", s.uncertain],
    ["Refer", s.refer ? `Yes: ${s.refer_reasons.join("; ")}` : s.refer === null ? "Undecided: not enough evidence" : "No"],
    ["Model", s.model ? `${s.model.name} ${s.model.version} (sha256 ${s.model.sha256.slice(0, 12)}…)` : "-"],
  ];
  const legend = el("p", { class: "legend" },
    el("span", { class: "key green" }), "uninfected ", el("span", { class: "key red" }), "parasitized ",
    el("span", { class: "key orange" }), "uncertain ", el("span", { class: "key grey" }), "not a red cell");
  return [
    ...verdictBlock(c),
    c.review ? reviewBanner() : null,
    ...caseLine(c),
    unreadBlock(c),
    el("table", { class: "summary", id: "summary" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v }))))),
    guidanceBlock(c),
    el("h3", { text: "Fields" }), legend,
    r.fields.filter((f) => f.overlay).map((f) => figure(u[f.overlay], `overlay of ${f.name}`,
      `${f.name}: ${f.red_cells} red cells, ${f.parasitized} parasitized, ${f.uncertain} uncertain`, "overlay")),
    c.review ? renderReview(c) : [
      el("h3", { text: "Cells to check" }),
      r.crops.length
        ? el("p", { class: "muted" }, `Parasitized and uncertain cells, parasitized first` +
            (r.crops_total > r.crops.length ? ` (showing ${r.crops.length} of ${r.crops_total})` : ` (${r.crops.length})`) + ".")
        : el("p", { class: "muted", text: "No parasitized or uncertain cells." }),
      el("div", { class: "crops", id: "crops" }, r.crops.map((k) => figure(u[k.image], `cell ${k.cell} of field ${k.field + 1}`,
        `${k.verdict === "uncertain" ? `uncertain (${k.label} ${k.confidence.toFixed(2)})` : `${k.verdict} ${k.confidence.toFixed(2)}`}` +
        ` · field ${k.field + 1} #${k.cell}`, `crop ${k.verdict}`)))],
    modelLine(c.model),
    el("p", { class: "links" },
      el("a", { class: "button secondary", href: c.export_csv, download: true, text: "Export CSV" }),
      r.contact_sheet ? el("a", { href: u[r.contact_sheet], target: "_blank", text: "contact sheet" }) : null),
  ];
}

// ------------------------------------------------------------ review of the flagged cells (serve/review.py)
// One tap per cell: parasite / not a parasite / not a cell (+ an optional stage). Each tap appends a row on the
// device; the machine's call stays on the record. The reviewed slide result comes back with every answer.

const CALL_TEXT = { parasite: "Parasite", not_parasite: "Not a parasite", not_cell: "Not a cell" };
const STAGES = ["ring", "trophozoite", "schizont", "gametocyte"];
const REVIEWER_KEY = "medge.reviewer";
const review = { caseId: null, block: null, busy: 0 };

function remembered() {
  try { return localStorage.getItem(REVIEWER_KEY) || ""; } catch (e) { return ""; }  // storage off: asked each time
}

function reviewer() {
  const input = $("#reviewer");
  const name = input ? input.value.trim() : "";
  if (!name) {
    showError(new ApiError(400, "Enter your name as reviewer first: every call is recorded with it."));
    if (input) input.focus();
  }
  return name;
}

function densityCell(d) {
  const den = d && d.density;
  if (!den) return [d && d.decision === "not enough evidence"
    ? "not given: not enough evidence yet (photograph more fields)" : "not computed"];
  const n = (v) => Number(v).toLocaleString("en");
  return [`${n(den.per_ul)} (95% CI ${n(den.low_per_ul)}-${n(den.high_per_ul)})`,
    el("span", { class: "basis", text: `basis: ${den.basis}` })];
}

function decisionClass(d) {
  return d.decision === "parasites seen" ? "refer" : d.decision === "no parasites seen" ? "ok" : "amber";
}

function reviewBanner() {
  return el("p", { class: "review-banner", id: "review-banner" });
}

function showReviewBanner(b) {
  const p = $("#review-banner");
  if (!p) return;
  p.className = `review-banner ${b.rows ? decisionClass(b.result) : "muted"}`;
  p.textContent = b.reviewed
    ? `Reviewed by ${b.reviewed_by}, ${when(b.reviewed_at)}: ${b.result.message}.`
    : b.rows ? `In review (${b.called} of ${b.offered} cells called): ${b.result.message}.`
      : `Not reviewed yet: ${b.offered} cell(s) to check below.`;
}

async function postReview(body) {
  body.reviewer = reviewer();
  if (!body.reviewer) return null;
  clearError();
  review.busy += 1;
  try {
    const answer = await api(`/api/cases/${review.caseId}/reviews`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    showReview(answer.review);
    return answer;
  } catch (err) {
    showError(err);
    return null;
  } finally {
    review.busy -= 1;
  }
}

function reviewCard(k) {
  const key = `${k.field}:${k.cell}`;
  const what = k.verdict === "uncertain"
    ? `uncertain (${k.model_label} ${Number(k.confidence).toFixed(2)})` : `${k.verdict} ${Number(k.confidence).toFixed(2)}`;
  const buttons = Object.entries(CALL_TEXT).map(([after, text]) => {
    const b = el("button", { type: "button", class: `call ${after}`, "data-after": after, text });
    b.onclick = () => postReview({ calls: [{ field: k.field, cell: k.cell, after,
      stage: after === "parasite" ? (card.querySelector("select").value || null) : null }] });
    return b;
  });
  const stage = el("select", { class: "stage", "aria-label": "parasite stage (optional)" },
    el("option", { value: "", text: "stage (optional)" }), STAGES.map((s) => el("option", { value: s, text: s })));
  stage.onchange = () => postReview({ calls: [{ field: k.field, cell: k.cell, after: "parasite", stage: stage.value || null }] });
  const card = el("div", { class: `rcell ${k.verdict}`, "data-key": key, "data-verdict": k.verdict },
    el("a", { href: k.image_url, target: "_blank", rel: "noopener" },
      el("img", { src: k.image_url, alt: `cell ${k.cell} of field ${k.field + 1}` })),
    el("div", { class: "rside" },
      el("p", { class: "rcap" }, what, el("br"), `field ${k.field + 1} #${k.cell}`),
      el("div", { class: "calls" }, buttons), stage,
      el("p", { class: "rnow muted" })));
  return card;
}

function showReview(b) {
  review.block = b;
  showReviewBanner(b);
  const rows = [
    ["Machine", [b.machine.message]],
    ["Reviewed", b.rows ? [b.result.message, el("span", { class: "basis", text: b.reviewed
      ? `reviewed by ${b.reviewed_by}, ${when(b.reviewed_at)}` : b.status })] : ["no call yet"]],
    ["Cells called", [`${b.called} of ${b.offered}`]],
    ["White cells counted", [b.wbc_count ? `${b.wbc_count.value} (by ${b.wbc_count.reviewer})` : "not entered"]],
    ["Parasites/µL", [...densityCell(b.result), el("span", { class: "basis", text: `from ${b.density_from}` })]],
  ];
  const table = $("#review-result");
  if (table) {
    table.className = `summary review-result ${b.rows ? decisionClass(b.result) : ""}`;
    table.replaceChildren(el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v)))));
  }
  for (const k of b.cells) {
    const card = document.querySelector(`.rcell[data-key="${k.field}:${k.cell}"]`);
    if (!card) continue;
    card.classList.toggle("called", !!k.call);
    card.dataset.call = k.call || "";
    for (const btn of card.querySelectorAll("button.call")) btn.classList.toggle("on", btn.dataset.after === k.call);
    const stage = card.querySelector("select");
    stage.hidden = k.call !== "parasite";
    if (k.call === "parasite") stage.value = k.stage || "";
    card.querySelector(".rnow").textContent = k.call
      ? `${CALL_TEXT[k.call]}${k.stage ? ` (${k.stage})` : ""}: ${k.reviewer}` : "";
  }
  const left = b.cells.filter((k) => !k.call && k.verdict === "uncertain").length;
  const rest = $("#review-rest");
  if (rest) {
    rest.hidden = left === 0;
    rest.textContent = `The ${left} uncertain cell${left === 1 ? "" : "s"} not yet called: not parasites`;
  }
  const done = $("#review-done");
  if (done) {
    const missing = b.offered - b.called;
    done.disabled = missing > 0;
    done.textContent = b.reviewed ? `Reviewed by ${b.reviewed_by}` : missing > 0
      ? `Mark case reviewed (${missing} cell${missing === 1 ? "" : "s"} left to call)` : "Mark case reviewed";
  }
}

function renderReview(c) {
  const b = c.review, r = c.result;
  review.caseId = c.id;
  const shown = (r.crops || []).filter((k) => k && k.verdict);
  const notes = [];
  if (r.crops_total > shown.length) notes.push(`${r.crops_total - shown.length} more flagged cell(s) beyond the first ${shown.length} keep the machine's call`);
  const left = shown.length - b.offered;
  if (left > 0) notes.push(`${left} flagged cell(s) on fields that were not counted, or uncertain fragments smaller than half a red cell, are left out`);
  const name = el("input", { id: "reviewer", name: "reviewer", maxlength: 64, autocomplete: "name",
    placeholder: "name or initials", value: remembered() });
  name.addEventListener("change", () => { try { localStorage.setItem(REVIEWER_KEY, name.value.trim()); } catch (e) { /* private mode */ } });
  const rest = el("button", { type: "button", id: "review-rest", class: "secondary wide" });
  rest.onclick = () => postReview({ rest: "not_parasite" });
  const done = el("button", { type: "button", id: "review-done", class: "wide" });
  done.onclick = () => postReview({ reviewed: true });
  const wbc = el("input", { id: "wbc-count", type: "number", inputmode: "numeric", min: 1, step: 1,
    placeholder: "e.g. 12", value: b.wbc_count ? b.wbc_count.value : null });
  const wbcSave = el("button", { type: "button", id: "wbc-save", class: "secondary", text: "Save count" });
  wbcSave.onclick = () => {
    const n = Number(wbc.value);
    if (!Number.isInteger(n) || n < 1) { showError(new ApiError(400, "Enter the white cells counted: a whole number, 1 or more.")); return; }
    postReview({ wbc_count: n });
  };
  const section = el("section", { class: "review", id: "review" },
    el("h3", { text: "Review the cells" }),
    el("p", { class: "muted" }, `${b.offered} cell(s) to check, parasitized first. One tap per cell; your call is ` +
      "kept beside the machine's, which is never changed." + (notes.length ? ` ${notes.join("; ")}.` : "")),
    el("label", {}, "Reviewer", name),
    el("table", { class: "summary review-result", id: "review-result" }),
    el("div", { class: "crops review-cells", id: "crops" }, b.cells.map(reviewCard)),
    b.offered ? el("p", {}, rest) : el("p", { class: "muted", text: "No parasitized or uncertain cells to check." }),
    el("div", { class: "wbc" },
      el("label", { for: "wbc-count" }, "White cells counted in these fields (for parasites/µL per white cell)"),
      el("div", { class: "row" }, wbc, wbcSave)),
    el("p", {}, done));
  return section;
}

const LEVEL_CLASS = { urgent: "refer", routine: "routine", observation: "ok", "specialist review": "refer" };

function renderOct(c) {
  const r = c.result, u = c.file_urls;
  const probs = Object.entries(r.probabilities || {}).sort((a, b) => b[1] - a[1]);
  return [
    el("p", { class: `headline ${LEVEL_CLASS[r.referral] || "refer"}`, id: "headline", text: c.headline }),
    el("p", { class: "muted" }, `Case ${c.id} · ${when(c.created)}`, c.subject ? ` · ${c.subject}` : ""),
    c.note ? el("p", { class: "note", text: c.note }) : null,
    el("table", { class: "summary", id: "summary" }, el("tbody", {},
      el("tr", {}, el("th", { text: "Class" }), el("td", { text: r.uncertain ? `uncertain (best guess ${r.label})` : r.label })),
      el("tr", {}, el("th", { text: "Referral" }), el("td", { text: r.referral })),
      el("tr", {}, el("th", { text: "Confidence" }), el("td", { text: pct(100 * r.confidence) })))),
    el("h3", { text: "Probabilities" }),
    el("div", { class: "probs" }, probs.map(([k, v]) => {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${(100 * v).toFixed(1)}%`;  // CSSOM, not a style attribute: the CSP allows no inline styles
      return el("div", { class: "prob" }, el("span", { class: "name", text: k }), el("span", { class: "track" }, fill),
        el("span", { class: "val", text: pct(100 * v) }));
    })),
    el("h3", { text: "Where the model looked (Grad-CAM)" }),
    r.gradcam ? figure(u[r.gradcam], "Grad-CAM overlay", "red: the regions that drove the answer", "overlay")
      : el("p", { class: "muted", text: `No Grad-CAM: ${r.gradcam_unavailable}` }),
    figure(u[r.scan], `scan ${r.name}`, `the scan: ${r.name}`, "overlay"),
    modelLine(c.model),
    el("p", { class: "links" }, el("a", { class: "button secondary", href: c.export_csv, download: true, text: "Export CSV" })),
  ];
}

function renderCase(c) {
  const view = $("#case-view");
  view.replaceChildren(...(c.kind === "oct" ? renderOct(c) : renderMalaria(c)).flat().filter(Boolean));
  if (c.review) showReview(c.review);  // fills the review's table, buttons and banner, now in the page
  view.dataset.caseId = c.id;
  window.scrollTo(0, 0);
}

// ------------------------------------------------------------ single cells: on this phone, or on the device

// The on-phone model is loaded once, on first use (the runtime is 9 MB); null when this phone cannot, and why.
const cells = { loading: null, model: null, why: null, busy: false };

function phoneModel() {
  if (!cells.loading) {
    cells.loading = (async () => {
      try {
        const info = await api("/api/ondevice");
        if (!info.runtime) throw new Error(info.reason);
        if (!info.models.cells) throw new Error(info.unavailable.cells || "on-phone analysis is not available on this device");
        $("#cells-where").textContent = `Loading the model onto this phone (${(info.runtime.bytes / 2 ** 20).toFixed(0)} MB, once)…`;
        const ondevice = await import("/static/ondevice.js");
        cells.model = await ondevice.loadModel({ runtime: info.runtime, model: info.models.cells });
        cells.model.name = `${info.models.cells.name} ${info.models.cells.version}`;
      } catch (err) {
        if (err && err.status === 401) { cells.loading = null; throw err; }
        cells.why = (err && err.message) || String(err);
        console.warn(`on-phone inference unavailable: ${cells.why}`);
      }
      showWhere();
      return cells.model;
    })();
  }
  return cells.loading;
}

function onPhone() { return cells.model !== null && !$("#cells-on-device").checked; }

function showWhere() {
  const p = $("#cells-where");
  if (onPhone()) {
    p.className = "where phone";
    p.textContent = `On this phone: ${cells.model.name} with ${cells.model.runtime.name} ${cells.model.runtime.version} ` +
      `(WebAssembly, CPU), loaded in ${Math.round(cells.model.loadMs)} ms. Nothing is sent to the device.`;
  } else {
    p.className = "where device";
    p.textContent = cells.model ? "On the device: the cells are sent to it (chosen below)."
      : `On the device: ${cells.why}. The cells are sent to the device.`;
  }
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b), n = s.length;
  return n ? (n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2) : null;
}
function quantile(xs, q) { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))] : null; }

async function onDeviceBatch(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const t0 = performance.now();
  const body = await api("/api/cells", { method: "POST", body: form });
  const each = (performance.now() - t0) / files.length;
  return body.cells.map((c) => ({ ...c, where: "device", ms: each }));
}

function cellRow(c) {
  const verdict = c.error ? "error" : c.uncertain ? "uncertain" : c.label === "Parasitized" ? "parasitized" : "uninfected";
  const answer = c.error ? c.error : `${c.uncertain ? "uncertain" : c.label} ${c.confidence.toFixed(2)}`;
  const detail = c.error ? c.error : `${c.uncertain ? "uncertain, best guess " : ""}${c.label} ${c.confidence.toFixed(3)}`;
  return el("tr", { class: verdict, "data-name": c.source, "data-label": c.label || "", "data-where": c.where,
    "data-ms": c.ms.toFixed(3) },
    el("td", { text: c.source, title: c.source }), el("td", { text: answer, title: detail }),
    el("td", { text: c.where === "phone" ? "phone" : "device" }), el("td", { text: c.ms.toFixed(1) }));
}

function cellsSummary(results) {
  const ok = results.filter((c) => !c.error);
  const count = (v) => ok.filter(v).length;
  const phone = ok.filter((c) => c.where === "phone");
  const box = $("#cells-summary");
  const lines = [`${results.length} cell(s): ${count((c) => !c.uncertain && c.label === "Parasitized")} parasitized, ` +
    `${count((c) => !c.uncertain && c.label !== "Parasitized")} uninfected, ${count((c) => c.uncertain)} uncertain` +
    (ok.length < results.length ? `, ${results.length - ok.length} unreadable` : "") + "."];
  if (phone.length) {
    const ms = phone.map((c) => c.ms);
    lines.push(`On this phone, per cell: median ${median(ms).toFixed(1)} ms (reading and resizing ` +
      `${median(phone.map((c) => c.preprocess_ms)).toFixed(1)} ms, model ${median(phone.map((c) => c.inference_ms)).toFixed(1)} ms), ` +
      `95% under ${quantile(ms, 0.95).toFixed(1)} ms.`);
    Object.assign(box.dataset, { phoneCells: phone.length, phoneMsP50: median(ms).toFixed(3),
      phoneMsP95: quantile(ms, 0.95).toFixed(3), inferenceMsP50: median(phone.map((c) => c.inference_ms)).toFixed(3),
      preprocessMsP50: median(phone.map((c) => c.preprocess_ms)).toFixed(3) });
  }
  const device = ok.filter((c) => c.where === "device");
  if (device.length) lines.push(`On the device: ${device.length} cell(s), ${median(device.map((c) => c.ms)).toFixed(1)} ms per cell including the network.`);
  box.dataset.done = String(results.length);
  box.replaceChildren(...lines.map((t) => el("p", { text: t })));
  box.hidden = false;
}

async function classifyCells(input) {
  const files = [...input.files];
  input.value = "";
  if (cells.busy || !files.length) return;
  clearError();
  cells.busy = true;
  const tbody = $("#cells-table tbody"), results = [];
  tbody.replaceChildren();
  $("#cells-table").hidden = false;
  $("#cells-summary").hidden = true;
  delete $("#cells-summary").dataset.done;
  const batch = state.health ? state.health.limits.max_files : 12;
  try {
    await phoneModel();
    for (let i = 0; i < files.length;) {
      progress(`Classifying cell ${i + 1} of ${files.length}…`, i / files.length);
      let done;
      if (onPhone()) {
        const f = files[i];
        try {
          const r = await cells.model.classify(f);
          done = [{ ...r, source: f.name, where: "phone", ms: r.preprocess_ms + r.inference_ms }];
        } catch (err) {  // this file failed here (an image the browser cannot decode): the device tries it
          console.warn(`on-phone classification of ${f.name} failed: ${err.message}`);
          done = await onDeviceBatch([f]);
        }
      } else {
        done = await onDeviceBatch(files.slice(i, i + batch));
      }
      i += done.length;
      results.push(...done);
      tbody.append(...done.map(cellRow));
    }
    cellsSummary(results);
  } catch (err) {
    showError(err);
  } finally {
    progressDone();
    cells.busy = false;
  }
}

// ------------------------------------------------------------ case list

let searchTimer = null;
// The case list's review state: "reviewed" (by whom) once marked, "in review" while calls are being made.
function reviewBadge(r) {
  if (!r) return null;
  return r.reviewed_by
    ? el("span", { class: "badge reviewed", title: `reviewed ${when(r.reviewed_at)}`, text: `reviewed by ${r.reviewed_by}` })
    : el("span", { class: "badge in-review", text: "in review" });
}

async function loadCases() {
  const q = $("#case-search").value.trim();
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if ($("#today-only").checked) params.set("day", "today");
  const exportParams = new URLSearchParams(params);
  $("#export-all").href = `/api/cases/export.csv${exportParams.toString() ? "?" + exportParams : ""}`;
  params.set("limit", "200");
  const data = await api(`/api/cases?${params}`);
  $("#case-count").textContent = data.total === 0
    ? ($("#today-only").checked ? "No cases today yet." : "No cases match.")
    : `${data.total} case(s)${data.total > data.cases.length ? `, newest ${data.cases.length} shown` : ""}.`;
  $("#case-list").replaceChildren(...data.cases.map((c) => el("li", { class: c.refer ? "refer" : c.refer === null ? "amber" : "ok" },
    el("a", { href: `#/case/${c.id}` },
      el("strong", { text: c.subject || "(no id)" }), " ",
      el("span", { class: "badge", text: c.kind === "oct" ? "OCT" : "malaria" }),
      reviewBadge(c.review),
      el("span", { class: "line", text: c.headline }),
      el("span", { class: "muted line", text: `${c.id} · ${when(c.created)}` })))));
}

// ------------------------------------------------------------ start

async function health() {
  try {
    state.health = await api("/healthz");
    const tabs = Object.entries(state.health.models).map(([tab, m]) => `${tab}: ${m.name} ${m.version}`);
    $("#device").textContent = tabs.length ? tabs.join(" · ") : "no models loaded";
    const cellModel = state.health.models.cells;
    if (cellModel) $("#cells-model").textContent = `Model: ${cellModel.name} ${cellModel.version}, for single red cells.`;
    showTabs();
  } catch (err) {
    const kept = navigator.serviceWorker && navigator.serviceWorker.controller;
    $("#device").textContent = kept ? "device not reachable: this is the page kept on this phone"
      : "device not reachable";
    showError(err);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  registerServiceWorker();
  setupCamera();
  $("#malaria-camera").addEventListener("change", (e) => addMalaria(e.target));
  $("#malaria-files").addEventListener("change", (e) => addMalaria(e.target));
  $("#oct-file").addEventListener("change", (e) => {
    state.octFile = e.target.files[0] || null;
    e.target.value = "";
    refreshOctList();
  });
  $("#cells-files").addEventListener("change", (e) => classifyCells(e.target));
  $("#cells-on-device").addEventListener("change", showWhere);
  $("#malaria-form").addEventListener("submit", (e) => { e.preventDefault(); submitCase("malaria", e.target, state.malariaFiles); });
  $("#oct-form").addEventListener("submit", (e) => { e.preventDefault(); submitCase("oct", e.target, state.octFile ? [state.octFile] : []); });
  $("#case-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadCases().catch(showError), 250);
  });
  $("#today-only").addEventListener("change", () => loadCases().catch(showError));
  $("#code-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("/api/session", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code: $("#code-input").value.trim() }) });
      $("#code-input").value = "";
      route();
    } catch (err) {
      if (err.status === 401) { $("#error").textContent = err.message; $("#error").hidden = false; }
      else showError(err);
    }
  });
  window.addEventListener("hashchange", () => { closeCamera(); route(); });
  await health();
  secureLink();
  if (state.health && state.health.access_code_required) {
    // One call tells whether this phone already holds the code's cookie.
    try { await api("/api/cases?limit=1"); } catch (err) { if (err.status === 401) { showCodeView(); return; } }
  }
  await route();
  if (!state.health) showError(new ApiError(0, NETWORK_MESSAGE));  // the route cleared it: the device is away
});
