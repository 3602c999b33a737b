// The studio's source: a camera or a screen -> a <video> -> JPEG blobs at a steady rate.
//
// A frame is captured only when `ready()` says the way out is clear (the socket has sent the last
// one), so on a slow uplink frames are held back here instead of piling up in the browser.
import { RateMeter } from "./stream.js";

const JPEG_QUALITY = 0.85;

/** What went wrong with getUserMedia / getDisplayMedia, and what to do about it. */
export function mediaError(err, what) {
  if (!window.isSecureContext) {
    const port = window.location.port || 80;
    return `${what} needs a secure page: open the studio as http://localhost:${port}/ on this machine, or serve it over https`;
  }
  switch (err && err.name) {
    case "NotAllowedError":
      return `${what} permission was refused; allow it in the browser's address bar and press the button again`;
    case "NotFoundError":
    case "OverconstrainedError":
      return `no ${what} found; plug one in, pick another in the list, or use Share screen`;
    case "NotReadableError":
      return `the ${what} is busy in another program (close it there, or use Share screen)`;
    default:
      return `${what} failed: ${err && err.message ? err.message : err}`;
  }
}

/** The cameras the browser will name (after permission was given once). */
export async function listCameras() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  return devices.filter((d) => d.kind === "videoinput" && d.deviceId);
}

/**
 * handlers: ready() -> "ok" | "busy" | "closed", send(blob) -> bool, ended(why) when the source stops.
 * Options `fps` and `size` (the long side in pixels) may change at any time.
 */
export class Capture {
  constructor(video, handlers, { fps = 15, size = 512 } = {}) {
    this.video = video;
    this.handlers = handlers;
    this.size = size;
    this.media = null;
    this.kind = "";
    this.held = 0; // ticks skipped because the previous frame was still on its way
    this.sent = new RateMeter();
    this._fps = fps;
    this._encoding = false;
    this._canvas = document.createElement("canvas");
    this._ctx = this._canvas.getContext("2d", { alpha: false });
    // page timers slow to once a second in a background tab; a worker's do not
    this._ticker = new Worker("/static/ticker.js");
    this._ticker.onmessage = () => this._tick();
  }

  get active() {
    return this.media !== null;
  }

  set fps(fps) {
    this._fps = fps;
    this._setTicker();
  }

  /** Start a camera (`deviceId` or the default). Throws an Error whose message says what to do. */
  async camera(deviceId = "") {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) throw new Error(mediaError(null, "the camera"));
    const video = { width: { ideal: 1280 }, height: { ideal: 720 } };
    if (deviceId) video.deviceId = { exact: deviceId };
    try {
      return this._use(await navigator.mediaDevices.getUserMedia({ video, audio: false }), "camera");
    } catch (err) {
      throw new Error(mediaError(err, "the camera"));
    }
  }

  async screen() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) {
      throw new Error(mediaError(null, "screen capture"));
    }
    try {
      const media = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 30 } }, audio: false });
      return this._use(media, "screen");
    } catch (err) {
      throw new Error(mediaError(err, "screen capture"));
    }
  }

  stop() {
    if (this.media) for (const track of this.media.getTracks()) track.stop();
    this.media = null;
    this.video.srcObject = null;
    this._setTicker();
  }

  /** -> the track's label */
  _use(media, kind) {
    this.stop();
    this.media = media;
    this.kind = kind;
    this.held = 0;
    const [track] = media.getVideoTracks();
    track.addEventListener("ended", () => {
      if (this.media === media) {
        this.stop();
        this.handlers.ended?.(`${kind} capture ended`);
      }
    });
    this.video.srcObject = media;
    this.video.play().catch(() => {});
    this._setTicker();
    return track.label || "unnamed";
  }

  _setTicker() {
    this._ticker.postMessage(this.media ? 1000 / this._fps : 0);
  }

  async _tick() {
    if (!this.media || this._encoding) return;
    const way = this.handlers.ready();
    if (way !== "ok") {
      if (way === "busy") this.held += 1;
      return;
    }
    const { videoWidth: vw, videoHeight: vh } = this.video;
    if (!vw || !vh) return; // the first frame of the source is not there yet
    const scale = Math.min(1, this.size / Math.max(vw, vh));
    const w = Math.max(2, Math.round((vw * scale) / 2) * 2);
    const h = Math.max(2, Math.round((vh * scale) / 2) * 2);
    if (this._canvas.width !== w || this._canvas.height !== h) {
      this._canvas.width = w;
      this._canvas.height = h;
    }
    this._encoding = true;
    try {
      this._ctx.drawImage(this.video, 0, 0, w, h);
      const blob = await new Promise((resolve) => this._canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
      if (blob && this.media && this.handlers.send(blob)) this.sent.tick();
    } finally {
      this._encoding = false;
    }
  }
}
