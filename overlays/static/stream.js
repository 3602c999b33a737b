// The viewer side of a DreamStream stream, shared by every page: the overlay, the compare view, the
// viewer page and the studio's preview.
//
//   ReconnectingSocket  (socket.js) a WebSocket that comes back on its own, backoff with jitter
//   FrameFeed           /ws/viewer/{id} -> the newest decoded frame (createImageBitmap, off the main thread)
//   FrameCanvas         draws one frame into a canvas: fit cover|contain|fill, optional crossfade
//   LiveView            feed + canvas + one requestAnimationFrame loop that draws only the newest frame
//
// Only the newest frame matters: a frame that arrives while another decodes replaces the waiting one,
// and a decoded frame that was never drawn is closed as soon as a newer one is ready. A slow page
// therefore skips frames instead of queueing them.

import { ReconnectingSocket, socketUrl } from "./socket.js";

/** The page's settings, written by the server as one JSON block (never raw into a script). */
export function pageConfig() {
  const el = document.getElementById("page-config");
  return el ? JSON.parse(el.textContent) : {};
}

/** Events per second over a sliding window. */
export class RateMeter {
  constructor(windowMs = 2000) {
    this.windowMs = windowMs;
    this.times = [];
    this.count = 0;
  }
  tick(now = performance.now()) {
    this.times.push(now);
    this.count += 1;
    this.trim(now);
  }
  trim(now) {
    while (this.times.length && now - this.times[0] > this.windowMs) this.times.shift();
  }
  rate(now = performance.now()) {
    this.trim(now);
    if (this.times.length < 2) return 0;
    const span = Math.max(now - this.times[0], 1);
    return ((this.times.length - 1) * 1000) / span;
  }
}

/** Base64 (the part after the comma of a data URL) -> bytes. */
function dataUrlBytes(dataUrl) {
  const text = atob(dataUrl.slice(dataUrl.indexOf(",") + 1));
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) bytes[i] = text.charCodeAt(i);
  return bytes;
}

/**
 * One viewer socket -> the newest decoded frame, ready to draw.
 *
 * `withMeta` asks for the JSON frame form, which carries each frame's `ts` (for end-to-end latency);
 * without it frames come as plain binary JPEG, a third smaller and with nothing to parse.
 * Either way the JPEG is decoded by createImageBitmap, off the main thread.
 *
 * handlers: status(msg) for the stream's waiting/live/offline, link(link, socket) for the socket.
 */
export class FrameFeed {
  constructor({ streamId, token = "", source = "styled", withMeta = false }, handlers = {}) {
    this.streamId = streamId;
    this.token = token;
    this.source = source;
    this.withMeta = withMeta;
    this.handlers = handlers;
    this.state = "connecting"; // the stream's state from `status`, or connecting while we have no socket
    this.status = null;
    this.received = 0;
    this.decoded = 0;
    this.paused = false;
    this._ready = null; // decoded, not yet taken: {bitmap, ts, seq, latencyMs, width, height}
    this._waiting = null; // received while a decode was running: {blob, meta}
    this._decoding = false;
    this.socket = new ReconnectingSocket(
      () =>
        socketUrl(`/ws/viewer/${encodeURIComponent(this.streamId)}`, {
          token: this.token,
          source: this.source === "styled" ? "" : this.source,
          format: this.withMeta ? "json" : "binary",
        }),
      {
        message: (event) => this._onMessage(event),
        close: () => {
          this.state = "connecting";
          this.handlers.status?.(null);
        },
        state: (link, socket) => this.handlers.link?.(link, socket),
      },
    );
  }

  start() {
    this.socket.start();
    return this;
  }

  stop() {
    this.socket.stop();
    this.drop();
  }

  /** Point the feed at another stream (or token) and reconnect. */
  retarget({ streamId = this.streamId, token = this.token } = {}) {
    this.streamId = streamId;
    this.token = token;
    this.drop();
    this.socket.restart();
  }

  /** Pause decoding (only the newest encoded frame is kept); resume decodes it. */
  setPaused(paused) {
    this.paused = paused;
    if (paused) this._closeReady();
    else this._decodeNext();
  }

