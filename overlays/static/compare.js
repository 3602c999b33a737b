// /overlay/{id}/compare: the frames as sent (source=original) beside the styled ones.
import { LiveView, fmt, pageConfig, setText } from "./stream.js";

const cfg = pageConfig();
const views = {};
for (const source of ["original", "styled"]) {
  views[source] = new LiveView(
    document.getElementById(source),
    { streamId: cfg.stream_id, token: cfg.token, source, withMeta: cfg.debug },
    { fit: "contain" },
  ).start();
}
window.dreamstream = { views };

const stateEl = document.getElementById("state");
setInterval(() => {
  for (const [source, view] of Object.entries(views)) {
    const info = document.querySelector(`#panel-${source} [data-info]`);
    const latency = cfg.debug && view.latencyMs != null ? ` · ${Math.round(view.latencyMs)} ms` : "";
    setText(info, view.frames ? `${fmt(view.fps)} fps${latency}` : "");
  }
  const v = views.styled;
  const state = v.feed.socket.link === "open" ? v.state : "connecting";
  setText(stateEl, state === "live" ? "" : `${cfg.stream_id}: ${state}`);
  stateEl.dataset.state = state;
}, 250);
