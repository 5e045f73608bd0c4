// pixmesh console: a page of the gateway's own (no build step, no external resources). It talks
// to the public API with the API key pasted into it (kept in this browser's localStorage), and
// follows jobs over the SSE streams, read with fetch (EventSource cannot send X-API-KEY).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { key: localStorage.getItem("pixmesh.key") || "", jobs: new Map(), cursor: null, live: null, jobStream: null, cluster: null };
const TERMINAL = new Set(["succeeded", "failed"]);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("X-API-KEY", state.key);
  return fetch(path, { ...options, headers });
}

async function json(path) {
  const res = await api(path);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${res.status}`);
  return body;
}

// Server-sent events over fetch: calls onEvent({id, event, data}) for each; reconnects with
// Last-Event-ID until `signal` aborts or `done()` says the stream is over.
async function follow(path, onEvent, signal, done = () => false) {
  let last = null;
  while (!signal.aborted && !done()) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (last) headers["Last-Event-ID"] = last;
      const res = await api(path, { headers, signal });
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let frame = { data: [] };
      for (;;) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += value;
        let nl;
        while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
          if (line === "") {
            if (frame.data.length) {
              if (frame.id !== undefined) last = frame.id;
              onEvent({ id: frame.id, event: frame.event || "message", data: frame.data.join("\n") });
            }
            frame = { data: [] };
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") frame.data.push(val);
          else if (field === "id") frame.id = val;
          else if (field === "event") frame.event = val;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    if (!done()) await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---- the key

function setKey(key) {
  state.key = key.trim();
  localStorage.setItem("pixmesh.key", state.key);
  $("#key-state").textContent = state.key ? "key set" : "no key";
  route();
}

// ---- upload

async function uploadFiles(files) {
  const options = $("#options").value.trim().replace(/^\?/, "");
  const outputs = $("#outputs").value.trim();
  const query = [options, outputs ? `outputs=${encodeURIComponent(outputs)}` : ""].filter(Boolean).join("&");
  const rows = $("#uploads tbody");
  await Promise.all([...files].map(async (file) => {
    const answer = el("td", { text: "uploading…" });
    const link = el("td");
    rows.prepend(el("tr", {}, el("td", { text: file.name }), answer, link));
    try {
      const res = await api(`/api/upload?${query}`, { method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file });
      const body = await res.json().catch(() => ({}));
      if (!res.ok) {
        answer.textContent = body.error ? `${res.status} ${body.error.code}: ${body.error.message}` : `HTTP ${res.status}`;
        answer.className = "bad";
        return;
      }
      answer.textContent = body.cached_from ? `${res.status} (from the cache)` : `${res.status} accepted`;
      link.append(el("a", { href: `#job/${body.id}`, class: "mono", text: body.id }));
      upsertJob({ id: body.id, state: "queued", created_at: new Date().toISOString() });
    } catch (e) {
      answer.textContent = String(e);
      answer.className = "bad";
    }
  }));
}

// ---- jobs

function rowOf(job) {
  const tr = el("tr", { "data-id": job.id });
  tr.append(el("td"), el("td"), el("td"), el("td"));
  fillRow(tr, job);
  return tr;
}

function fillRow(tr, job) {
  const [id, st, created, result] = tr.children;
  id.replaceChildren(el("a", { href: `#job/${job.id}`, class: "mono", text: job.id }));
  st.replaceChildren(el("span", { class: `state ${job.state}`, text: job.state }));
  created.textContent = job.created_at ? new Date(job.created_at).toLocaleString() : "";
  const r = job.result;
  result.textContent = r ? `${r.width}×${r.height} ${r.format}` : job.outputs ? `${job.outputs.length} outputs` : job.error ? job.error.code : "";
}

