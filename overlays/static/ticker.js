// A metronome in a worker: timers in a page are slowed to once a second while its tab is hidden,
// a worker's are not, so the studio keeps sending at the chosen fps when the streamer looks away.
let timer = null;
self.onmessage = (event) => {
  clearInterval(timer);
  if (event.data > 0) timer = setInterval(() => self.postMessage(0), event.data);
};
