// One relay session over a WebSocket that survives disconnects.
//
// Audio goes through a bounded queue (30 s by default): while the socket is down, captured audio
// waits there and is sent first on the next connection, so speech spoken during an outage is
// still transcribed. Audio the browser had accepted but not yet put on the wire when the socket
// died (WebSocket.bufferedAmount) is queued again. Every close other than a deliberate
// CloseStream and the errors that a retry cannot fix starts a reconnect with exponential
// backoff and jitter; the reconnect asks for the session again with `since=` so the relay
// replays only the turns this page has not seen.

export const BACKOFF_BASE_MS = 250;
export const BACKOFF_MAX_MS = 5000;

/** Errors a reconnect cannot fix: the page says so and stops. */
const FATAL_ERRORS = new Set([
  "UNAUTHORIZED",
  "FORBIDDEN",
  "INVALID_SESSION",
  "INVALID_PARAMETER",
  "UNSUPPORTED_ENCODING",
  "UNSUPPORTED_SAMPLE_RATE",
  "FRAME_TOO_LARGE",
  "SESSION_ENDED",
]);
/** Errors that clear on a new stream (the relay drops the backlog with the old one). */
const RETRYABLE_ERRORS = new Set(["BACKLOG_EXCEEDED", "INTERNAL_SERVER_ERROR", "ENGINE_ERROR", "CAPACITY", "SESSION_FULL", "ENGINE_UNAVAILABLE", "RATE_LIMITED"]);
const FATAL_CLOSE_CODES = new Set([4001, 4003, 4008, 4009, 4010]);

/** Delay before reconnect attempt `attempt` (0-based): 250 ms doubling to 5 s, +-50% jitter. */
export function backoffDelay(attempt, random = Math.random) {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 10));
  return Math.round(Math.min(BACKOFF_MAX_MS, base * (0.5 + random())));
}

export function isFatal(closeCode, errorCode) {
  if (errorCode && FATAL_ERRORS.has(errorCode)) return true;
  if (errorCode && RETRYABLE_ERRORS.has(errorCode)) return false;
  return FATAL_CLOSE_CODES.has(closeCode);
}

const HIGH_WATER_BYTES = 64 * 1024; // what may sit in the browser's socket buffer at once
const CATCH_UP_SPEED = 4; // backlog goes out at up to 4x real time, so the engine keeps up
const KEEPALIVE_MS = 8000;
const FINISH_TIMEOUT_MS = 15000; // the relay flushes within RELAY_FLUSH_TIMEOUT_SECONDS (8 s)
const RECENT_FRAMES = 64;
const TIMELINES_KEPT = 50;

export class RelayConnection {
  /**
   * @param {object} options
   * @param {string} options.endpoint ws(s)://host/v2/listen
   * @param {() => Record<string, string|number|null>} options.query parameters for each connect
   * @param {(message: object) => void} options.onMessage every relay message, parsed
   * @param {(status: object) => void} options.onStatus state changes
   * @param {number} [options.bytesPerSecond] 32000 for 16 kHz Int16
   * @param {number} [options.bufferSeconds] audio kept while disconnected
   */
  constructor({ endpoint, query, onMessage, onStatus, bytesPerSecond = 32000, bufferSeconds = 30 }) {
    this.endpoint = endpoint;
    this.query = query;
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.bytesPerSecond = bytesPerSecond;
    this.maxQueueBytes = bufferSeconds * bytesPerSecond;
    this.state = "idle";
    this.ws = null;
    this.connected = false; // Connected received on this.ws
    this.queue = []; // {pcm: ArrayBuffer, at: capture time in ms}
    this.queuedBytes = 0;
    this.droppedBytes = 0;
    this.segments = []; // this socket's stream offsets -> capture times
    this.streamBytes = 0;
    this.timelines = new Map(); // connection id -> its segments
    this.sentBytes = 0;
    this.recent = [];
    this.attempt = 0;
    this.reconnects = 0;
    this.lost = false; // the last connection ended without our asking
    this.finishing = null; // {resolve, closeSent}
    this.retryTimer = null;
    this.pumpTimer = null;
    this.tokens = 0;
    this.tokensAt = 0;
    this.lastSendAt = 0;
    this.retryAt = 0;
    this.error = null;
    this.lastErrorMessage = null;
    this.waitingTicks = 0;
    this.keepalive = setInterval(() => this.keepAlive(), KEEPALIVE_MS);
    this.onOnline = () => {
      if (this.state === "retrying") this.retryNow();
    };
    window.addEventListener("online", this.onOnline);
  }

