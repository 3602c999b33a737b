// The studio: camera or screen (capture.js) -> /ws/broadcaster/{id}, the style controls (style.js)
// sent as `config` messages, and the styled result from /ws/viewer/{id} in the large preview
// (stream.js), with the camera as a picture-in-picture.
//
// A frame is captured only when the previous one has left the socket (bufferedAmount == 0), so on a
// slow uplink frames are held back at the source instead of piling up in the browser.
import { Capture, listCameras } from "./capture.js";
import { ShareLinks } from "./links.js";
import { Alerts, MessageLog } from "./notices.js";
import { HealthPoller, processorText } from "./processors.js";
import { ReconnectingSocket, socketUrl } from "./socket.js";
import { LiveView, fmt, pageConfig, setText } from "./stream.js";
import { StyleControls } from "./style.js";

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
  previewBox: $("preview-box"),
  previewState: $("preview-state"),
  previewBadge: $("preview-badge"),
  snapshot: $("snapshot"),
  fullscreen: $("fullscreen"),
};

const log = new MessageLog($("messages"));
const say = (level, text) => log.say(level, text);
const alerts = new Alerts($("alerts"));
const streamId = () => ui.streamId.value.trim();
const key = () => ui.key.value;
const token = () => ui.token.value;

// ---- the stream's processor, and what the server can run ---------------------------------------

let streamConfig = { ...cfg.config }; // what the stream uses, from the server's last word on it
const health = new HealthPoller(renderHealth, { states: cfg.processor_states });

/** The header and the preview badge follow the stream's processor (not the server's default). */
function showStreamConfig(config) {
  if (!config) return;
  streamConfig = { ...config };
  style.adopt(config);
  renderProcessorState();
}

let stalledSince = 0; // frames go in but none come out (a processor loading on a server that cannot say so)

function renderProcessorState() {
  const type = streamConfig.processor_type;
  let note = style.switchText() || processorText(type, health.states);
  let short = style.pending ? `→ ${processorText(style.pending.type, health.states) || `loading ${style.pending.type}…`}` : note;
  const stalledS = stalledSince ? (performance.now() - stalledSince) / 1000 : 0;
  if (!note && stalledS > 3) short = note = `no styled frames for ${Math.round(stalledS)} s: ${type} may still be loading`;
  setText($("stream-processor"), type);
  setText($("stream-processor-state"), short ? `· ${short}` : "");
  setText(ui.previewBadge, note);
  ui.previewBadge.hidden = !note;
}

function renderHealth(h) {
  const badge = $("server-status");
  if (!h) {
    badge.dataset.state = "error";
    setText(badge, "unreachable");
    return;
  }
  // compile=full serves at once and compiles faster kernels in the background: say so ("optimising 3/8")
  const opt = h.optimise;
  const optimising = h.status === "ok" && opt && opt.state === "running";
  setText(badge, optimising ? `ok · optimising ${opt.done}/${opt.total}` : h.status);
  badge.dataset.state = h.status;
  badge.title = opt ? `compile=${opt.mode}: ${opt.state} ${opt.done}/${opt.total}` : "";
  setText($("processor-name"), h.processor);
  setText($("processor-device"), h.device);
  setText($("processor-reason"), h.reason || "");
  setText($("processor-error"), h.error || "");
  style.setStates(health.states);
  renderProcessorState();
}

// ---- the style controls -> `config` messages -----------------------------------------------------

const style = new StyleControls({
  config: cfg.config,
  offered: cfg.processors,
  say,
  // while not connected the changes wait, and go out when the server says `ready`
  send: (changes) => broadcaster.send(JSON.stringify({ type: "config", ...changes })),
});

// ---- the styled preview (the same viewer code as the overlay) --------------------------------

const preview = new LiveView(
  $("preview"),
  { streamId: streamId(), token: token() },
  { fit: "contain" },
  // every change of the stream's config (from here, the dock, a Stream Deck) reaches viewers as `status`
  { status: (msg) => msg && showStreamConfig(msg.config) },
).start();

// ---- the broadcaster socket --------------------------------------------------------------------

let lastStats = null;
let rttMs = null;
let pingSentAt = 0;

