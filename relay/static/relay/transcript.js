// The transcript of one session as this page knows it: finished turns and open (interim) turns,
// keyed by the session-wide turn_index so a turn seen twice (live and again in a replay after a
// reconnect) is shown once. No DOM and no sockets here.

/**
 * @typedef {object} Turn
 * @property {number} index       session-wide turn_index
 * @property {string} speaker     connection id that produced it
 * @property {string} transcript
 * @property {Array<object>} words
 * @property {number} duration    seconds of audio in the turn
 * @property {number|null} startedAt  wall-clock ms when the turn began, when known
 * @property {boolean} final
 * @property {boolean} replayed   came from history, not live
 * @property {string|null} trigger
 */

export class Transcript {
  /**
   * @param {object} [options]
   * @param {() => number} [options.now] clock (ms), replaceable in tests
   * @param {Map<number, number>} [options.times] known start times by turn index (from storage)
   */
  constructor({ now = () => Date.now(), times = new Map() } = {}) {
    this.now = now;
    this.times = times;
    /** @type {Map<number, Turn>} */
    this.finals = new Map();
    /** @type {Map<number, Turn>} */
    this.interims = new Map();
  }

  /**
   * Apply one TurnInfo message.
   * @param {object} message
   * @param {{startedAt?: number|null}} [hint] the start time when the caller knows it exactly
   *   (the page's own audio: it knows when it captured it)
   * @returns {{kind: "final"|"interim"|"duplicate"|"ignored", turn?: Turn}}
   */
  apply(message, { startedAt: known = null } = {}) {
    const index = message.turn_index;
    if (!Number.isInteger(index)) return { kind: "ignored" };
    if (this.finals.has(index)) return { kind: "duplicate", turn: this.finals.get(index) };
    const final = message.event === "EndOfTurn";
    const duration = Math.max(0, Number(message.audio_window_end || 0) - Number(message.audio_window_start || 0));
    const previous = this.interims.get(index);
    let startedAt = known ?? (previous ? previous.startedAt : this.times.get(index) ?? null);
    if (startedAt == null && message.created_at) {
      const created = Date.parse(message.created_at);
      if (!Number.isNaN(created)) startedAt = created - duration * 1000;
    }
    if (startedAt == null && !message.replayed) startedAt = this.now() - duration * 1000;
    if (startedAt != null) this.times.set(index, startedAt);
    /** @type {Turn} */
    const turn = {
      index,
      speaker: message.speaker || "",
      transcript: String(message.transcript || "").trim(),
      words: Array.isArray(message.words) ? message.words : [],
      duration,
      startedAt,
      final,
      replayed: Boolean(message.replayed),
      trigger: message.trigger || null,
      languages: Array.isArray(message.languages) ? message.languages : [],
    };
    if (final) {
      this.interims.delete(index);
      this.finals.set(index, turn);
      return { kind: "final", turn };
    }
    this.interims.set(index, turn);
    return { kind: "interim", turn };
  }

  /**
   * The `since=` to reconnect with: the last finished index, but never past an open turn, so a
   * turn that finishes while this page is away is replayed even if a later one finished first.
   * null when nothing is known (replay everything).
   */
  since() {
    let since = -1;
    for (const index of this.finals.keys()) if (index > since) since = index;
    for (const index of this.interims.keys()) if (index - 1 < since) since = index - 1;
    return since >= 0 ? since : null;
  }

  /** Forget open turns of these speakers (they left; their turns come back final or not at all). */
  dropInterims(predicate) {
    const dropped = [];
    for (const [index, turn] of this.interims) {
      if (predicate(turn)) {
        this.interims.delete(index);
        dropped.push(turn);
      }
    }
    return dropped;
  }

  /** Finished turns with words, in turn order. */
  finishedTurns() {
    return [...this.finals.values()].filter((t) => t.transcript).sort((a, b) => a.index - b.index);
  }
}

/** Friendly names for connection ids: "You" for this browser's own connections, else the name the
 * relay gave the speaker (an account's display name, "Guest 2"), else "Speaker N". */
export class Speakers {
  constructor(ownIds = []) {
    this.own = new Set(ownIds);
    this.others = new Map();
    this.names = new Map();
  }

  setName(id, name) {
    if (id && name) this.names.set(id, name);
  }

  addOwn(id) {
    this.own.add(id);
  }

  isOwn(id) {
    return this.own.has(id);
  }

  label(id) {
    if (!id) return "Speaker";
    if (this.own.has(id)) return "You";
    if (this.names.has(id)) return this.names.get(id);
    if (!this.others.has(id)) this.others.set(id, this.others.size + 2);
    return `Speaker ${this.others.get(id)}`;
  }

  /** A stable colour slot (0-5) per speaker label. */
  tone(id) {
    if (this.own.has(id)) return 0;
    if (!this.others.has(id)) this.others.set(id, this.others.size + 2);
    return ((this.others.get(id) || 1) - 1) % 5 + 1;
  }
}

/** A small per-session store in localStorage; silently does nothing where storage is blocked. */
export class SessionStore {
  constructor(sessionId, storage = globalThis.localStorage) {
    this.prefix = `relay:${sessionId}:`;
    this.storage = storage;
  }

  read(key, fallback) {
    try {
      const raw = this.storage.getItem(this.prefix + key);
      return raw == null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  }

  write(key, value) {
    try {
      this.storage.setItem(this.prefix + key, JSON.stringify(value));
    } catch {
      // Private mode or quota: the page works without it, only times and "You" are forgotten.
    }
  }

  loadTimes() {
    const raw = this.read("times", {});
    return new Map(Object.entries(raw).map(([k, v]) => [Number(k), Number(v)]));
  }

  saveTimes(times, limit = 2000) {
    const entries = [...times.entries()].sort((a, b) => a[0] - b[0]).slice(-limit);
    this.write("times", Object.fromEntries(entries.map(([k, v]) => [k, Math.round(v)])));
  }
}

/** An unguessable session id (128 random bits, base32), as the share link is the capability. */
export function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  const alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  let bits = 0;
  let value = 0;
  let out = "";
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}
