// The style controls (prompt, presets, strength, processor; in the studio also steps, seed and
// ControlNet), shared by the studio and the OBS dock. Each change is sent at once (typing: after a
// short pause) through `send(changes)`: the studio's broadcaster socket, the dock's HTTP call. The
// controls then show what the stream really uses, as the server reports it.
import { fillProcessors, processorText } from "./processors.js";

// The settings each processor uses; the others' controls are hidden (they would do nothing).
// `filter` is OpenCV: no denoising steps, no seed, no ControlNet.
const DIFFUSION = ["prompt", "strength", "num_steps", "seed", "use_controlnet", "processor_type"];
const USES = {
  filter: ["prompt", "strength", "processor_type"],
  identity: ["prompt", "strength", "processor_type"],
  standard: DIFFUSION,
  lightning: DIFFUSION,
};

const $ = (id) => document.getElementById(id);

/**
 * send(changes) -> true when it went out (false: not connected; the changes wait for `flush()`).
 * say(level, text) for messages. offered: the processor types a user may pick.
 */
export class StyleControls {
  constructor({ config, offered, send, say }) {
    this.send = send;
    this.say = say;
    this.offered = offered;
    this.states = null; // /healthz processors, when the server has them
    this.config = { ...config }; // what the stream uses, as the server last said
    this.dirty = new Set(); // controls changed since then
    // A switch to a processor the server is still loading: the stream keeps its processor until then, and
    // the server applies the switch's changes when the load is done (or says why it failed).
    this.pending = null; // {type, since, changes}
    this._sent = null; // the changes last sent
    this.ui = {
      prompt: $("prompt"),
      promptError: $("prompt-error"),
      strength: $("strength"),
      strengthValue: $("strength-value"),
      processor: $("processor"),
      processorNote: $("processor-note"),
      steps: $("steps"),
      seed: $("seed"),
      seedRandom: $("seed-random"),
      controlnet: $("controlnet"),
    };
    this._timer = null;
    this._bind();
    this.adopt(config);
  }

  /** The value each setting's control holds now. */
  value(name) {
    const { ui } = this;
    switch (name) {
      case "prompt":
        return ui.prompt.value.trim();
      case "strength":
        return Number(ui.strength.value);
      case "num_steps":
        return Number.parseInt(ui.steps.value, 10);
      case "seed":
        return Number.parseInt(ui.seed.value, 10);
      case "processor_type":
        return ui.processor.value;
      case "use_controlnet":
        return ui.controlnet.checked;
      default:
        return undefined;
    }
  }

  /** Show the stream's config (the server's word), keeping what the user is changing right now. */
  adopt(config) {
    if (!config) return;
    this.config = { ...config };
    if (this.pending && config.processor_type === this.pending.type) this.pending = null; // switched
    const { ui } = this;
    if (!this.dirty.has("prompt") && document.activeElement !== ui.prompt) {
      ui.prompt.value = config.prompt;
      this._promptOk(true);
    }
    for (const button of document.querySelectorAll("#presets button")) {
      button.setAttribute("aria-pressed", String(button.dataset.prompt === config.prompt));
    }
    if (!this.dirty.has("strength")) ui.strength.value = config.strength;
    ui.strengthValue.value = Number(ui.strength.value).toFixed(2);
    if (ui.steps && !this.dirty.has("num_steps")) ui.steps.value = config.num_steps;
    if (ui.seed && !this.dirty.has("seed")) ui.seed.value = config.seed;
    if (ui.controlnet && !this.dirty.has("use_controlnet")) ui.controlnet.checked = !!config.use_controlnet;
    this.renderProcessors();
  }

  /** /healthz's processors (or null): grey out what cannot run, say what is loading. */
  setStates(states) {
    this.states = states;
    this.renderProcessors();
  }

  renderProcessors() {
    const chosen = this.pending ? this.pending.type : this.config.processor_type;
    const type = this.dirty.has("processor_type") ? this.ui.processor.value : chosen;
    fillProcessors(this.ui.processor, this.offered, this.states, type);
    if (this.ui.processorNote) this.ui.processorNote.textContent = this.switchText() || processorText(type, this.states);
    const uses = USES[type] || DIFFUSION;
    for (const el of document.querySelectorAll("[data-for]")) el.hidden = !uses.includes(el.dataset.for);
  }

