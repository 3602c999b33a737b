// /view/{id}: the styled stream, full page, with its state and fps.
import { LiveView, fmt, pageConfig, setText } from "./stream.js";

const cfg = pageConfig();
const stateEl = document.getElementById("state");
const waiting = document.getElementById("waiting");
const waitingText = document.getElementById("waiting-text");
const fpsEl = document.getElementById("fps");

const WAITING_TEXT = {
  connecting: "connecting to the server…",
  waiting: "waiting for the broadcaster to start",
  offline: "the broadcaster has stopped; this page picks the stream up again when it returns",
  live: "live",
};

const view = new LiveView(
  document.getElementById("frame"),
  { streamId: cfg.stream_id, token: cfg.token },
  { fit: cfg.fit },
).start();
window.dreamstream = { view };

setInterval(() => {
  const socket = view.feed.socket;
  let state = socket.link === "open" ? view.state : "connecting";
  let text = WAITING_TEXT[state] || state;
  if (socket.link === "retrying" && socket.lastClose && socket.lastClose.code === 1008) {
    state = "refused";
    text = `the server refused this viewer: ${socket.lastClose.reason}. Add ?token=… to the address.`;
  }
  setText(stateEl, state);
  stateEl.dataset.state = state;
  setText(waitingText, text);
  waiting.hidden = state === "live" && view.frames > 0;
  setText(fpsEl, fmt(view.fps));
}, 250);
