// One relay session over a WebSocket that survives disconnects, and its relay process dying.
//
// Every chunk of audio stays in a ledger (AudioLedger) until the relay has said it is done with
// it: first in a queue while it waits to be sent, then, once sent, until an EndOfTurn of this
// page's own connection covers it (`audio_window_end` is in seconds of that connection's
// stream, so it maps to a byte offset). Both together are bounded (30 s by default, oldest
// first).
//
// After an unexpected close the page reconnects (exponential backoff with jitter) with
// `session=` and `since=` (never past a turn the old connection could still finish), waits for
// the relay's History message (the replay is complete), and decides what the old connection's
// unacknowledged audio needs:
// - the relay process lived: it finished the open turn itself (EndOfTurn, trigger
//   `end_of_stream`, speaker = the old connection id), replayed or live; the audio it covers is
//   dropped and only what the relay never took (in flight when the socket died) is sent again;
// - the process died (kill -9, crash): nothing finishes that turn, so all of it is sent again,
//   at up to 4x real time, before the live audio.
// A crashed process and one still flushing look the same from here, so unless the relay already
// showed that the old connection is gone (its end_of_stream turn, its Presence leave, a clean
// close code, or no other live connection in the session) the page gives the old process
// RESUME_GRACE_MS after the drop to finish the turn before it re-sends.

export const BACKOFF_BASE_MS = 250;
export const BACKOFF_MAX_MS = 5000;
/** How long after a drop an old connection may still deliver its end_of_stream turn: the relay's
 * RELAY_FLUSH_TIMEOUT_SECONDS (8 s) and a margin. */
export const RESUME_GRACE_MS = 10000;

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
/** Errors that clear on a new stream (the relay drops the backlog with the old one; after
 * FLUSH_INCOMPLETE the page re-sends the audio no EndOfTurn covered, then CloseStream again). */
const RETRYABLE_ERRORS = new Set(["BACKLOG_EXCEEDED", "INTERNAL_SERVER_ERROR", "ENGINE_ERROR", "FLUSH_INCOMPLETE", "CAPACITY", "SESSION_FULL", "ENGINE_UNAVAILABLE", "RATE_LIMITED", "SERVER_RESTARTING", "STORAGE_UNAVAILABLE"]);
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

/**
 * A close the relay made on purpose (1000 after CloseStream, a 4xxx error): it finished and
 * stored the open turn before closing, so nothing more will come from that connection. 1006 (no
 * close frame: a dropped network, a dead process) says nothing.
 */
export function closedByRelay(closeCode) {
  return closeCode === 1000 || (closeCode >= 4000 && closeCode <= 4999);
}

/**
 * The page's audio until the relay is done with it.
 *
 * `queue`: chunks not sent yet, `{pcm, at}` (`at`: capture time, ms). `unacked`: chunks sent
 * on connection `conn`, `{pcm, at, start}` (`start`: byte offset in that connection's stream),
 * kept until an EndOfTurn of `conn` covers them. Unacked chunks are older than queued ones;
 * together they never exceed `maxBytes` (the oldest goes first).
 */
export class AudioLedger {
  constructor({ bytesPerSecond = 32000, maxBytes = 30 * 32000 } = {}) {
    this.bytesPerSecond = bytesPerSecond;
    this.maxBytes = maxBytes;
    this.queue = [];
    this.unacked = [];
    this.conn = null;
    this.queuedBytes = 0;
    this.unackedBytes = 0;
    this.droppedBytes = 0; // never sent: the bound pushed them out while waiting
    this.trimmedBytes = 0; // sent, not yet covered, pushed out by the bound
    this.ackedBytes = 0; // sent and covered by an EndOfTurn
  }

  /** A captured chunk to send. */
  push(pcm, at) {
    this.queue.push({ pcm, at });
    this.queuedBytes += pcm.byteLength;
    this.bound();
  }

  bound() {
    while (this.queuedBytes + this.unackedBytes > this.maxBytes && this.queue.length + this.unacked.length > 1) {
      if (this.unacked.length) {
        const oldest = this.unacked.shift();
        this.unackedBytes -= oldest.pcm.byteLength;
        this.trimmedBytes += oldest.pcm.byteLength;
      } else {
        const oldest = this.queue.shift();
        this.queuedBytes -= oldest.pcm.byteLength;
        this.droppedBytes += oldest.pcm.byteLength;
      }
    }
  }

  /** The next chunk to send, or undefined. */
  peek() {
    return this.queue[0];
  }