function upsertJob(job) {
  const known = state.jobs.get(job.id);
  const merged = { ...(known || {}), ...job };
  state.jobs.set(job.id, merged);
  const body = $("#jobs tbody");
  const tr = body.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`);
  if (tr) fillRow(tr, merged);
  else if (!$("#jobs-state").value || $("#jobs-state").value === merged.state) body.prepend(rowOf(merged));
  $("#jobs-count").textContent = `(${body.children.length} listed)`;
}

async function loadJobs(more = false) {
  const filter = $("#jobs-state").value;
  if (!more) {
    state.cursor = null;
    $("#jobs tbody").replaceChildren();
  }
  const params = new URLSearchParams({ limit: "100" });
  if (filter) params.set("state", filter);
  if (more && state.cursor) params.set("cursor", state.cursor);
  const page = await json(`/api/jobs?${params}`);
  const body = $("#jobs tbody");
  const rows = document.createDocumentFragment();
  for (const job of page.jobs) {
    state.jobs.set(job.id, job);
    if (!body.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`)) rows.append(rowOf(job));
  }
  body.append(rows);
  state.cursor = page.next_cursor;
  $("#jobs-more").hidden = !state.cursor;
  $("#jobs-count").textContent = `(${body.children.length} listed)`;
}

// Every event of the key's jobs, for the job list (started once a key is set).
function startLive() {
  if (state.live) state.live.abort();
  const live = new AbortController();
  state.live = live;
  $("#jobs-live").textContent = "live";
  $("#jobs-live").classList.add("live");
  follow("/api/events", (e) => {
    let data;
    try { data = JSON.parse(e.data); } catch { return; }
    if (!data.job_id) return;
    const kind = data.kind;
    const next = kind === "accepted" || kind === "released" || kind === "lease_expired" ? "queued"
      : kind === "claimed" || kind === "retried" || kind === "output_succeeded" || kind === "compensating" ? "processing"
      : TERMINAL.has(kind) ? kind : null;
    const job = { id: data.job_id };
    if (next) job.state = next;
    if (kind === "accepted") job.created_at = data.at;
    if (kind === "failed" && data.data) job.error = data.data;
    if (kind === "succeeded" && data.data && data.data.result) job.result = data.data.result;
    upsertJob(job);
  }, live.signal);
}

// ---- one job

async function showJob(id) {
  if (state.jobStream) state.jobStream.abort();
  const stream = new AbortController();
  state.jobStream = stream;
  $("#job-id").textContent = id;
  $("#job-history tbody").replaceChildren();
  $("#job-results").replaceChildren();
  $("#job-error").hidden = true;
  let ended = false;
  const render = async () => {
    const job = await json(`/api/status/${encodeURIComponent(id)}`);
    $("#job-state").textContent = job.state;
    $("#job-state").className = `state ${job.state}`;
    upsertJob(job);
    if (job.error) {
      $("#job-error").hidden = false;
      $("#job-error").textContent = `${job.error.code}: ${job.error.message}`;
    }
    if (job.state === "succeeded") await previews(job);
    return job;
  };
  try {
    const job = await render();
    ended = TERMINAL.has(job.state);
  } catch (e) {
    $("#job-error").hidden = false;
    $("#job-error").textContent = String(e);
    return;
  }
  follow(`/api/status/${encodeURIComponent(id)}/events`, async (e) => {
    let data;
    try { data = JSON.parse(e.data); } catch { return; }
    $("#job-history tbody").append(el("tr", {},
      el("td", { text: String(data.seq) }), el("td", { text: data.kind }), el("td", { text: String(data.attempt) }),
      el("td", { text: new Date(data.at).toLocaleTimeString() }), el("td", {}, el("pre", { text: JSON.stringify(data.data) }))));
    if (TERMINAL.has(data.kind)) {
      ended = true;
      if (state.jobStream === stream) await render().catch(() => {});
    }
  }, stream.signal, () => ended && $("#job-history tbody").children.length > 0);
}

