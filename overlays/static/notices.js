// What the control pages tell the user: a log of messages, where a message repeated word for word is
// folded into one line with a count (×53), and sticky alerts shown where the eye is (above the preview)
// for what needs doing: a refused key or token, a processor switch that failed.
//
// Everything is put in as text nodes: server messages are never parsed as HTML.

/** The log under "Messages": newest first, at most `max` lines, repeats folded with a count. */
export class MessageLog {
  constructor(list, { max = 30, onChange = null } = {}) {
    this.list = list;
    this.max = max;
    this.onChange = onChange;
    this.errors = 0;
  }

  say(level, text) {
    (level === "error" ? console.warn : console.info)(`dreamstream: ${text}`);
    if (level === "error") this.errors += 1;
    if (!this.list) return;
    const key = `${level}\u0000${text}`;
    let li = [...this.list.children].find((el) => el.dataKey === key);
    if (li) {
      li.count += 1;
      li.querySelector(".count").textContent = `×${li.count}`;
    } else {
      li = document.createElement("li");
      li.className = level;
      li.dataKey = key;
      li.count = 1;
      const count = document.createElement("span");
      count.className = "count";
      li.append(document.createElement("time"), " ", text, " ", count);
    }
    li.querySelector("time").textContent = new Date().toLocaleTimeString();
    this.list.prepend(li);
    while (this.list.children.length > this.max) this.list.lastChild.remove();
    this.onChange?.(this);
  }
}

/**
 * Sticky alerts, one per topic ("key", "token", "processor"...): a new one for a topic replaces the
 * old; the same text again only counts up. They stay until `clear(topic)` (the cause is gone) or the
 * user dismisses them.
 */
export class Alerts {
  constructor(container) {
    this.container = container;
    this.byTopic = new Map();
  }

  /** `repeat: false` for a state shown again and again (polled), which must not count up. */
  show(topic, level, text, { repeat = true } = {}) {
    let el = this.byTopic.get(topic);
    if (el && el.text === text) {
      if (!repeat) return;
      el.count += 1;
      el.querySelector(".count").textContent = `×${el.count}`;
      return;
    }
    if (!el) {
      el = document.createElement("div");
      el.setAttribute("role", "alert");
      el.dataset.topic = topic;
      const close = document.createElement("button");
      close.type = "button";
      close.className = "dismiss";
      close.title = "dismiss";
      close.textContent = "×";
      close.addEventListener("click", () => this.clear(topic));
      const body = document.createElement("span");
      body.className = "alert-text";
      const count = document.createElement("span");
      count.className = "count";
      el.append(body, count, close);
      this.container.append(el);
      this.byTopic.set(topic, el);
    }
    el.className = `alert ${level}`;
    el.text = text;
    el.count = 1;
    el.querySelector(".alert-text").textContent = text;
    el.querySelector(".count").textContent = "";
  }

  clear(topic) {
    const el = this.byTopic.get(topic);
    if (el) el.remove();
    this.byTopic.delete(topic);
  }

  has(topic) {
    return this.byTopic.has(topic);
  }
}