  /** The newest decoded frame not yet taken, or null. The caller owns (and must close) its bitmap. */
  take() {
    const frame = this._ready;
    this._ready = null;
    return frame;
  }

  drop() {
    this._waiting = null;
    this._closeReady();
  }

  _closeReady() {
    if (this._ready) this._ready.bitmap.close();
    this._ready = null;
  }

  _onMessage(event) {
    if (typeof event.data !== "string") {
      this._offer(event.data, { ts: null, seq: null, latencyMs: null });
      return;
    }
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return;
    }
    if (msg.type === "status") {
      this.state = msg.state;
      this.status = msg;
      if (msg.state !== "live") this.drop();
      this.handlers.status?.(msg);
    } else if (msg.type === "frame" && typeof msg.frame === "string") {
      const blob = new Blob([dataUrlBytes(msg.frame)], { type: "image/jpeg" });
      this._offer(blob, { ts: msg.ts ?? null, seq: msg.seq ?? null, latencyMs: msg.latency_ms ?? null });
    }
  }

  _offer(blob, meta) {
    this.received += 1;
    this._waiting = { blob, meta }; // replaces any older frame still waiting
    this._decodeNext();
  }

  async _decodeNext() {
    if (this._decoding || this.paused || !this._waiting) return;
    const { blob, meta } = this._waiting;
    this._waiting = null;
    this._decoding = true;
    try {
      const bitmap = await createImageBitmap(blob);
      this.decoded += 1;
      if (this.paused) {
        bitmap.close();
      } else {
        this._closeReady(); // decoded but never drawn: a newer one is here
        this._ready = { bitmap, ...meta, width: bitmap.width, height: bitmap.height, receivedAt: Date.now() };
      }
    } catch (err) {
      console.warn("dreamstream: a frame did not decode", err);
    } finally {
      this._decoding = false;
    }
    this._decodeNext();
  }
}

/** Where a `w`x`h` frame lands in a `W`x`H` box for each fit. */
export function fitRect(fit, w, h, W, H) {
  if (fit === "fill") return [0, 0, W, H];
  const scale = fit === "contain" ? Math.min(W / w, H / h) : Math.max(W / w, H / h);
  const dw = w * scale;
  const dh = h * scale;
  return [(W - dw) / 2, (H - dh) / 2, dw, dh];
}

/**
 * A canvas that shows one frame at a time, sized to its element in device pixels.
 * With `fadeMs` a new frame fades in over the previous one.
 */
export class FrameCanvas {
  constructor(canvas, { fit = "contain", fadeMs = 0 } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { alpha: true });
    this.fit = fit;
    this.fadeMs = fadeMs;
    this.current = null;
    this.previous = null;
    this.fadeStart = 0;
    this.dirty = false;
    this.resize();
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => this.resize()).observe(canvas);
    } else {
      window.addEventListener("resize", () => this.resize());
    }
  }

  get hasFrame() {
    return this.current !== null;
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(this.canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(this.canvas.clientHeight * dpr));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
      this.dirty = true;
    }
  }

  /** Take ownership of `frame.bitmap` and show it from the next render. */
  show(frame, now = performance.now()) {
    if (this.previous) this.previous.bitmap.close();
    this.previous = null;
    if (this.current && this.fadeMs > 0) {
      this.previous = this.current;
      this.fadeStart = now;
    } else if (this.current) {
      this.current.bitmap.close();
    }
    this.current = frame;
    this.dirty = true;
  }

  clear() {
    for (const frame of [this.previous, this.current]) if (frame) frame.bitmap.close();
    this.previous = this.current = null;
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.dirty = false;
  }

  /** Draw if anything changed. */
  render(now = performance.now()) {
    if (!this.dirty && !this.previous) return;
    const { ctx, canvas } = this;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    let alpha = 1;
    if (this.previous) {
      alpha = Math.min(1, (now - this.fadeStart) / this.fadeMs);
      if (alpha >= 1) {
        this.previous.bitmap.close();
        this.previous = null;
      } else {
        this._draw(this.previous, 1);
      }
    }
    if (this.current) this._draw(this.current, alpha);
    this.dirty = false;
  }

  _draw(frame, alpha) {
    const [x, y, w, h] = fitRect(this.fit, frame.width, frame.height, this.canvas.width, this.canvas.height);
    this.ctx.globalAlpha = alpha;
    this.ctx.drawImage(frame.bitmap, x, y, w, h);
    this.ctx.globalAlpha = 1;
  }
}

