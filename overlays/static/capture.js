// The studio's source: a camera or a screen -> JPEG blobs at a steady rate, made in a worker
// (capture-worker.js) so that a tab in the background keeps the rate.
//
// A frame is captured only when `ready()` says the way out is clear (the socket has sent the last
// one), so on a slow uplink frames are held back here instead of piling up in the browser.
import { RateMeter } from "./stream.js";

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
 * Where frames come from, best first: a MediaStreamTrackProcessor (the camera's own frames, read in
 * the worker), the same opened inside the worker on a transferred track, an ImageBitmap of the
 * <video> encoded in the worker, or (no OffscreenCanvas) the page's own canvas. Only the first two
 * keep full speed in a background tab in every browser that has them; see capture-worker.js.
 */
function canEncodeInWorker() {
  return typeof OffscreenCanvas !== "undefined" && "convertToBlob" in OffscreenCanvas.prototype;
}

/**
 * handlers: ready() -> "ok" | "busy" | "closed", send(blob) -> bool, ended(why) when the source stops.
 * Options `fps` and `size` (the long side in pixels) may change at any time.
 * `method` says which way frames are taken (see above), for the page and the tests.
 */
export class Capture {
  constructor(video, handlers, { fps = 15, size = 512 } = {}) {
    this.video = video;
    this.handlers = handlers;
    this.media = null;
    this.kind = "";
    this.method = "";
    this.held = 0; // ticks skipped because the previous frame was still on its way
    this.sent = new RateMeter();
    this._fps = fps;
    this._size = size;
    this._track = null; // our clone of the video track, handed to the frame processor
    this._encodingSince = 0; // performance.now() of the frame being encoded, 0 when none
    this._canvas = null; // last resort: the page's canvas and toBlob (slowed down in a background tab)
    this._worker = new Worker("/static/capture-worker.js");
    this._worker.onmessage = (event) => this._onWorker(event.data);
  }

  get active() {
    return this.media !== null;
  }

  set fps(fps) {
    this._fps = fps;
    this._worker.postMessage({ type: "fps", fps });
  }

  set size(size) {
    this._size = size;
    this._worker.postMessage({ type: "size", size });
  }

  get size() {
    return this._size;
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
    this._worker.postMessage({ type: "stop" });
    if (this.media) for (const track of this.media.getTracks()) track.stop();
    if (this._track) this._track.stop();
    this._track = null;
    this.media = null;
    this.video.srcObject = null;
    this._encodingSince = 0;
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
    this._startWorker(track);
    return track.label || "unnamed";
  }

  _startWorker(track) {
    const start = { type: "start", fps: this._fps, size: this._size };
    this.method = canEncodeInWorker() ? "bitmap" : "canvas";
    if (typeof MediaStreamTrackProcessor !== "undefined") {
      try {
        this._track = track.clone();
        const { readable } = new MediaStreamTrackProcessor({ track: this._track });
        this._worker.postMessage({ ...start, readable }, [readable]);
        this.method = "track-processor";
        return;
      } catch (err) {
        console.info("dreamstream: MediaStreamTrackProcessor on the page failed; trying the worker", err);
      }
    }
    try {
      // browsers that offer MediaStreamTrackProcessor only in workers take a transferred track
      this._track = track.clone();
      this._worker.postMessage({ ...start, track: this._track }, [this._track]);
      this.method = "pending"; // the worker's "started" says which
      return;
    } catch {
      this._track = null; // tracks are not transferable here
    }
    this._worker.postMessage(start);
  }

  _onWorker(msg) {
    switch (msg.type) {
      case "started":
        if (this.method === "pending") this.method = msg.method === "bitmap" ? (canEncodeInWorker() ? "bitmap" : "canvas") : msg.method;
        break;
      case "tick":
        this._tick();
        break;
      case "frame":
        this._encodingSince = 0;
        if (this.media && this.handlers.send(msg.blob)) this.sent.tick();
        break;
      case "skip":
        this._encodingSince = 0;
        break;
      case "failed":
        this._encodingSince = 0;
        console.warn(`dreamstream: a frame failed to encode (${this.method}): ${msg.message}`);
        break;
      default:
        break;
    }
  }

  _tick() {
    if (!this.media || this.method === "pending") return; // the worker has not said how it takes frames yet
    const now = performance.now();
    if (this._encodingSince && now - this._encodingSince < 2000) return; // still encoding the last one
    const way = this.handlers.ready();
    if (way !== "ok") {
      if (way === "busy") this.held += 1;
      return;
    }
    this._encodingSince = now;
    if (this.method.startsWith("track-processor")) {
      this._worker.postMessage({ type: "grab" });
    } else {
      this._grabVideo().catch((err) => {
        this._encodingSince = 0;
        console.warn("dreamstream: could not take a frame from the video", err);
      });
    }
  }

  /** The fallbacks: the <video>'s current picture, encoded in the worker (or, last, on the page). */
  async _grabVideo() {
    const { videoWidth: vw, videoHeight: vh } = this.video;
    if (!vw || !vh) {
      this._encodingSince = 0; // the first frame of the source is not there yet
      return;
    }
    if (this.method === "bitmap") {
      const bitmap = await createImageBitmap(this.video);
      this._worker.postMessage({ type: "encode", bitmap }, [bitmap]);
      return;
    }
    const scale = Math.min(1, this._size / Math.max(vw, vh));
    const w = Math.max(2, Math.round((vw * scale) / 2) * 2);
    const h = Math.max(2, Math.round((vh * scale) / 2) * 2);
    if (!this._canvas) this._canvas = document.createElement("canvas");
    this._canvas.width = w;
    this._canvas.height = h;
    this._canvas.getContext("2d", { alpha: false }).drawImage(this.video, 0, 0, w, h);
    const blob = await new Promise((resolve) => this._canvas.toBlob(resolve, "image/jpeg", 0.85));
    this._onWorker(blob ? { type: "frame", blob } : { type: "skip" });
  }
}
