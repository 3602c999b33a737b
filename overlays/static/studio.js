// The studio: camera or screen (capture.js) -> /ws/broadcaster/{id}, live style controls sent as
// `config` messages, and the styled result from /ws/viewer/{id} in the preview (stream.js).
//
// A frame is captured only when the previous one has left the socket (bufferedAmount == 0), so on a
// slow uplink frames are held back at the source instead of piling up in the browser.
import { Capture, listCameras } from "./capture.js";
import { ReconnectingSocket, pageUrl, socketUrl } from "./socket.js";
import { LiveView, fmt, pageConfig, setText } from "./stream.js";

const cfg = pageConfig();
const $ = (id) => document.getElementById(id);
const STREAM_ID = /^[A-Za-z0-9_-]{1,64}$/;

const ui = {
  streamId: $("stream-id"),
  key: $("stream-key"),
  token: $("viewer-token"),
  camera: $("camera"),
  fps: $("fps"),
  size: $("size"),
  startCamera: $("start-camera"),
  startScreen: $("start-screen"),
  stop: $("stop"),
  link: $("link"),
  video: $("source"),
  prompt: $("prompt"),
  strength: $("strength"),
  strengthValue: $("strength-value"),
  steps: $("steps"),
  processor: $("processor"),
  controlnet: $("controlnet"),
  previewState: $("preview-state"),
  messages: $("messages"),
};

// ---- messages shown to the user ------------------------------------------------------------

function say(level, text) {
  const li = document.createElement("li");
  li.className = level;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  li.append(time, " ", text); // text nodes: server messages are never parsed as HTML
  ui.messages.prepend(li);
  while (ui.messages.children.length > 20) ui.messages.lastChild.remove();
  (level === "error" ? console.warn : console.info)(`dreamstream: ${text}`);
}

const streamId = () => ui.streamId.value.trim();
const key = () => ui.key.value;
const token = () => ui.token.value;

// ---- the styled preview (the same viewer code as the overlay) --------------------------------

const preview = new LiveView($("preview"), { streamId: streamId(), token: token() }, { fit: "contain" }).start();

// ---- the broadcaster socket --------------------------------------------------------------------

let lastStats = null;
let rttMs = null;
let pingSentAt = 0;
let serverConfig = { ...cfg.config };
const dirty = new Set(); // controls changed since the server last told us its config

const broadcaster = new ReconnectingSocket(
  () => socketUrl(`/ws/broadcaster/${encodeURIComponent(streamId())}`, { key: key() }),
  {
    message: (event) => onServerMessage(event.data),
    close: (event) => {
      lastStats = null;
      if (event.code === 4000) {
        stopCapture(`another broadcaster took over stream "${streamId()}"; stopped here`);
        return false;
      }
      if (event.code === 1008) {
        const hint = /key/.test(event.reason) ? " Enter the stream key and start again." : "";
        stopCapture(`the server refused this broadcaster: ${event.reason}.${hint}`, "error");
        return false;
      }
      if (capture.active) say("warn", `connection lost (code ${event.code}); reconnecting…`);
      return capture.active;
    },
    state: (link) => renderLink(link),
  },
  { maxDelayMs: 5000 },
);

function onServerMessage(data) {
  if (typeof data !== "string") return;
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    return;
  }
  switch (msg.type) {
    case "ready":
      say("info", `connected: broadcasting stream "${msg.stream_id}"`);
      if (dirty.size) sendConfig();
      else adoptConfig(msg.config);
      break;
    case "config":
      dirty.clear();
      adoptConfig(msg.config);
      say("info", `style: "${msg.config.prompt}", strength ${msg.config.strength}, ${msg.config.num_steps} steps, ${msg.config.processor_type}`);
      break;
    case "stats":
      lastStats = msg;
      break;
    case "pong":
      rttMs = performance.now() - pingSentAt;
      break;
    case "error":
      say("error", `${msg.code}: ${msg.message}`);
      if (msg.code === "bad_config") {
        dirty.clear();
        adoptConfig(serverConfig); // show what the stream really uses
      }
      break;
    default:
      break;
  }
}

function renderLink(link) {
  const text = {
    idle: "not broadcasting",
    connecting: "connecting…",
    open: "broadcasting",
    retrying: "reconnecting…",
    stopped: "not broadcasting",
  }[link];
  setText(ui.link, text || link);
  ui.link.dataset.state = link === "stopped" ? "idle" : link;
}

// ---- style controls -> `config` messages ------------------------------------------------------

