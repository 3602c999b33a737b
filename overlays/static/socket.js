// A WebSocket that reconnects on its own, and the URLs of this server's sockets and pages.
// The viewer pages (stream.js) and the studio's broadcaster socket both use it.

/** An http(s) URL on this server, with every non-empty value URL-encoded: pageUrl("/overlay/x", {token}) */
export function pageUrl(path, params = {}) {
  const url = new URL(path, window.location.href);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, String(value));
  }
  return url.toString();
}

/** The same for a socket: ws://, or wss:// when the page came over https. */
export function socketUrl(path, params = {}) {
  const url = new URL(pageUrl(path, params));
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

/**
 * A WebSocket that reconnects forever: delays double from `minDelayMs` to `maxDelayMs`, each drawn
 * at random from its upper half (jitter), so a server restart is not met by every page at once.
 * A socket that goes quiet for `staleMs` (we ping every `pingMs`) is treated as dead: a server that
 * vanished without closing the TCP connection would otherwise leave us "open" forever.
 *
 * handlers: open(ws), message(event), close(event) -> return false to stop reconnecting, state(link).
 */
export class ReconnectingSocket {
  constructor(url, handlers = {}, options = {}) {
    this.url = url; // a string, or a function returning one (read on every attempt)
    this.handlers = handlers;
    this.minDelayMs = options.minDelayMs ?? 250;
    this.maxDelayMs = options.maxDelayMs ?? 8000;
    this.pingMs = options.pingMs ?? 10000;
    this.staleMs = options.staleMs ?? 30000;
    this.binaryType = options.binaryType ?? "blob";
    this.ws = null;
    this.attempt = 0;
    this.reconnects = 0; // how many times a connection was re-established after being lost
    this.everOpened = false; // a socket of ours has been open and heard from
    this.link = "idle"; // idle | connecting | open | retrying | stopped
    this.retryAt = 0;
    this.lastClose = null; // {code, reason}
    this.stopped = true;
    this._timer = null;
    this._watchdog = null;
    this._lastHeard = 0;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.attempt = 0;
    this._connect();
  }

  stop(code = 1000, reason = "") {
    this.stopped = true;
    clearTimeout(this._timer);
    clearInterval(this._watchdog);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
    this._setLink("stopped");
  }

  /** Close the current socket and connect again now (e.g. after the stream id changed). */
  restart() {
    this.stop();
    this.start();
  }

  get isOpen() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  get bufferedAmount() {
    return this.ws ? this.ws.bufferedAmount : 0;
  }

  send(data) {
    if (!this.isOpen) return false;
    this.ws.send(data);
    return true;
  }

  _setLink(link) {
    this.link = link;
    this.handlers.state?.(link, this);
  }

  _connect() {
    if (this.stopped) return;
    const url = typeof this.url === "function" ? this.url() : this.url;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      this.lastClose = { code: 0, reason: String(err.message || err) };
      this._scheduleRetry();
      return;
    }
    ws.binaryType = this.binaryType;
    this.ws = ws;
    this._setLink("connecting");
    let established = false;
    ws.onopen = () => {
      this._lastHeard = performance.now();
      this._watchdog = setInterval(() => this._checkAlive(), Math.min(this.pingMs, this.staleMs / 2));
      this._setLink("open");
      this.handlers.open?.(ws);
    };
    ws.onmessage = (event) => {
      this._lastHeard = performance.now();
      if (!established) {
        // The server speaks first on every healthy socket (status / ready). Only then does the backoff
        // reset: a server that accepts and at once closes (a refused token) must not be hammered.
        established = true;
        if (this.everOpened) this.reconnects += 1;
        this.everOpened = true;
        this.attempt = 0;
      }
      this.handlers.message?.(event);
    };
    ws.onerror = () => {}; // a close event always follows; it carries what we need
    ws.onclose = (event) => {
      clearInterval(this._watchdog);
      if (this.ws !== ws) return;
      this.ws = null;
      this.lastClose = { code: event.code, reason: event.reason };
      const again = this.handlers.close?.(event);
      if (again === false || this.stopped) {
        this.stopped = true;
        this._setLink("stopped");
        return;
      }
      this._scheduleRetry();
    };
  }

  _checkAlive() {
    if (!this.isOpen) return;
    const quiet = performance.now() - this._lastHeard;
    if (quiet > this.staleMs) {
      this.ws.close(4001, "no message for too long"); // onclose schedules the reconnect
    } else if (quiet > this.pingMs) {
      this.ws.send(JSON.stringify({ type: "ping" }));
    }
  }

  _scheduleRetry() {
    const ceiling = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** this.attempt);
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    this.attempt += 1;
    this.retryAt = performance.now() + delay;
    this._setLink("retrying");
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay);
  }
}
