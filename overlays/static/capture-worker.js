// The studio's capture worker: the metronome and the JPEG encoder, off the page's main thread.
//
// Why a worker: in a tab that is not in front, the page's timers run once a second, rAF stops, and
// canvas.toBlob waits for idle time that never comes (Chromium gives up after ~1 s). A worker's
// timers, OffscreenCanvas.convertToBlob and a MediaStreamTrackProcessor's frames are not slowed, so
// the studio keeps its frame rate while OBS or another tab is in front.
//
// Messages in:  {type: "start", fps, size, readable?, track?}  frames from a MediaStreamTrackProcessor
//                 (its readable, or a transferred track we open one on); neither: frames come with "encode"
//               {type: "fps", fps} | {type: "size", size} | {type: "stop"}
//               {type: "grab"}            encode the newest camera frame
//               {type: "encode", bitmap}  encode this ImageBitmap (the fallback sources)
// Messages out: {type: "started", method} | {type: "tick"} | {type: "frame", blob, width, height}
//               {type: "skip"} (nothing to encode yet) | {type: "failed", message}
const JPEG_QUALITY = 0.85;

let fps = 15;
let size = 512;
let timer = null;
let reader = null;
let newest = null; // the newest VideoFrame from the track, not yet encoded (we own it)
let canvas = null;
let ctx = null;

function setTimer() {
  clearInterval(timer);
  timer = fps > 0 ? setInterval(() => self.postMessage({ type: "tick" }), 1000 / fps) : null;
}

function stop() {
  clearInterval(timer);
  timer = null;
  if (reader) reader.cancel().catch(() => {});
  reader = null;
  if (newest) newest.close();
  newest = null;
}

/** Keep only the newest frame: a camera gives 30 fps, we may send 5; older frames go back at once. */
async function readFrames(readable) {
  const own = readable.getReader();
  reader = own;
  try {
    for (;;) {
      const { value, done } = await own.read();
      if (done || reader !== own) {
        if (value) value.close();
        break;
      }
      if (newest) newest.close();
      newest = value;
    }
  } catch {
    /* the track ended or we cancelled */
  }
}

/** The size to send: the long side at most `size`, never enlarged, even numbers (JPEG 4:2:0). */
function fitted(w, h) {
  const scale = Math.min(1, size / Math.max(w, h));
  return [Math.max(2, Math.round((w * scale) / 2) * 2), Math.max(2, Math.round((h * scale) / 2) * 2)];
}

async function encode(image, w, h) {
  const [cw, ch] = fitted(w, h);
  if (!canvas) {
    canvas = new OffscreenCanvas(cw, ch);
    ctx = canvas.getContext("2d", { alpha: false });
  }
  if (canvas.width !== cw || canvas.height !== ch) {
    canvas.width = cw;
    canvas.height = ch;
  }
  ctx.drawImage(image, 0, 0, cw, ch);
  const blob = await canvas.convertToBlob({ type: "image/jpeg", quality: JPEG_QUALITY });
  self.postMessage({ type: "frame", blob, width: cw, height: ch });
}

self.onmessage = async (event) => {
  const msg = event.data;
  try {
    switch (msg.type) {
      case "start": {
        stop();
        fps = msg.fps;
        size = msg.size;
        let method = "bitmap";
        if (msg.readable) {
          readFrames(msg.readable);
          method = "track-processor";
        } else if (msg.track && typeof MediaStreamTrackProcessor !== "undefined") {
          readFrames(new MediaStreamTrackProcessor({ track: msg.track }).readable);
          method = "track-processor-worker";
        }
        self.postMessage({ type: "started", method });
        setTimer();
        break;
      }
      case "fps":
        fps = msg.fps;
        if (timer !== null) setTimer();
        break;
      case "size":
        size = msg.size;
        break;
      case "stop":
        stop();
        break;
      case "grab": {
        const frame = newest;
        newest = null;
        if (!frame) {
          self.postMessage({ type: "skip" });
          break;
        }
        try {
          await encode(frame, frame.displayWidth, frame.displayHeight);
        } finally {
          frame.close();
        }
        break;
      }
      case "encode":
        try {
          await encode(msg.bitmap, msg.bitmap.width, msg.bitmap.height);
        } finally {
          msg.bitmap.close();
        }
        break;
      default:
        break;
    }
  } catch (err) {
    self.postMessage({ type: "failed", message: String((err && err.message) || err) });
  }
};