const CONTROLS = {
  prompt: () => ui.prompt.value,
  strength: () => Number(ui.strength.value),
  num_steps: () => Number.parseInt(ui.steps.value, 10),
  processor_type: () => ui.processor.value,
  use_controlnet: () => ui.controlnet.checked,
};

function adoptConfig(config) {
  if (!config) return;
  serverConfig = { ...config };
  if (!dirty.has("prompt") && document.activeElement !== ui.prompt) ui.prompt.value = config.prompt;
  if (!dirty.has("strength")) ui.strength.value = config.strength;
  if (!dirty.has("num_steps")) ui.steps.value = config.num_steps;
  if (!dirty.has("processor_type")) ui.processor.value = config.processor_type;
  if (!dirty.has("use_controlnet")) ui.controlnet.checked = !!config.use_controlnet;
  ui.strengthValue.value = Number(ui.strength.value).toFixed(2);
}

/** Send what changed; while not connected it waits and goes out when the server says `ready`. */
function sendConfig() {
  if (!dirty.size || !broadcaster.isOpen) return;
  const message = { type: "config" };
  for (const name of dirty) message[name] = CONTROLS[name]();
  if (Number.isNaN(message.num_steps)) {
    say("error", "steps must be a whole number");
    return;
  }
  broadcaster.send(JSON.stringify(message));
}

function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

const sendSoon = debounce(sendConfig, 250);

function watch(input, name, event, immediate) {
  input.addEventListener(event, () => {
    dirty.add(name);
    if (immediate) sendConfig();
    else sendSoon();
  });
}
watch(ui.prompt, "prompt", "input", false);
watch(ui.strength, "strength", "input", false);
watch(ui.steps, "num_steps", "change", true);
watch(ui.processor, "processor_type", "change", true);
watch(ui.controlnet, "use_controlnet", "change", true);
ui.strength.addEventListener("input", () => {
  ui.strengthValue.value = Number(ui.strength.value).toFixed(2);
});
for (const button of document.querySelectorAll("#presets button")) {
  button.addEventListener("click", () => {
    ui.prompt.value = button.dataset.prompt;
    dirty.add("prompt");
    sendConfig();
  });
}

// ---- capture ---------------------------------------------------------------------------------

const capture = new Capture(
  ui.video,
  {
    ready: () => (!broadcaster.isOpen ? "closed" : broadcaster.bufferedAmount > 0 ? "busy" : "ok"),
    send: (blob) => broadcaster.send(blob),
    ended: (why) => stopCapture(why),
  },
  { fps: Number(ui.fps.value), size: Number(ui.size.value) },
);
ui.fps.addEventListener("change", () => {
  capture.fps = Number(ui.fps.value);
});
ui.size.addEventListener("change", () => {
  capture.size = Number(ui.size.value);
});

async function start(kind) {
  if (!STREAM_ID.test(streamId())) {
    say("error", "the stream id must be 1-64 characters of A-Z a-z 0-9 _ -");
    return;
  }
  try {
    const label = kind === "camera" ? await capture.camera(ui.camera.value) : await capture.screen();
    say("info", `sending the ${kind} (${label})`);
  } catch (err) {
    say("error", err.message);
    return;
  }
  ui.stop.disabled = false;
  broadcaster.start();
  if (kind === "camera") await fillCameraList();
}

function stopCapture(why, level = "info") {
  capture.stop();
  broadcaster.stop();
  ui.stop.disabled = true;
  if (why) say(level, why);
}

async function fillCameraList() {
  const chosen = ui.camera.value;
  ui.camera.replaceChildren(new Option("default camera", ""));
  (await listCameras()).forEach((d, i) => ui.camera.append(new Option(d.label || `camera ${i + 1}`, d.deviceId)));
  ui.camera.value = chosen;
}

ui.startCamera.addEventListener("click", () => start("camera"));
ui.startScreen.addEventListener("click", () => start("screen"));
ui.stop.addEventListener("click", () => stopCapture("stopped"));
ui.camera.addEventListener("change", () => {
  if (capture.active && capture.kind === "camera") start("camera");
});

// ---- stream id, key, token: what the sockets and links use -------------------------------------

