// The status page: renders the agent's snapshot (server-sent events), asks, switches and the region helper.
// Plain ES2020, no framework, no build step. Text from the agent is only ever set as textContent.
"use strict";

const page = { csrf: null, region: null, cameras: new Map(), questions: new Map() };
const $ = (id) => document.getElementById(id);

// -- talking to the agent ------------------------------------------------------------------------------

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": page.csrf },
    body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function start() {
  const response = await fetch("/api/state");
  const snapshot = await response.json();
  page.csrf = snapshot.csrf_token;
  render(snapshot);
  const events = new EventSource("/api/events");
  events.addEventListener("state", (event) => { render(JSON.parse(event.data)); $("live").textContent = "live"; });
  events.onerror = () => { $("live").textContent = "reconnecting…"; };
}

// -- rendering -----------------------------------------------------------------------------------------

function ago(ts) {
  if (ts == null) return "never";
  const seconds = Math.max(0, Math.round(Date.now() / 1000 - ts));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return new Date(ts * 1000).toLocaleString();
}

function shown(value, state) {
  if (state != null) return state;
  return value == null ? "unknown" : String(value);
}

function setImage(img, url) {
  img.hidden = url == null;
  if (url != null && img.getAttribute("src") !== url) img.src = url;
}

function render(snapshot) {
  $("agent").textContent = `edge-agent · ${snapshot.agent.id}`;
  $("model").textContent = `model ${snapshot.agent.model} on ${snapshot.agent.device} ·`;
  const mqtt = snapshot.mqtt;
  $("mqtt").textContent = `MQTT ${mqtt.connected ? "connected" : "disconnected"} · ${mqtt.queued} queued`;
  $("mqtt").className = `pill ${mqtt.connected ? "ok" : "bad"}`;
  snapshot.cameras.forEach(renderCamera);
  page.severalCameras = snapshot.cameras.length > 1;
  $("ask-camera").hidden = !page.severalCameras;
  snapshot.questions.forEach(renderQuestion);
  renderFigures(snapshot);
}

function renderCamera(camera) {
  let view = page.cameras.get(camera.id);
  if (!view) {
    view = $("camera-template").content.firstElementChild.cloneNode(true);
    view.dataset.camera = camera.id;
    $("cameras").append(view);
    page.cameras.set(camera.id, view);
    regionHelper(view, camera.id);
    $("ask-camera").append(new Option(camera.id, camera.id));
  }
  const online = camera.online === false ? "offline" : camera.online ? "online" : "starting";
  view.querySelector(".camera-title").textContent = `${camera.id} · ${online} · frame ${ago(camera.frame_ts)}`;
  if (camera.frame) setImage(view.querySelector(".frame-image"), camera.frame);
}

function renderQuestion(question) {
  let view = page.questions.get(question.id);
  if (!view) {
    view = $("question-template").content.firstElementChild.cloneNode(true);
    view.dataset.question = question.id;
    view.querySelector(".question-text").textContent = question.question;
    view.querySelector(".enabled").addEventListener("change", (event) =>
      control(view, "/api/enabled", { question_id: question.id, enabled: event.target.checked }));
    view.querySelector(".check").addEventListener("click", () =>
      control(view, "/api/check", { question_id: question.id }));
    $("questions").append(view);
    page.questions.set(question.id, view);
  }
  view.classList.toggle("disabled", !question.enabled);
  if (!view.dataset.busy) view.querySelector(".enabled").checked = question.enabled;
  view.querySelector(".value").textContent = question.answered_ts == null ? "…" : shown(question.value, question.state);
  const confidence = question.confidence == null ? "" : ` · confidence ${(question.confidence * 100).toFixed(0)}%`;
  const region = question.region ? ` · region [${question.region.join(", ")}]` : "";
  const camera = page.severalCameras && question.camera ? ` · camera ${question.camera}` : "";
  view.querySelector(".detail").textContent = `${question.type}${confidence} · changed ${ago(question.changed_ts)}` +
    ` · answered ${ago(question.answered_ts)}${camera}${region}`;
  view.querySelector(".raw").textContent = question.raw == null ? "" : `model said: ${question.raw}`;
  setImage(view.querySelector(".evidence"), question.evidence);
  const history = view.querySelector(".history");
  history.replaceChildren(...question.history.slice().reverse().map((change) => {
    const item = document.createElement("li");
    item.textContent = `${shown(change.value, change.state)} · ${ago(change.ts)}`;
    return item;
  }));
}