async function previews(job) {
  const box = $("#job-results");
  if (box.dataset.job === job.id) return;
  box.dataset.job = job.id;
  box.replaceChildren();
  const outputs = job.outputs ? job.outputs.map((o) => ({ name: o.name, path: `/api/result/${job.id}/${encodeURIComponent(o.name)}`, result: o.result }))
    : [{ name: "result", path: `/api/result/${job.id}`, result: job.result }];
  for (const o of outputs) {
    const res = await api(o.path);
    if (!res.ok) {
      box.append(el("figure", {}, el("figcaption", { class: "bad", text: `${o.name}: HTTP ${res.status}` })));
      continue;
    }
    const blob = await res.blob();
    const url = URL.createObjectURL(blob);
    const ext = (o.result && o.result.format) || (blob.type.split("/")[1] || "bin");
    const caption = el("figcaption", {}, `${o.name} ${o.result ? `${o.result.width}×${o.result.height}` : ""} `,
      el("a", { href: url, download: `${job.id}.${o.name}.${ext}`, class: "download", text: "download" }));
    box.append(el("figure", {}, el("img", { src: url, alt: o.name }), caption));
  }
}

// ---- cluster

function ago(seconds) {
  if (seconds == null) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.round(seconds / 60)} min`;
}

async function refreshCluster() {
  try {
    const c = await json("/api/cluster");
    const failed = c.sources.filter((s) => !s.ok);
    $("#cluster-sources").hidden = failed.length === 0;
    $("#cluster-sources").textContent = failed.map((s) => `${s.name}: ${s.error}`).join("; ");
    $("#cluster-age").textContent = `as of ${new Date(c.generated_at).toLocaleTimeString()}`;
    $("#queue-depth").textContent = c.queue.depth ?? "–";
    $("#queue-age").textContent = ago(c.queue.oldest_job_age_seconds);
    $("#cluster-workers tbody").replaceChildren(...c.workers.map((w) => el("tr", { "data-address": w.address },
      el("td", { class: "mono", text: w.address }), el("td", { text: String(w.capacity ?? "") }), el("td", { text: String(w.in_flight ?? "") }),
      el("td", { text: w.latency_estimate_seconds == null ? "" : ago(w.latency_estimate_seconds) }),
      el("td", { class: w.breaker === "closed" ? "ok" : "bad", text: w.breaker || "" }), el("td", { text: (w.seen_by || []).join(", ") }))));
    $("#cluster-roles tbody").replaceChildren(...c.roles.map((r) => el("tr", { "data-name": r.name },
      el("td", { text: r.name }), el("td", { text: r.role || "" }),
      el("td", { class: r.state === "ready" ? "ok" : "bad", text: r.state }),
      el("td", {}, el("pre", { text: r.checks ? JSON.stringify(r.checks) : r.error || "" })))));
    $("#cluster-errors tbody").replaceChildren(...c.recent_errors.map((j) => el("tr", {},
      el("td", {}, el("a", { href: `#job/${j.id}`, class: "mono", text: j.id })), el("td", { text: j.error ? j.error.code : "" }),
      el("td", { text: j.error ? j.error.message : "" }), el("td", { text: new Date(j.updated_at).toLocaleString() }))));
  } catch (e) {
    $("#cluster-sources").hidden = false;
    $("#cluster-sources").textContent = String(e);
  }
}

// ---- views

function route() {
  const hash = location.hash.replace(/^#/, "") || "upload";
  const [view, arg] = hash.split("/");
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  clearInterval(state.cluster);
  if (!state.key) {
    $("#key").focus();
    return;
  }
  if (view === "jobs") loadJobs().catch((e) => { $("#jobs-count").textContent = String(e); });
  if (view === "job" && arg) showJob(decodeURIComponent(arg));
  if (view === "cluster") {
    refreshCluster();
    state.cluster = setInterval(refreshCluster, 2000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#key").value = state.key;
  $("#key-state").textContent = state.key ? "key set" : "no key";
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("#key").value);
    startLive();
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    uploadFiles(e.dataTransfer.files);
  });
  $("#files").addEventListener("change", (e) => { uploadFiles(e.target.files); e.target.value = ""; });
  $("#jobs-more").addEventListener("click", () => loadJobs(true));
  $("#jobs-state").addEventListener("change", () => loadJobs());
  window.addEventListener("hashchange", route);
  if (state.key) startLive();
  route();
});
