// /overlay/{id}: the styled stream for an OBS Browser Source. The page is transparent; the frame is
// shown only while the stream is live, and the debug HUD (debug=1) says why when it is not.
import { HealthPoller, processorText } from "./processors.js";
import { LiveView, fmt, onObsActiveChange, pageConfig, setText } from "./stream.js";

const cfg = pageConfig();
const canvas = document.getElementById("frame");
document.documentElement.style.setProperty("--fade", `${cfg.fade_ms}ms`);

const view = new LiveView(
  canvas,
  // the JSON frame form carries each frame's ts, which the HUD needs for end-to-end latency
  { streamId: cfg.stream_id, token: cfg.token, withMeta: cfg.debug },
  { fit: cfg.fit, fadeMs: cfg.fade_ms },
).start();

// OBS: stop drawing while the source is off air, pick up the newest frame when it comes back
onObsActiveChange((active) => {
  view.setActive(active);
  document.documentElement.classList.toggle("inactive", !active);
});

window.dreamstream = { view }; // for tests and the browser console

const hud = document.getElementById("hud");
if (hud) {
  const field = (name) => hud.querySelector(`[data-hud="${name}"]`);
  const [state, fps, latency, server, size, reconnects, processor] = [
    "state", "fps", "latency", "server", "size", "reconnects", "processor",
  ].map(field);
  // the stream's processor, and whether it is still loading (model download, compile): from /healthz
  const health = new HealthPoller(() => {});
  health.start();
  setInterval(() => {
    setText(state, linkText(view));
    const live = view.feed.socket.link === "open" && view.state === "live";
    state.dataset.state = view.feed.socket.link === "open" ? view.state : view.feed.socket.link;
    setText(fps, fmt(view.fps));
    // while reconnecting or offline, the last numbers would be stale: show none
    setText(latency, live && view.latencyMs != null ? `${Math.round(view.latencyMs)} ms` : "–");
    const f = view.lastFrame;
    setText(server, live && f && f.latencyMs != null ? `${Math.round(f.latencyMs)} ms` : "–");
    setText(size, f ? `${f.width}×${f.height} #${f.seq ?? view.frames}` : "–");
    setText(reconnects, String(view.feed.socket.reconnects));
    const type = view.feed.status && view.feed.status.config ? view.feed.status.config.processor_type : "";
    setText(processor, type ? processorText(type, health.states) || type : "–");
  }, 250);
}

function linkText(v) {
  const socket = v.feed.socket;
  if (!v.active) return "paused (source inactive)";
  if (socket.link === "open") return v.state;
  if (socket.link === "retrying") {
    const wait = Math.max(0, (socket.retryAt - performance.now()) / 1000).toFixed(1);
    const why = socket.lastClose && socket.lastClose.reason ? ` (${socket.lastClose.reason})` : "";
    return `reconnecting in ${wait} s${why}`;
  }
  return socket.link;
}