function renderFigures(snapshot) {
  const rows = [];
  for (const [stage, ms] of Object.entries(snapshot.latency_ms)) rows.push([`${stage} (mean)`, ms == null ? "–" : `${ms} ms`]);
  for (const [name, count] of Object.entries(snapshot.counts)) rows.push([name.replace(/_/g, " "), String(count)]);
  rows.push(["MQTT broker", snapshot.mqtt.broker], ["answers dropped offline", String(snapshot.mqtt.dropped)]);
  $("figures").tBodies[0].replaceChildren(...rows.map(([name, value]) => {
    const row = document.createElement("tr");
    for (const text of [name, value]) row.insertCell().textContent = text;
    return row;
  }));
}

// -- actions -------------------------------------------------------------------------------------------

async function control(view, path, body) {
  view.dataset.busy = "1";
  try {
    await post(path, body);
  } catch (error) {
    view.querySelector(".raw").textContent = `refused: ${error.message}`;
  } finally {
    setTimeout(() => { delete view.dataset.busy; }, 1500);  // the next snapshots carry the agent's state
  }
}

async function ask(event) {
  event.preventDefault();
  const body = { question: $("ask-question").value };
  const type = $("ask-type").value;
  if (type) body.type = type;
  if (type === "choice") body.options = $("ask-options").value.split(",").map((o) => o.trim()).filter(Boolean);
  if (page.severalCameras) body.camera = $("ask-camera").value;
  if ($("ask-region").checked && page.region) body.region = page.region;
  $("ask-button").disabled = true;
  $("ask-error").hidden = true;
  try {
    const reply = await post("/api/ask", body);
    $("ask-answer").textContent = typeof reply.value === "boolean" ? (reply.value ? "yes" : "no")
      : reply.value == null ? reply.answer : String(reply.value);
    const confidence = reply.confidence == null ? "" : ` · confidence ${(reply.confidence * 100).toFixed(0)}%`;
    $("ask-detail").textContent = `${reply.type}${confidence} · model said: ${reply.answer} · ${reply.latency_ms} ms after the frame`;
    setImage($("ask-image"), reply.evidence);
    $("ask-result").hidden = false;
  } catch (error) {
    $("ask-error").textContent = error.message;
    $("ask-error").hidden = false;
  } finally {
    $("ask-button").disabled = false;
  }
}

// -- the region helper ---------------------------------------------------------------------------------

// The rules of config.region_problem: 4 numbers inside the frame, not empty. The agent checks them again.
function regionProblem(region) {
  if (region.length !== 4 || region.some((edge) => !Number.isFinite(edge))) return "must be 4 numbers";
  if (region.some((edge) => edge < 0 || edge > 1)) return "must lie inside the frame";
  if (region[2] <= region[0] || region[3] <= region[1]) return "must not be empty: drag a larger rectangle";
  return null;
}

function regionHelper(view, cameraId) {
  const canvas = view.querySelector(".frame-draw");
  let anchor = null;
  const fraction = (event) => {
    const box = canvas.getBoundingClientRect();
    const clamp = (value) => Math.min(1, Math.max(0, value));
    return [clamp((event.clientX - box.left) / box.width), clamp((event.clientY - box.top) / box.height)];
  };
  const draw = (a, b) => {
    canvas.width = canvas.clientWidth;
    canvas.height = canvas.clientHeight;
    const context = canvas.getContext("2d");
    context.strokeStyle = "#ffeb3b";
    context.lineWidth = 2;
    context.strokeRect(a[0] * canvas.width, a[1] * canvas.height, (b[0] - a[0]) * canvas.width, (b[1] - a[1]) * canvas.height);
  };
  canvas.addEventListener("pointerdown", (event) => {
    anchor = fraction(event);
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => { if (anchor) draw(anchor, fraction(event)); });
  canvas.addEventListener("pointerup", async (event) => {
    if (!anchor) return;
    const end = fraction(event);
    const round = (value) => Math.round(value * 1000) / 1000;
    const region = [Math.min(anchor[0], end[0]), Math.min(anchor[1], end[1]),
      Math.max(anchor[0], end[0]), Math.max(anchor[1], end[1])].map(round);
    anchor = null;
    const error = view.querySelector(".region-error");
    const problem = regionProblem(region);
    error.hidden = problem == null;
    error.textContent = problem == null ? "" : `region ${problem}`;
    if (problem) return;
    try {
      const checked = await post("/api/region", { region });
      page.region = checked.region;
      $("ask-camera").value = cameraId;  // an ask on the drawn region asks the camera it was drawn on
      view.querySelector(".region-line").textContent = checked.line;
      view.querySelector(".region-line-row").hidden = false;
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
    }
  });
  view.querySelector(".copy").addEventListener("click", () =>
    navigator.clipboard?.writeText(view.querySelector(".region-line").textContent));
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("ask-type").addEventListener("change", () => { $("ask-options").hidden = $("ask-type").value !== "choice"; });
  $("check-all").addEventListener("click", () => post("/api/check", { question_id: null }).catch(() => {}));
  start().catch((error) => { $("live").textContent = `could not load: ${error.message}`; });
});