const broadcaster = new ReconnectingSocket(
  () => socketUrl(`/ws/broadcaster/${encodeURIComponent(streamId())}`, { key: key() }),
  {
    message: (event) => onServerMessage(event.data),
    close: (event) => {
      lastStats = null;
      if (event.code === 4000) {
        stopCapture(`another broadcaster took over stream "${streamId()}"; stopped here`);
        alerts.show("broadcaster", "warn", `Another broadcaster took over stream "${streamId()}": this page stopped sending.`);
        return false;
      }
      if (event.code === 1008) {
        const keyProblem = /key/.test(event.reason);
        stopCapture(`the server refused this broadcaster: ${event.reason}`, "error");
        alerts.show(
          "broadcaster",
          "error",
          keyProblem
            ? `The server refused the stream key for "${streamId()}" (${event.reason}). Enter the stream key under Source, then press Start camera again.`
            : `The server refused this broadcaster: ${event.reason}.`,
        );
        if (keyProblem) ui.key.focus();
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
      alerts.clear("broadcaster");
      say("info", `connected: broadcasting stream "${msg.stream_id}"`);
      showStreamConfig(msg.config);
      style.flush(); // changes made while connecting
      break;
    case "config":
      style.accepted(msg.config, msg.loading);
      showStreamConfig(msg.config);
      alerts.clear("config");
      alerts.clear("processing");
      say("info", `style: "${msg.config.prompt}", strength ${msg.config.strength}, ${msg.config.num_steps} steps, ${msg.config.processor_type}${msg.loading ? ` (loading ${msg.loading} first)` : ""}`);
      health.poll(); // a switch may start loading a processor: show its progress soon
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
        style.refused(); // show what the stream really uses
        renderProcessorState();
        const goesOn = /goes on/.test(msg.message) ? "" : ` The stream goes on as before, with ${streamConfig.processor_type}.`;
        alerts.show("config", "error", `Not changed: ${msg.message}.${goesOn}`);
      } else if (msg.code === "processing_failed") {
        alerts.show("processing", "error", `The ${streamConfig.processor_type} processor failed: ${msg.message}`);
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
    say("info", `sending the ${kind} (${label}; frames taken by ${capture.method})`);
    alerts.clear("capture");
  } catch (err) {
    say("error", err.message);
    alerts.show("capture", "error", err.message);
    return;
  }
  ui.stop.disabled = false;
  ui.video.hidden = false;
  broadcaster.start();
  if (kind === "camera") await fillCameraList();
}

function stopCapture(why, level = "info") {
  capture.stop();
  broadcaster.stop();
  ui.stop.disabled = true;
  ui.video.hidden = true;
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
  links.render();
}
ui.streamId.addEventListener("change", onStreamChanged);
ui.key.addEventListener("change", () => {
  if (capture.active) broadcaster.restart();
  links.render();
});
ui.token.addEventListener("change", () => {
  alerts.clear("token");
  preview.retarget({ token: token() });
  links.render();
});

// ---- the viewer, overlay, dock and compare URLs under "Use it" ------------------------------------

const links = new ShareLinks({ streamId, key, token, say });

// ---- snapshot and fullscreen ------------------------------------------------------------------

/** The styled frame on screen, at its own size (not the preview's), as a PNG download. */
async function snapshot() {
  const frame = preview.canvas.current;
  if (!frame) return;
  const canvas = document.createElement("canvas");
  canvas.width = frame.width;
  canvas.height = frame.height;
  canvas.getContext("2d").drawImage(frame.bitmap, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `dreamstream-${streamId()}-${new Date().toISOString().replace(/[:.]/g, "-")}.png`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  say("info", `snapshot saved: ${a.download} (${frame.width}×${frame.height})`);
}
ui.snapshot.addEventListener("click", snapshot);
ui.fullscreen.addEventListener("click", () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else ui.previewBox.requestFullscreen().catch((err) => say("error", `fullscreen refused: ${err.message}`));
});
document.addEventListener("fullscreenchange", () => {
  setText(ui.fullscreen, document.fullscreenElement ? "Exit fullscreen" : "Fullscreen");
});

// ---- live numbers ---------------------------------------------------------------------------

const stat = (name) => document.querySelector(`[data-stat="${name}"]`);
const PREVIEW_TEXT = {
  connecting: "connecting to the server…",
  waiting: "waiting for frames: press Start camera or Share screen",
  offline: "not broadcasting",
  live: "",
};

function previewText() {
  const socket = preview.feed.socket;
  // a refused socket opens, then closes: only one that has heard from the server (a `status`) counts as in
  const heard = socket.link === "open" && preview.state !== "connecting";
  if (!heard && socket.lastClose && socket.lastClose.code === 1008) {
    const sending = broadcaster.isOpen ? "Your broadcast is going out; only this preview is refused. " : "";
    const text = `The server refused the preview: ${socket.lastClose.reason}. ${sending}Enter the viewer token under Source.`;
    alerts.show("token", "error", text, { repeat: false });
    return "The preview is refused: it needs the viewer token (see above).";
  }
  if (heard) alerts.clear("token");
  const state = socket.link === "open" ? preview.state : "connecting";
  if (state === "live" && preview.frames === 0) return "live: waiting for the first styled frame";
  return PREVIEW_TEXT[state] ?? state;
}

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
  const stalled = capture.active && lastStats && lastStats.fps_in > 0 && lastStats.fps_out === 0;
  stalledSince = stalled ? stalledSince || performance.now() : 0;
  renderProcessorState();
  const text = previewText();
  setText(ui.previewState, text);
  ui.previewState.hidden = !text || (preview.state === "live" && preview.canvas.hasFrame && preview.feed.socket.link === "open");
  ui.snapshot.disabled = !preview.canvas.hasFrame;
}, 500);

setInterval(() => {
  if (broadcaster.isOpen) {
    pingSentAt = performance.now();
    broadcaster.send(JSON.stringify({ type: "ping" }));
  }
}, 2000);

// ---- start ----------------------------------------------------------------------------------

links.render();
renderLink("idle");
style.setStates(health.states);
renderProcessorState();
health.start();
window.dreamstream = {
  capture,
  preview,
  broadcaster,
  get framesSent() {
    return capture.sent.count;
  },
};
if (cfg.autostart) start("camera");