  /** The server took a change: show its config. `loading`: the processor it is loading before it switches. */
  accepted(config, loading = null) {
    this.dirty.clear();
    const waiting = loading && loading !== config.processor_type;
    this.pending = waiting ? { type: loading, since: performance.now(), changes: this._sent || {} } : null;
    this._sent = null;
    this.adopt(config);
  }

  /** The server refused a change (or a switch failed): show what the stream really uses. */
  refused() {
    this.dirty.clear();
    this.pending = null;
    this.adopt(this.config);
  }

  /** "loading lightning… 42 % (the stream goes on with filter until then)", or "" when no switch is waiting. */
  switchText() {
    if (!this.pending) return "";
    const { type } = this.pending;
    const progress = processorText(type, this.states);
    const loading = progress.startsWith("loading") ? progress : `loading ${type}…`;
    return `${loading} (the stream goes on with ${this.config.processor_type} until then)`;
  }

  /** A switch the server gave up on without telling us (the dock hears no errors): forget it. */
  dropSwitch() {
    this.pending = null;
    this.renderProcessors();
  }

  /** Send what changed, now. */
  flush() {
    clearTimeout(this._timer);
    if (!this.dirty.size) return;
    let changes = {};
    for (const name of this.dirty) changes[name] = this.value(name);
    if (this.pending) {
      // the server applies a switch's changes when the processor is loaded, and a change without the
      // processor would cancel it: send the switch again with everything changed since
      changes = { ...this.pending.changes, processor_type: this.pending.type, ...changes };
    }
    this._sent = { ...changes };
    for (const name of ["num_steps", "seed"]) {
      if (name in changes && !(Number.isInteger(changes[name]) && changes[name] >= 0)) {
        this.say("error", `${name === "seed" ? "the seed" : "steps"} must be a whole number`);
        return;
      }
    }
    this.send(changes);
  }

  change(name, { now = true } = {}) {
    this.dirty.add(name);
    if (now) {
      this.flush();
    } else {
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this.flush(), 300);
    }
  }

  /** An empty prompt is never sent: the field says why, and the stream keeps its prompt. */
  _promptOk(ok) {
    const { ui } = this;
    ui.prompt.setAttribute("aria-invalid", ok ? "false" : "true");
    ui.promptError.hidden = ok;
    ui.promptError.textContent = ok ? "" : "An empty prompt is not sent: type a style, or pick a preset. The stream keeps its prompt.";
    return ok;
  }

  _bind() {
    const { ui } = this;
    ui.prompt.addEventListener("input", () => {
      if (this._promptOk(ui.prompt.value.trim() !== "")) {
        this.change("prompt", { now: false });
      } else {
        this.dirty.delete("prompt");
        clearTimeout(this._timer);
      }
    });
    ui.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault(); // one line; Enter sends at once
        if (this._promptOk(ui.prompt.value.trim() !== "")) this.change("prompt");
      }
    });
    ui.prompt.addEventListener("blur", () => {
      if (ui.prompt.value.trim() === "") {
        ui.prompt.value = this.config.prompt; // back to what the stream uses; the message stays a moment
        setTimeout(() => this._promptOk(ui.prompt.value.trim() !== ""), 4000);
      }
    });
    for (const button of document.querySelectorAll("#presets button")) {
      button.addEventListener("click", () => {
        ui.prompt.value = button.dataset.prompt;
        this._promptOk(true);
        this.change("prompt");
      });
    }
    ui.strength.addEventListener("input", () => {
      ui.strengthValue.value = Number(ui.strength.value).toFixed(2);
      this.change("strength", { now: false });
    });
    ui.processor.addEventListener("change", () => this.change("processor_type"));
    ui.steps?.addEventListener("change", () => this.change("num_steps"));
    ui.seed?.addEventListener("change", () => this.change("seed"));
    ui.seedRandom?.addEventListener("click", () => {
      ui.seed.value = String(Math.floor(Math.random() * 2 ** 31));
      this.change("seed");
    });
    ui.controlnet?.addEventListener("change", () => this.change("use_controlnet"));
  }
}