  status(extra = {}) {
    this.onStatus({
      state: this.state,
      attempt: this.attempt,
      retryAt: this.retryAt,
      queuedSeconds: this.queuedBytes / this.bytesPerSecond,
      droppedSeconds: this.droppedBytes / this.bytesPerSecond,
      sentSeconds: this.sentBytes / this.bytesPerSecond,
      reconnects: this.reconnects,
      error: this.error,
      ...extra,
    });
  }

  /** Connect (or reconnect right away); a no-op while connected or connecting. */
  open() {
    if (["connecting", "reconnecting", "open", "finishing"].includes(this.state)) return;
    clearTimeout(this.retryTimer);
    this.error = null;
    this.attempt = 0;
    this.lost = false;
    this.connect();
  }

  url() {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(this.query())) {
      if (value !== null && value !== undefined && value !== "") params.set(key, String(value));
    }
    const qs = params.toString();
    return qs ? `${this.endpoint}?${qs}` : this.endpoint;
  }

  connect() {
    this.state = this.lost ? "reconnecting" : "connecting";
    this.connected = false;
    this.lastErrorMessage = null;
    this.recent = [];
    this.segments = [];
    this.streamBytes = 0;
    const ws = new WebSocket(this.url());
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onmessage = (event) => this.receive(ws, event);
    ws.onclose = (event) => this.closed(ws, event);
    this.status();
  }

  receive(ws, event) {
    if (ws !== this.ws || typeof event.data !== "string") return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message.type === "Connected") {
      const backlog = this.queuedBytes / this.bytesPerSecond;
      const resumedAfterLoss = this.lost;
      this.connected = true;
      this.attempt = 0; // the relay took us back: the next loss starts again from 250 ms
      this.timelines.set(message.connection_id, this.segments);
      if (this.timelines.size > TIMELINES_KEPT) this.timelines.delete(this.timelines.keys().next().value);
      if (resumedAfterLoss) this.reconnects += 1;
      this.lost = false;
      this.state = this.finishing ? "finishing" : "open";
      this.tokens = HIGH_WATER_BYTES;
      this.tokensAt = performance.now();
      this.onMessage(message);
      this.status({ reconnected: resumedAfterLoss, backlogSeconds: backlog });
      this.pump();
      return;
    }
    if (message.type === "Error") this.lastErrorMessage = message;
    this.onMessage(message);
  }

  closed(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearTimeout(this.pumpTimer);
    this.connected = false;
    this.requeueUnsent(ws);
    const errorCode = this.lastErrorMessage?.code || event.reason || null;
    if (this.finishing && (this.finishing.closeSent || event.code === 1000)) {
      // The relay flushes the open turn on CloseStream and on any disconnect: we are done.
      this.state = "closed";
      this.dropQueue();
      this.finishDone();
      this.status({ closeCode: event.code });
      return;
    }
    if (this.state === "closed") return; // close() from the page
    if (isFatal(event.code, errorCode)) {
      this.state = "failed";
      this.error = {
        closeCode: event.code,
        code: errorCode,
        description: this.lastErrorMessage?.description || "",
      };
      this.dropQueue();
      this.finishDone();
      this.status({ closeCode: event.code });
      return;
    }
    // A relay that is full or failing gets more room than one that merely dropped us.
    if (errorCode === "RATE_LIMITED" || event.code === 4029) this.attempt = Math.max(this.attempt, 4);
    else if (errorCode || event.code === 4011 || event.code === 4013) this.attempt = Math.max(this.attempt, 2);
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.lost = true;
    this.state = "retrying";
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => this.connect(), delay);
    this.status({ closeCode: event.code, closeReason: errorCode, delayMs: delay });
  }

  retryNow() {
    clearTimeout(this.retryTimer);
    this.connect();
  }

  /** Frames the browser never put on the wire go back to the front of the queue. */
  requeueUnsent(ws) {
    let unsent = ws.bufferedAmount || 0;
    const back = [];
    while (unsent > 0 && this.recent.length) {
      const frame = this.recent.pop();
      back.unshift(frame);
      unsent -= frame.pcm.byteLength;
    }
    for (const frame of back) {
      this.sentBytes -= frame.pcm.byteLength;
      this.queuedBytes += frame.pcm.byteLength;
    }
    this.queue.unshift(...back);
    this.recent = [];
  }

  /**
   * Queue one chunk of 16 kHz Int16 PCM; sent now if connected, else on reconnect.
   * @param {ArrayBuffer} pcm
   * @param {number} [capturedAt] wall-clock ms when the chunk's first sample was captured
   */
  sendAudio(pcm, capturedAt = Date.now() - (pcm.byteLength / this.bytesPerSecond) * 1000) {
    if (this.state === "failed" || this.state === "closed" || this.state === "idle") return;
    this.queue.push({ pcm, at: capturedAt });
    this.queuedBytes += pcm.byteLength;
    while (this.queuedBytes > this.maxQueueBytes && this.queue.length > 1) {
      const oldest = this.queue.shift();
      this.queuedBytes -= oldest.pcm.byteLength;
      this.droppedBytes += oldest.pcm.byteLength;
    }
    if (this.connected) this.pump();
    else if (++this.waitingTicks % 6 === 0) this.status(); // every ~0.5 s: show what waits
  }

  pump() {
    clearTimeout(this.pumpTimer);
    const ws = this.ws;
    if (!ws || !this.connected || ws.readyState !== WebSocket.OPEN) return;
    const now = performance.now();
    const rate = this.bytesPerSecond * CATCH_UP_SPEED;
    this.tokens = Math.min(HIGH_WATER_BYTES, this.tokens + ((now - this.tokensAt) * rate) / 1000);
    this.tokensAt = now;
    while (this.queue.length && this.tokens >= this.queue[0].pcm.byteLength && ws.bufferedAmount < HIGH_WATER_BYTES) {
      const frame = this.queue.shift();
      const size = frame.pcm.byteLength;
      this.queuedBytes -= size;
      this.tokens -= size;
      ws.send(frame.pcm);
      this.note(frame);
      this.sentBytes += size;
      this.lastSendAt = now;
      this.recent.push(frame);
      if (this.recent.length > RECENT_FRAMES) this.recent.shift();
    }
    if (this.queue.length) {
      this.pumpTimer = setTimeout(() => this.pump(), 20);
    } else if (this.finishing && !this.finishing.closeSent) {
      ws.send(JSON.stringify({ type: "CloseStream" }));
      this.finishing.closeSent = true;
      // Never leave the page stuck in "finishing" if the relay does not answer.
      this.finishing.timer = setTimeout(() => ws.close(1000), FINISH_TIMEOUT_MS);
    }
  }

  /** Remember where in this stream the frame sits, as a segment of contiguous capture. */
  note(frame) {
    const last = this.segments[this.segments.length - 1];
    const offsetMs = (this.streamBytes / this.bytesPerSecond) * 1000;
    if (!last || Math.abs(last.at + (offsetMs - last.offsetMs) - frame.at) > 40) {
      this.segments.push({ offsetMs, at: frame.at });
    }
    this.streamBytes += frame.pcm.byteLength;
  }

  /**
   * When the audio at `seconds` into connection `connectionId`'s stream was captured (ms), if
   * it was this page's; so turns spoken while offline still show when they were spoken.
   */
  captureTime(connectionId, seconds) {
    const segments = this.timelines.get(connectionId);
    if (!segments || !segments.length || !Number.isFinite(seconds)) return null;
    const ms = seconds * 1000;
    let found = segments[0];
    for (const segment of segments) {
      if (segment.offsetMs > ms) break;
      found = segment;
    }
    return found.at + (ms - found.offsetMs);
  }

  keepAlive() {
    const ws = this.ws;
    if (!ws || !this.connected || ws.bufferedAmount) return;
    if (performance.now() - this.lastSendAt < KEEPALIVE_MS) return;
    ws.send(JSON.stringify({ type: "KeepAlive" }));
    this.lastSendAt = performance.now();
  }

  /**
   * Deliberate stop: send what is queued, then CloseStream; resolves once the relay has
   * flushed the open turn and closed (or at once when there is no connection to finish).
   */
  finish() {
    if (this.finishing) return this.finishing.promise;
    if (!["connecting", "reconnecting", "open", "retrying"].includes(this.state)) return Promise.resolve();
    let resolve;
    const promise = new Promise((r) => (resolve = r));
    this.finishing = { promise, resolve, closeSent: false };
    if (this.state === "open") this.state = "finishing";
    this.status();
    this.pump();
    return promise;
  }

  finishDone() {
    if (!this.finishing) return;
    const { resolve, timer } = this.finishing;
    clearTimeout(timer);
    this.finishing = null;
    resolve();
  }

  dropQueue() {
    this.queue = [];
    this.queuedBytes = 0;
  }

  /** Leave without ceremony (page unload); the relay still keeps the open turn. */
  close() {
    clearTimeout(this.retryTimer);
    clearTimeout(this.pumpTimer);
    clearInterval(this.keepalive);
    window.removeEventListener("online", this.onOnline);
    this.state = "closed";
    if (this.ws) this.ws.close(1000);
  }
}