/**
 * A stream drawn into a canvas: a FrameFeed, a FrameCanvas and one animation-frame loop.
 *
 * The canvas element gets `data-frames` (frames drawn so far) and `data-state`, and the class
 * `showing` while the stream is live and a frame is on it, so CSS decides what hidden means.
 * handlers: frame(frame, view) after each new frame is drawn, status(msg|null, view), link(link, socket).
 */
export class LiveView {
  constructor(canvas, feedOptions, { fit = "contain", fadeMs = 0 } = {}, handlers = {}) {
    this.canvasEl = canvas;
    this.handlers = handlers;
    this.canvas = new FrameCanvas(canvas, { fit, fadeMs });
    this.fadeMs = fadeMs;
    this.frames = 0;
    this.meter = new RateMeter();
    this.lastFrame = null; // metadata of the newest frame drawn (its bitmap belongs to the canvas)
    this.latencyMs = null; // now - frame ts when it was drawn, for feeds with metadata
    this.active = true;
    this._clearTimer = null;
    this.feed = new FrameFeed(feedOptions, {
      status: (msg) => this._onStatus(msg),
      link: (link, socket) => handlers.link?.(link, socket),
    });
    this._loop = (now) => {
      this._tick(now);
      requestAnimationFrame(this._loop);
    };
  }

  start() {
    this.feed.start();
    requestAnimationFrame(this._loop);
    this._publish();
    return this;
  }

  get state() {
    return this.feed.state;
  }

  get fps() {
    return this.meter.rate();
  }

  /** Stop drawing (and decoding) while hidden, e.g. an OBS source that is not on air. */
  setActive(active) {
    this.active = active;
    this.feed.setPaused(!active);
  }

  retarget(options) {
    this.canvas.clear();
    this.feed.retarget(options);
    this._publish();
  }

  _tick(now) {
    if (!this.active) return;
    const frame = this.feed.take();
    if (frame) {
      this.canvas.show(frame, now);
      this.frames += 1;
      this.meter.tick(now);
      this.lastFrame = { ts: frame.ts, seq: frame.seq, latencyMs: frame.latencyMs, width: frame.width, height: frame.height };
      if (frame.ts != null) this.latencyMs = Date.now() - frame.ts;
      clearTimeout(this._clearTimer);
    }
    this.canvas.render(now);
    if (frame) {
      this._publish();
      this.handlers.frame?.(frame, this);
    }
  }

  _onStatus(msg) {
    if (this.state !== "live") {
      this.latencyMs = null; // a number from before the stream stopped (or the socket closed) is not news
      // let the page fade the last frame out, then forget it so a restart never flashes it again
      clearTimeout(this._clearTimer);
      this._clearTimer = setTimeout(() => {
        this.canvas.clear();
        this._publish();
      }, this.fadeMs);
    }
    this._publish();
    this.handlers.status?.(msg, this);
  }

  _publish() {
    const el = this.canvasEl;
    el.dataset.frames = String(this.frames);
    el.dataset.state = this.state;
    el.classList.toggle("showing", this.state === "live" && this.canvas.hasFrame);
  }
}

/** Set an element's text only when it changed (HUDs update every frame). */
export function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

/** "12.3" or "–" */
export function fmt(value, digits = 1) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}

/** OBS tells a browser source when it goes on or off air; outside OBS this never fires. */
export function onObsActiveChange(callback) {
  window.addEventListener("obsSourceActiveChanged", (event) => callback(!!(event.detail && event.detail.active)));
}
