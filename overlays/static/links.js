// The studio's "Use it" card: the viewer, overlay, dock and compare URLs of the stream, with the
// viewer token (and, for the dock, the stream key) the user typed, and Copy buttons.
import { pageUrl } from "./socket.js";

const $ = (id) => document.getElementById(id);

export class ShareLinks {
  /** streamId(), key(), token(): the studio's current values; say(level, text) for messages. */
  constructor({ streamId, key, token, say }) {
    Object.assign(this, { streamId, key, token, say });
    for (const id of ["overlay-fit", "overlay-fade", "overlay-debug"]) $(id).addEventListener("input", () => this.render());
    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", () => this.copy($(button.dataset.copy)));
    }
  }

  render() {
    const id = encodeURIComponent(this.streamId());
    const token = this.token();
    const fade = Number.parseInt($("overlay-fade").value, 10) || 0;
    const urls = {
      viewer: pageUrl(`/view/${id}`, { token }),
      overlay: pageUrl(`/overlay/${id}`, {
        fit: $("overlay-fit").value === "cover" ? "" : $("overlay-fit").value,
        fade: fade > 0 ? fade : "",
        debug: $("overlay-debug").checked ? 1 : "",
        token,
      }),
      dock: pageUrl(`/dock/${id}`, { token, key: this.key() }),
      compare: pageUrl(`/overlay/${id}/compare`, { token }),
    };
    for (const [name, url] of Object.entries(urls)) {
      $(`url-${name}`).value = url;
      $(`open-${name}`).href = url;
    }
  }

  async copy(input) {
    try {
      await navigator.clipboard.writeText(input.value);
    } catch {
      input.select(); // clipboard API needs a secure page; fall back to the old way
      document.execCommand("copy");
    }
    const what = input.id === "url-dock" && this.key() ? "the dock URL (with your stream key)" : input.value;
    this.say("info", `copied ${what}`);
  }
}