  /** The head of the queue went out on connection `conn` at stream byte offset `start`. */
  sent(conn, start) {
    const frame = this.queue.shift();
    this.queuedBytes -= frame.pcm.byteLength;
    if (this.conn !== conn) {
      // Only after requeue() emptied `unacked`: a ledger follows one stream at a time.
      if (this.unacked.length) throw new Error(`unacknowledged audio of ${this.conn} while sending on ${conn}`);
      this.conn = conn;
    }
    this.unacked.push({ pcm: frame.pcm, at: frame.at, start });
    this.unackedBytes += frame.pcm.byteLength;
    return frame;
  }

  /**
   * An EndOfTurn of connection `conn` ending at `seconds` of its stream: the audio before it is
   * done with. Returns the bytes dropped.
   */
  ack(conn, seconds) {
    if (conn !== this.conn || !Number.isFinite(seconds)) return 0;
    const end = Math.round(seconds * this.bytesPerSecond) & ~1;
    let dropped = 0;
    while (this.unacked.length) {
      const frame = this.unacked[0];
      const size = frame.pcm.byteLength;
      if (frame.start + size <= end) {
        this.unacked.shift();
        dropped += size;
      } else {
        const cut = end - frame.start;
        if (cut > 0) {
          // Half covered: keep the rest, with its own offset and capture time.
          this.unacked[0] = {
            pcm: frame.pcm.slice(cut),
            at: frame.at + (cut / this.bytesPerSecond) * 1000,
            start: end,
          };
          dropped += cut;
        }
        break;
      }
    }
    this.unackedBytes -= dropped;
    this.ackedBytes += dropped;
    return dropped;
  }

  /** Put the unacknowledged audio back at the front of the queue, to send on a new stream. */
  requeue() {
    const back = this.unacked.map(({ pcm, at }) => ({ pcm, at }));
    const bytes = this.unackedBytes;
    this.queue.unshift(...back);
    this.queuedBytes += bytes;
    this.unacked = [];
    this.unackedBytes = 0;
    this.conn = null;
    return bytes;
  }

  clear() {
    this.queue = [];
    this.unacked = [];
    this.queuedBytes = 0;
    this.unackedBytes = 0;
    this.conn = null;
  }
}

const HIGH_WATER_BYTES = 64 * 1024; // what may sit in the browser's socket buffer at once
const CATCH_UP_SPEED = 4; // backlog goes out at up to 4x real time, so the engine keeps up
const KEEPALIVE_MS = 8000;
const FINISH_TIMEOUT_MS = 15000; // the relay flushes within RELAY_FLUSH_TIMEOUT_SECONDS (8 s)
const TIMELINES_KEPT = 50;
const IDS_KEPT = 200;

function remember(set, value) {
  set.add(value);
  if (set.size > IDS_KEPT) set.delete(set.values().next().value);
}