function onStreamChanged() {
  const id = streamId();
  const valid = STREAM_ID.test(id);
  ui.streamId.setCustomValidity(valid ? "" : "1-64 characters of A-Z a-z 0-9 _ -");
  if (!valid) {
    say("error", `"${id}" is not a valid stream id: use 1-64 characters of A-Z a-z 0-9 _ -`);
    return;
  }
  const url = new URL(window.location.href);
  url.searchParams.set("stream", id);
  url.searchParams.delete("autostart");
  history.replaceState(null, "", url);
  document.title = `DreamStream studio · ${id}`;
  preview.retarget({ streamId: id, token: token() });
  if (capture.active) broadcaster.restart();
  renderLinks();
}
ui.streamId.addEventListener("change", onStreamChanged);
ui.key.addEventListener("change", () => {
  if (capture.active) broadcaster.restart();
});
ui.token.addEventListener("change", () => {
  preview.retarget({ token: token() });
  renderLinks();
});

// ---- links to the viewer, overlay and compare pages ----------------------------------------------

function renderLinks() {
  const id = encodeURIComponent(streamId());
  const fade = Number.parseInt($("overlay-fade").value, 10) || 0;
  const urls = {
    viewer: pageUrl(`/view/${id}`, { token: token() }),
    overlay: pageUrl(`/overlay/${id}`, {
      fit: $("overlay-fit").value === "cover" ? "" : $("overlay-fit").value,
      fade: fade > 0 ? fade : "",
      debug: $("overlay-debug").checked ? 1 : "",
      token: token(),
    }),
    compare: pageUrl(`/overlay/${id}/compare`, { token: token() }),
  };
  for (const [name, url] of Object.entries(urls)) {
    $(`url-${name}`).value = url;
    $(`open-${name}`).href = url;
  }
}
for (const id of ["overlay-fit", "overlay-fade", "overlay-debug"]) $(id).addEventListener("input", renderLinks);

async function copy(input) {
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select(); // clipboard API needs a secure page; fall back to the old way
    document.execCommand("copy");
  }
  say("info", `copied ${input.value}`);
}
for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", () => copy($(button.dataset.copy)));
}

// ---- live numbers ---------------------------------------------------------------------------

const stat = (name) => document.querySelector(`[data-stat="${name}"]`);
const PREVIEW_TEXT = {
  connecting: "connecting to the server…",
  waiting: "waiting for frames: press Start camera or Share screen",
  offline: "not broadcasting",
  live: "",
};

setInterval(() => {
  setText(stat("sent"), fmt(capture.active ? capture.sent.rate() : 0));
  setText(stat("preview"), fmt(preview.fps));
  setText(stat("fps_in"), fmt(lastStats && lastStats.fps_in));
  setText(stat("fps_out"), fmt(lastStats && lastStats.fps_out));
  setText(stat("latency"), fmt(lastStats && lastStats.latency_ms, 0));
  setText(stat("rtt"), fmt(broadcaster.isOpen ? rttMs : null, 0));
  setText(stat("dropped"), lastStats ? String(lastStats.dropped) : "–");
  setText(stat("viewers"), lastStats ? String(lastStats.viewers) : "–");
  setText(stat("held"), String(capture.held));
  const state = preview.feed.socket.link === "open" ? preview.state : "connecting";
  setText(ui.previewState, state === "live" && preview.frames === 0 ? "live: waiting for the first styled frame" : PREVIEW_TEXT[state] ?? state);
  ui.previewState.hidden = state === "live" && preview.canvas.hasFrame;
}, 500);

setInterval(() => {
  if (broadcaster.isOpen) {
    pingSentAt = performance.now();
    broadcaster.send(JSON.stringify({ type: "ping" }));
  }
}, 2000);

// the processor may still be loading (diffusion weights): keep its badge current
async function refreshHealth() {
  try {
    const health = await (await fetch("/healthz", { cache: "no-store" })).json();
    const badge = $("server-status");
    // compile=full serves at once and compiles faster kernels in the background: say so ("optimising 3/8")
    const opt = health.optimise;
    const optimising = health.status === "ok" && opt && opt.state === "running";
    setText(badge, optimising ? `ok · optimising ${opt.done}/${opt.total}` : health.status);
    badge.dataset.state = health.status;
    badge.title = opt ? `compile=${opt.mode}: ${opt.state} ${opt.done}/${opt.total}` : "";
    setText($("processor-name"), health.processor);
    setText($("processor-device"), health.device);
    setText($("processor-reason"), health.reason || "");
    setText($("processor-error"), health.error || "");
  } catch {
    $("server-status").dataset.state = "error";
    setText($("server-status"), "unreachable");
  }
}
setInterval(refreshHealth, 5000);

// ---- start ----------------------------------------------------------------------------------

adoptConfig(cfg.config);
renderLinks();
renderLink("idle");
window.dreamstream = {
  preview,
  broadcaster,
  get framesSent() {
    return capture.sent.count;
  },
};
if (cfg.autostart) start("camera");
