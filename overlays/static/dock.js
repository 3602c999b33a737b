// /dock/{id}: a compact control page for OBS's Custom Browser Docks (300-450 px wide).
//
// It is a viewer of the stream, never its broadcaster (a second broadcaster would take the stream
// over): the viewer socket gives the stream's state, its config (every change, from anywhere) and the
// frames for the small preview and the fps / latency; changes go out as the HTTP `config` call
// (POST /api/streams/{id}/config) with the stream key, as a Stream Deck button would send them.
import { Alerts, MessageLog } from "./notices.js";
import { HealthPoller, processorText } from "./processors.js";
import { LiveView, fmt, pageConfig, setText } from "./stream.js";
import { StyleControls } from "./style.js";

const cfg = pageConfig();
const $ = (id) => document.getElementById(id);
const log = new MessageLog($("messages"), {
  onChange: (l) => setText($("messages-count"), l.errors ? `(${l.errors} ${l.errors === 1 ? "error" : "errors"})` : ""),
});
const say = (level, text) => log.say(level, text);
const alerts = new Alerts($("alerts"));
const keyInput = $("stream-key");
const tokenInput = $("viewer-token");
const key = () => cfg.key || (keyInput ? keyInput.value : "");
const token = () => cfg.token || (tokenInput ? tokenInput.value : "");

let streamConfig = { ...cfg.config };

async function sendConfig(changes) {
  let response;
  let body = {};
  try {
    const headers = { "Content-Type": "application/json" };
    if (key()) headers.Authorization = `Bearer ${key()}`;
    response = await fetch(`/api/streams/${encodeURIComponent(cfg.stream_id)}/config`, {
      method: "POST",
      headers,
      body: JSON.stringify(changes),
      cache: "no-store",
    });
    body = await response.json().catch(() => ({}));
  } catch (err) {
    say("error", `the server cannot be reached: ${err.message}`);
    alerts.show("send", "error", "The server cannot be reached: the change was not made.");
    return true; // nothing to wait for: the user sees it failed
  }
  if (response.ok) {
    alerts.clear("send");
    // a processor not loaded yet: the server loads it first and keeps the stream's processor until then
    const asked = changes.processor_type;
    const loading = body.loading || (asked && asked !== body.config.processor_type ? asked : null);
    style.accepted(body.config, loading);
    show(body.config);
    say("info", `style: "${body.config.prompt}", strength ${body.config.strength}, ${body.config.processor_type}`);
    health.poll();
    return true;
  }
  style.refused();
  const why = body.message || `HTTP ${response.status}`;
  say("error", `${body.error || response.status}: ${why}`);
  if (response.status === 401) {
    const fix = keyInput ? "Type it in the Stream key field below." : "Add &key=… (your stream key) to this dock's URL.";
    alerts.show("send", "error", `Not changed: the server wants the stream key for "${cfg.stream_id}". ${fix}`);
    keyInput?.focus();
  } else if (response.status === 404) {
    alerts.show("send", "error", `Not changed: stream "${cfg.stream_id}" is not on the server. Start the studio or the OBS companion first.`);
  } else {
    alerts.show("send", "error", `Not changed: ${why}`);
  }
  return true;
}

const style = new StyleControls({
  config: cfg.config,
  offered: cfg.processors,
  say,
  send: (changes) => {
    sendConfig(changes);
    return true;
  },
});

function show(config) {
  if (!config) return;
  streamConfig = { ...config };
  style.adopt(config);
  renderProcessorState();
}

function renderProcessorState() {
  const note = style.switchText() || processorText(streamConfig.processor_type, health.states);
  setText($("preview-badge"), note);
  $("preview-badge").hidden = !note;
}

const health = new HealthPoller(
  () => {
    style.setStates(health.states);
    checkSwitch();
    renderProcessorState();
  },
  { states: cfg.processor_states },
);

// The dock hears no `error` messages (those go to the broadcaster): a switch whose processor stopped
// loading, twice in a row, without the stream switching has failed; /healthz says why.
let idlePolls = 0;
function checkSwitch() {
  const pending = style.pending;
  const s = pending && health.states && health.states[pending.type];
  const stopped = s && (s.state === "unavailable" || (s.state !== "loading" && performance.now() - pending.since > 3000));
  idlePolls = stopped ? idlePolls + 1 : 0;
  if (!stopped || (s.state !== "unavailable" && idlePolls < 2)) return;
  idlePolls = 0;
  style.dropSwitch();
  const why = s.reason ? `: ${s.reason}` : "";
  say("error", `could not switch to ${pending.type}${why}`);
  alerts.show("send", "error", `Could not switch to ${pending.type}${why}. The stream goes on with ${streamConfig.processor_type}.`);
}

const view = new LiveView(
  $("preview"),
  // the JSON frame form carries each frame's ts: end-to-end latency
  { streamId: cfg.stream_id, token: token(), withMeta: true },
  { fit: "contain" },
  { status: (msg) => msg && show(msg.config) },
).start();
window.dreamstream = { view, style };

tokenInput?.addEventListener("change", () => view.retarget({ token: token() }));
keyInput?.addEventListener("change", () => alerts.clear("send"));

const STATE_TEXT = {
  connecting: "connecting to the server…",
  waiting: "waiting for the broadcaster: start the studio or the OBS companion",
  offline: "the broadcaster has stopped",
  live: "",
};

setInterval(() => {
  const socket = view.feed.socket;
  let state = socket.link === "open" ? view.state : "connecting";
  let text = STATE_TEXT[state] ?? state;
  // a refused socket opens, then closes: only one that has heard from the server (a `status`) counts as in
  const heard = socket.link === "open" && view.state !== "connecting";
  if (!heard && socket.lastClose && socket.lastClose.code === 1008) {
    state = "refused";
    const fix = tokenInput ? "type it in the Viewer token field below" : "add &token=… to this dock's URL";
    text = `The server refused this dock: ${socket.lastClose.reason}; ${fix}.`;
    alerts.show("token", "error", text, { repeat: false });
  } else if (heard) {
    alerts.clear("token");
  }
  const live = state === "live" && socket.link === "open";
  if (live && view.frames === 0) text = "live: waiting for the first styled frame";
  setText($("state"), state);
  $("state").dataset.state = state;
  setText($("preview-state"), text);
  $("preview-state").hidden = !text;
  setText($("fps"), live ? fmt(view.fps) : "–");
  setText($("latency"), live && view.latencyMs != null ? String(Math.round(view.latencyMs)) : "–");
  $("latency").title = live && view.lastFrame && view.lastFrame.latencyMs != null
    ? `frame ts to this dock; the server's own share: ${Math.round(view.lastFrame.latencyMs)} ms`
    : "";
}, 250);

style.setStates(health.states);
renderProcessorState();
health.start();