export class RelayConnection {
  /**
   * @param {object} options
   * @param {string} options.endpoint ws(s)://host/v2/listen
   * @param {() => Record<string, string|number|null>} options.query parameters for each connect
   * @param {(message: object) => void} options.onMessage every relay message, parsed
   * @param {(status: object) => void} options.onStatus state changes
   * @param {number} [options.bytesPerSecond] 32000 for 16 kHz Int16
   * @param {number} [options.bufferSeconds] audio kept, unsent and unacknowledged together
   * @param {number} [options.resumeGraceMs] how long an old connection may still finish its turn
   * @param {(url: string) => WebSocket} [options.socket] opens a WebSocket (tests pass a fake)
   */
  constructor({
    endpoint,
    query,
    onMessage,
    onStatus,
    bytesPerSecond = 32000,
    bufferSeconds = 30,
    resumeGraceMs = RESUME_GRACE_MS,
    socket = (url) => new WebSocket(url),
  }) {
    this.endpoint = endpoint;
    this.query = query;
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.bytesPerSecond = bytesPerSecond;
    this.resumeGraceMs = resumeGraceMs;
    this.openSocket = socket;
    this.ledger = new AudioLedger({ bytesPerSecond, maxBytes: bufferSeconds * bytesPerSecond });
    this.state = "idle";
    this.ws = null;
    this.connectionId = null; // of this.ws, once Connected
    this.connected = false; // Connected received on this.ws
    this.ready = false; // audio may flow on this.ws (the old stream's audio is sorted out)
    this.replayDone = false; // History received (or none coming: a new session)
    this.joinCount = null; // live connections of the session when this.ws joined
    this.resume = null; // {conn, lostAt, ackedAtLoss, finished, left, why}: the old stream to sort out
    this.lastResume = null; // how the last one was sorted out
    this.resentBytes = 0;
    this.coveredBytes = 0; // unacknowledged at a loss, then covered by the relay's own flush
    this.lateFinishes = 0; // an old connection's end_of_stream turn after its audio was re-sent
    this.ended = new Set(); // connection ids whose stream ended (end_of_stream seen)
    this.left = new Set(); // connection ids that left (Presence leave)
    this.floors = new Map(); // connection id -> a turn index below any turn it can still finish
    this.maxIndexSeen = -1;
    this.connectSince = -1;
    this.segments = []; // this socket's stream offsets -> capture times
    this.streamBytes = 0;
    this.timelines = new Map(); // connection id -> its segments
    this.sentBytes = 0;
    this.attempt = 0;
    this.reconnects = 0;
    this.lost = false; // the last connection ended without our asking
    this.finishing = null; // {resolve, closeSent, timedOut}
    this.retryTimer = null;
    this.pumpTimer = null;
    this.graceTimer = null;
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

  /** Audio waiting to be sent (bytes); what the status shows as "waiting". */
  get queuedBytes() {
    return this.ledger.queuedBytes;
  }

  get droppedBytes() {
    return this.ledger.droppedBytes;
  }

  status(extra = {}) {
    const bps = this.bytesPerSecond;
    this.onStatus({
      state: this.state,
      attempt: this.attempt,
      retryAt: this.retryAt,
      queuedSeconds: this.ledger.queuedBytes / bps,
      unackedSeconds: this.ledger.unackedBytes / bps,
      droppedSeconds: this.ledger.droppedBytes / bps,
      trimmedSeconds: this.ledger.trimmedBytes / bps,
      sentSeconds: this.sentBytes / bps,
      resentSeconds: this.resentBytes / bps,
      coveredSeconds: this.coveredBytes / bps,
      lastResume: this.lastResume,
      lateFinishes: this.lateFinishes,
      reconnects: this.reconnects,
      error: this.error,
      ...extra,
    });
  }

  /** Connect (or reconnect right away); a no-op while connected or connecting. */
  open() {
    if (["connecting", "reconnecting", "resuming", "open", "finishing"].includes(this.state)) return;
    clearTimeout(this.retryTimer);
    this.error = null;
    this.attempt = 0;
    this.lost = false;
    this.connect();
  }

  /**
   * The query of the next connection. `since` never passes a turn the stream being resumed may
   * still have open: the relay replays that turn if it was finished, even when this page never
   * heard of it (its StartOfTurn lost with the socket) and a later turn of another speaker did.
   */
  params() {
    const query = { ...this.query() };
    // The relay pairs this connection with the one it resumes, for its reconnection-time metric.
    if (this.ledger.conn !== null) query.previous_connection = this.ledger.conn;
    const floor = this.ledger.conn !== null ? this.floors.get(this.ledger.conn) : undefined;
    if (floor !== undefined && "since" in query) {
      const since = query.since;
      query.since = floor < 0 || since === null || since === undefined || since === "" ? null : Math.min(Number(since), floor);
    }
    return query;
  }

  url() {
    const params = new URLSearchParams();
    const query = this.params();
    this.connectSince = Number.isInteger(Number(query.since)) && query.since !== null && query.since !== "" ? Number(query.since) : -1;
    for (const [key, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") params.set(key, String(value));
    }
    const qs = params.toString();
    return qs ? `${this.endpoint}?${qs}` : this.endpoint;
  }

  connect() {
    this.state = this.lost ? "reconnecting" : "connecting";
    this.connected = false;
    this.ready = false;
    this.replayDone = false;
    this.joinCount = null;
    this.connectionId = null;
    this.lastErrorMessage = null;
    this.segments = [];
    this.streamBytes = 0;
    const ws = this.openSocket(this.url());
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
    switch (message.type) {
      case "Connected":
        this.onConnected(message);
        return;
      case "Error":
        this.lastErrorMessage = message;
        break;
      case "Presence":
        if (message.event === "join" && message.connection_id === this.connectionId && this.joinCount === null) {
          this.joinCount = Number(message.connections);
        } else if (message.event === "leave") {
          remember(this.left, message.connection_id);
        }
        break;
      case "TurnInfo":
        this.onTurnInfo(message);
        break;
      case "History":
        this.replayDone = true;
        break;
      default:
    }
    this.onMessage(message);
    if (message.type === "History" || message.type === "Presence" || message.type === "TurnInfo") this.maybeResume();
  }

  onConnected(message) {
    const resumedAfterLoss = this.lost;
    const id = message.connection_id;
    this.connected = true;
    this.connectionId = id;
    this.attempt = 0; // the relay took us back: the next loss starts again from 250 ms
    this.timelines.set(id, this.segments);
    if (this.timelines.size > TIMELINES_KEPT) this.timelines.delete(this.timelines.keys().next().value);
    // Any turn this connection starts gets an index above every index known now, and above
    // the since= it asked with (every turn up to that one was finished before it connected).
    this.floors.set(id, Math.max(this.maxIndexSeen, this.connectSince ?? -1));
    if (this.floors.size > IDS_KEPT) this.floors.delete(this.floors.keys().next().value);
    if (!message.resumed) this.replayDone = true; // a new session: no History comes
    if (resumedAfterLoss) this.reconnects += 1;
    this.lost = false;
    this.tokens = HIGH_WATER_BYTES;
    this.tokensAt = performance.now();
    if (this.resume) {
      this.state = "resuming";
    } else {
      this.ready = true;
      this.state = this.finishing ? "finishing" : "open";
    }
    this.onMessage(message);
    this.status({ reconnected: resumedAfterLoss, backlogSeconds: this.ledger.queuedBytes / this.bytesPerSecond });
    if (this.ready) this.pump();
    else this.maybeResume();
  }

  onTurnInfo(message) {
    const index = message.turn_index;
    if (Number.isInteger(index) && index > this.maxIndexSeen) this.maxIndexSeen = index;
    if (message.event !== "EndOfTurn") return;
    const speaker = message.speaker;
    const end = Number(message.audio_window_end);
    if (speaker && speaker === this.ledger.conn) {
      this.ledger.ack(speaker, end);
      if (Number.isInteger(index)) this.floors.set(speaker, Math.max(this.floors.get(speaker) ?? -1, index));
    }
    if (message.trigger === "end_of_stream" && speaker) {
      remember(this.ended, speaker);
      if (this.resume && this.resume.conn === speaker) this.resume.finished = true;
      else if (this.lastResume && this.lastResume.conn === speaker && this.lastResume.why === "grace" && !this.lastResume.late) {
        // The old process was alive after all and finished the turn after the grace: the words
        // it covered were also re-sent, so they show twice. Said, not hidden (both are stored).
        this.lastResume.late = true;
        this.lateFinishes += 1;
      }
    }
  }

  closed(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearTimeout(this.pumpTimer);
    clearTimeout(this.graceTimer);
    const wasConnected = this.connected;
    this.connected = false;
    this.ready = false;
    const errorCode = this.lastErrorMessage?.code || event.reason || null;
    if (this.finishing && (event.code === 1000 || this.finishing.timedOut || (this.finishing.closeSent && !this.ledger.unackedBytes))) {
      // The relay flushed the open turn on CloseStream and closed: we are done.
      this.state = "closed";
      this.ledger.clear();
      this.resume = null;
      this.finishDone();
      this.status({ closeCode: event.code });
      return;
    }
    if (this.finishing) this.finishing.closeSent = false; // send what is left again, then close
    if (this.state === "closed") return; // close() from the page
    this.noteLoss(wasConnected, event.code);
    if (isFatal(event.code, errorCode)) {
      this.state = "failed";
      this.error = {
        closeCode: event.code,
        code: errorCode,
        description: this.lastErrorMessage?.description || "",
      };
      this.ledger.clear();
      this.resume = null;
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

  /** The socket carrying unacknowledged audio died: remember what is known about its end. */
  noteLoss(wasConnected, closeCode) {
    const conn = this.ledger.conn;
    if (conn === null || this.resume) return; // nothing in flight, or already sorting out an older loss
    if (!this.ledger.unackedBytes) {
      this.ledger.requeue(); // everything it was sent is covered: nothing to sort out
      return;
    }
    this.resume = {
      conn,
      lostAt: performance.now(),
      ackedAtLoss: this.ledger.ackedBytes,
      finished: this.ended.has(conn) || (wasConnected && conn === this.connectionId && closedByRelay(closeCode)),
      why: null,
    };
  }

  /**
   * The new connection has the replay: decide about the old stream's audio if the relay has
   * shown enough, else wait (the grace timer decides at the latest).
   */
  maybeResume() {
    const resume = this.resume;
    if (!resume || !this.connected || !this.replayDone || this.ready) return;
    let why = null;
    if (resume.finished || this.ended.has(resume.conn)) why = "finished"; // its end_of_stream turn is here
    else if (this.left.has(resume.conn)) why = "left"; // it left: whatever it stored was sent first
    else if (this.joinCount === 1) why = "alone"; // not live any more: what it stored was replayed
    else if (performance.now() - resume.lostAt >= this.resumeGraceMs) why = "grace";
    if (why) {
      this.resumeNow(why);
      return;
    }
    clearTimeout(this.graceTimer);
    const left = Math.max(0, this.resumeGraceMs - (performance.now() - resume.lostAt));
    this.graceTimer = setTimeout(() => this.maybeResume(), left + 1);
    this.status({ resumeWaitMs: left });
  }

  /** Sorted out: what the relay did not cover goes out first, then live audio. */
  resumeNow(why) {
    const resume = this.resume;
    clearTimeout(this.graceTimer);
    const covered = this.ledger.ackedBytes - resume.ackedAtLoss;
    const resent = this.ledger.requeue();
    this.resentBytes += resent;
    this.coveredBytes += covered;
    this.lastResume = { conn: resume.conn, why, resentBytes: resent, coveredBytes: covered, waitedMs: Math.round(performance.now() - resume.lostAt) };
    this.resume = null;
    this.ready = true;
    this.state = this.finishing ? "finishing" : "open";
    this.tokens = HIGH_WATER_BYTES;
    this.tokensAt = performance.now();
    this.status({ resumed: this.lastResume, backlogSeconds: this.ledger.queuedBytes / this.bytesPerSecond });
    this.pump();
  }

  retryNow() {
    clearTimeout(this.retryTimer);
    this.connect();
  }

  /**
   * Queue one chunk of 16 kHz Int16 PCM; sent now if connected, else on reconnect.
   * @param {ArrayBuffer} pcm
   * @param {number} [capturedAt] wall-clock ms when the chunk's first sample was captured
   */
  sendAudio(pcm, capturedAt = Date.now() - (pcm.byteLength / this.bytesPerSecond) * 1000) {
    if (this.state === "failed" || this.state === "closed" || this.state === "idle") return;
    this.ledger.push(pcm, capturedAt);
    if (this.ready) this.pump();
    else if (++this.waitingTicks % 6 === 0) this.status(); // every ~0.5 s: show what waits
  }

  pump() {
    clearTimeout(this.pumpTimer);
    const ws = this.ws;
    if (!ws || !this.ready || ws.readyState !== WebSocket.OPEN) return;
    const now = performance.now();
    const rate = this.bytesPerSecond * CATCH_UP_SPEED;
    this.tokens = Math.min(HIGH_WATER_BYTES, this.tokens + ((now - this.tokensAt) * rate) / 1000);
    this.tokensAt = now;
    let next;
    while ((next = this.ledger.peek()) && this.tokens >= next.pcm.byteLength && ws.bufferedAmount < HIGH_WATER_BYTES) {
      const size = next.pcm.byteLength;
      this.tokens -= size;
      ws.send(next.pcm);
      const frame = this.ledger.sent(this.connectionId, this.streamBytes);
      this.note(frame);
      this.sentBytes += size;
      this.lastSendAt = now;
    }
    if (this.ledger.queue.length) {
      this.pumpTimer = setTimeout(() => this.pump(), 20);
    } else if (this.finishing && !this.finishing.closeSent) {
      ws.send(JSON.stringify({ type: "CloseStream" }));
      this.finishing.closeSent = true;
      // Never leave the page stuck in "finishing" if the relay does not answer.
      clearTimeout(this.finishing.timer);
      this.finishing.timer = setTimeout(() => {
        if (this.finishing) this.finishing.timedOut = true;
        ws.close(1000);
      }, FINISH_TIMEOUT_MS);
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
    if (!["connecting", "reconnecting", "resuming", "open", "retrying"].includes(this.state)) return Promise.resolve();
    let resolve;
    const promise = new Promise((r) => (resolve = r));
    this.finishing = { promise, resolve, closeSent: false, timedOut: false };
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

  /** Leave without ceremony (page unload); the relay still keeps the open turn. */
  close() {
    clearTimeout(this.retryTimer);
    clearTimeout(this.pumpTimer);
    clearTimeout(this.graceTimer);
    clearInterval(this.keepalive);
    window.removeEventListener("online", this.onOnline);
    this.state = "closed";
    if (this.ws) this.ws.close(1000);
  }
}
