// Which processors this server can run, from /healthz: {"processors": {type: {"state": "ready" |
// "loading" | "unavailable", "progress": 0..1, "reason": ...}}}. A server without that block (older
// servers) offers every processor as before.

/** " 42 %", or "" while the server cannot tell (a progress of 0: the load has not said how far it is). */
function percent(s) {
  return typeof s.progress === "number" && s.progress > 0 ? ` ${Math.round(s.progress * 100)} %` : "";
}

/** "loading lightning… 42 %", "lightning cannot run here: needs a CUDA GPU", or "" when ready / unknown. */
export function processorText(type, states) {
  const s = states && states[type];
  if (!s) return "";
  if (s.state === "loading") return `loading ${type}…${percent(s)}`;
  if (s.state === "unavailable") return `${type} cannot run here${s.reason ? `: ${s.reason}` : ""}`;
  return "";
}

/**
 * Fill a <select> with the processors a user may pick: one the server cannot run is greyed out with the
 * reason; one still loading says how far. `current` (the stream's) is always there and selected, even
 * when it is not offered (e.g. `identity`). Rebuilt only when something changed, so an open list stays open.
 */
export function fillProcessors(select, offered, states, current) {
  const rows = offered.map((type) => {
    const s = states && states[type];
    let label = type;
    if (s && s.state === "loading") label = `${type} (loading…${percent(s)})`;
    if (s && s.state === "unavailable") label = `${type} — ${s.reason || "cannot run here"}`;
    return { type, label, disabled: !!s && s.state === "unavailable" && type !== current, title: (s && s.reason) || "" };
  });
  if (current && !offered.includes(current)) rows.push({ type: current, label: current, disabled: true, title: "" });
  const signature = JSON.stringify([rows, current]);
  if (select.dataset.signature !== signature) {
    select.replaceChildren(
      ...rows.map((row) => {
        const option = new Option(row.label, row.type);
        option.disabled = row.disabled;
        option.title = row.title;
        return option;
      }),
    );
    select.dataset.signature = signature;
  }
  if (current) select.value = current;
}

/** Polls /healthz: every `slowMs`, every `fastMs` while the server or a processor is loading. */
export class HealthPoller {
  constructor(onHealth, { slowMs = 5000, fastMs = 1000, states = null } = {}) {
    this.onHealth = onHealth;
    this.firstStates = states; // from the page itself, until the first answer
    this.slowMs = slowMs;
    this.fastMs = fastMs;
    this.health = null;
    this._timer = null;
  }

  get states() {
    if (this.health) return this.health.processors || null;
    return this.firstStates;
  }

  start() {
    this.poll();
    return this;
  }

  /** Poll now (e.g. right after a processor switch), then on the usual rhythm. */
  async poll() {
    clearTimeout(this._timer);
    let health = null;
    try {
      health = await (await fetch("/healthz", { cache: "no-store" })).json();
    } catch {
      health = null; // unreachable: onHealth(null)
    }
    this.health = health;
    this.onHealth(health);
    const loading = health && (health.status === "loading" || Object.values(health.processors || {}).some((p) => p.state === "loading"));
    this._timer = setTimeout(() => this.poll(), loading ? this.fastMs : this.slowMs);
  }
}
