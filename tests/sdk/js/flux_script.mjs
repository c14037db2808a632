#!/usr/bin/env node
// Deepgram's own JavaScript SDK (@deepgram/sdk, client.listen.v2 = Flux) against a base URL.
//
// The only thing that differs from a program written for Deepgram is the client's `baseUrl`; the key
// is whatever the caller passes (a made-up `dg-...` key in the tests).
//
//   node flux_script.mjs BASE_URL KEY [--audio A.wav B.wav | --tones] [--resume] [--expect-refusal] [--speed 2]
//
// Same scenario as tests/sdk/flux_script.py: clip A then its EndOfTurn, Configure -> answer,
// KeepAlive, clip B with ForceEndTurn once a turn is open (the `manual` EndOfTurn), CloseStream and
// read until the server closes; with --resume a second connection passes `session=<id>` through the
// SDK's `queryParams` connect option and collects the replay. Messages are consumed with
// `for await (const message of socket)`; `socket.on("close"/"error"/"open")` record the rest.
// Prints one JSON summary on stdout (tests/live/test_sdk_compat.py asserts on it).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { DeepgramClient } from "@deepgram/sdk";

const FLUX_TYPES = new Set(["Connected", "TurnInfo", "ConfigureSuccess", "ConfigureFailure", "Warning", "Error"]);
const RATE = 16000;
const CHUNK = 2560; // 80 ms of 16 kHz linear16

// -- arguments -------------------------------------------------------------------------------------
const argv = process.argv.slice(2);
const args = { audio: null, tones: false, resume: false, refusal: false, speed: 2.0 };
const positional = [];
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === "--audio") args.audio = [argv[++i], argv[++i]];
  else if (a === "--tones") args.tones = true;
  else if (a === "--resume") args.resume = true;
  else if (a === "--expect-refusal") args.refusal = true;
  else if (a === "--speed") args.speed = Number(argv[++i]);
  else positional.push(a);
}
const [baseUrl, key] = positional;
if (!baseUrl || !key) {
  console.error("usage: node flux_script.mjs BASE_URL KEY [--audio A.wav B.wav | --tones] [--resume] [--expect-refusal] [--speed N]");
  process.exit(2);
}
const pace = CHUNK / 2 / RATE / args.speed;

// -- audio -----------------------------------------------------------------------------------------
function readWav(path) {
  const buf = readFileSync(path);
  let off = 12;
  let fmt = null;
  while (off + 8 <= buf.length) {
    const id = buf.toString("ascii", off, off + 4);
    const size = buf.readUInt32LE(off + 4);
    if (id === "fmt ") fmt = { channels: buf.readUInt16LE(off + 10), rate: buf.readUInt32LE(off + 12), bits: buf.readUInt16LE(off + 22) };
    if (id === "data") {
      if (!fmt || fmt.channels !== 1 || fmt.rate !== RATE || fmt.bits !== 16) throw new Error(`${path}: not 16 kHz mono 16-bit`);
      return buf.subarray(off + 8, off + 8 + size);
    }
    off += 8 + size + (size % 2);
  }
  throw new Error(`${path}: no data chunk`);
}
function tone(seconds, freq = 440, amplitude = 8000) {
  const n = Math.floor(seconds * RATE);
  const out = Buffer.alloc(2 * n);
  for (let i = 0; i < n; i++) out.writeInt16LE(Math.trunc(Math.sin((2 * Math.PI * freq * i) / RATE) * amplitude), 2 * i);
  return out;
}
const silence = (seconds) => Buffer.alloc(2 * Math.floor(seconds * RATE));
const sleep = (s) => new Promise((r) => setTimeout(r, s * 1000));

// -- one connection --------------------------------------------------------------------------------
class Record {
  constructor(phase) {
    this.phase = phase;
    this.messages = [];
    this.nonObjects = []; // anything the SDK handed over that is not a parsed JSON object
    this.errors = [];
    this.closes = [];
    this.opens = 0;
    this.ended = false; // the async iterator finished
    this.openTurn = null;
    this.url = null;
  }
  add(message) {
    if (message === null || message === undefined || typeof message !== "object" || message instanceof Blob) {
      this.nonObjects.push(message instanceof Blob ? `Blob(${message.size})` : String(message));
      return;
    }
    this.messages.push(message);
    if (message.type === "TurnInfo") {
      if (message.event === "StartOfTurn") this.openTurn = message.turn_index;
      else if (message.event === "EndOfTurn") this.openTurn = null;
    }
  }
  of(kind) {
    return this.messages.filter((m) => m.type === kind);
  }
  ends() {
    return this.of("TurnInfo").filter((m) => m.event === "EndOfTurn");
  }
  summary() {
    const connected = this.of("Connected")[0];
    return {
      phase: this.phase,
      url: this.url,
      types: this.messages.map((m) => m.type),
      events: this.of("TurnInfo").map((m) => m.event),
      none: this.nonObjects.length,
      non_objects: this.nonObjects,
      non_flux: this.messages.filter((m) => !FLUX_TYPES.has(m.type)),
      session_id: connected?.session_id ?? null,
      request_id: connected?.request_id ?? null,
      sequence_ids: this.messages.map((m) => m.sequence_id),
      warnings: this.of("Warning").map((m) => m.code),
      error_messages: this.of("Error").map((m) => ({ code: m.code, description: m.description })),
      configure: this.messages.filter((m) => m.type === "ConfigureSuccess" || m.type === "ConfigureFailure"),
      ends: this.ends().map((m) => ({ turn_index: m.turn_index, transcript: m.transcript, trigger: m.trigger, replayed: m.replayed, words: m.words })),
      exceptions: this.errors,
      closes: this.closes,
      close_code: this.closes.length ? this.closes[0].code : null,
      close_reason: this.closes.length ? this.closes[0].reason : null,
      opens: this.opens,
    };
  }
}

async function waitFor(predicate, timeout, what) {
  const deadline = Date.now() + timeout * 1000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout}s waiting for ${what}`);
    await sleep(0.01);
  }
}

async function open(rec, extraQuery) {
  // The one change from a Deepgram program: baseUrl.
  const client = new DeepgramClient({ apiKey: key, baseUrl });
  const socket = await client.listen.v2.connect({
    model: "flux-general-en",
    encoding: "linear16",
    sample_rate: 16000,
    ...(extraQuery ? { queryParams: extraQuery } : {}),
  });
  socket.on("open", () => {
    rec.opens += 1;
    rec.url = socket.socket?._ws?.url ?? null; // observation only
  });
  socket.on("close", (event) => rec.closes.push({ code: event?.code ?? null, reason: event?.reason ?? null, at: Date.now() }));
  socket.on("error", (error) => rec.errors.push(String(error?.message ?? error)));
  socket.connect();
  const reader = (async () => {
    try {
      for await (const message of socket) rec.add(message);
    } catch (error) {
      rec.errors.push(`iterator: ${String(error?.message ?? error)}`);
    } finally {
      rec.ended = true;
    }
  })();
  await socket.waitForOpen();
  return { socket, reader };
}

const keepAlive = (socket) => socket.socket.send(JSON.stringify({ type: "KeepAlive" })); // listen.v2 has no KeepAlive method

async function streamPhase(rec, a, b) {
  const { socket, reader } = await open(rec, null);
  await waitFor(() => rec.of("Connected").length, 15, "Connected");
  for (let i = 0; i < a.length; i += CHUNK) {
    socket.sendMedia(a.subarray(i, i + CHUNK));
    await sleep(pace);
  }
  await waitFor(() => rec.ends().length, 90, "the first EndOfTurn");
  socket.sendConfigure({ type: "Configure", thresholds: { eot_threshold: 0.8 }, keyterms: ["relay"] });
  await waitFor(() => rec.of("ConfigureSuccess").length || rec.of("ConfigureFailure").length, 15, "the Configure answer");
  keepAlive(socket);
  const before = rec.ends().length;
  let forced = false;
  for (let i = 0; i < b.length; i += CHUNK) {
    socket.sendMedia(b.subarray(i, i + CHUNK));
    await sleep(pace);
    if (!forced && i >= RATE * 2 * 1.2 && rec.openTurn !== null) {
      socket.sendForceEndTurn({ type: "ForceEndTurn" });
      forced = true;
    }
  }
  if (!forced) {
    await waitFor(() => rec.openTurn !== null, 60, "a StartOfTurn in clip B");
    socket.sendForceEndTurn({ type: "ForceEndTurn" });
  }
  await waitFor(() => rec.ends().slice(before).some((e) => e.trigger === "manual"), 90, "the manual EndOfTurn");
  socket.sendCloseStream({ type: "CloseStream" });
  await waitFor(() => rec.ended, 60, "the server's close after CloseStream");
  await reader;
}

async function resumePhase(rec, session, expectTurns) {
  const { socket, reader } = await open(rec, { session });
  await waitFor(() => rec.of("Connected").length, 15, "Connected");
  await waitFor(() => rec.ends().length >= expectTurns, 30, `${expectTurns} replayed EndOfTurns`);
  socket.sendCloseStream({ type: "CloseStream" });
  await waitFor(() => rec.ended, 30, "the server's close after CloseStream");
  await reader;
}

async function refusalPhase(rec) {
  // Connect as a Deepgram program would and watch what the SDK surfaces, with its default
  // reconnect policy (reconnect on any close but 1000), for a few seconds; then close.
  let socket;
  try {
    ({ socket } = await open(rec, null));
  } catch (error) {
    // Refused at the handshake (Deepgram's HTTP 401): waitForOpen rejects with the error event.
    rec.errors.push(`waitForOpen: ${String(error?.message ?? error?.error?.message ?? error?.type ?? error)}`);
    await waitFor(() => rec.closes.length > 0, 15, "the SDK's close after the refusal");
    await sleep(Number(process.env.SDK_REFUSAL_WATCH_SECONDS ?? 4)); // does it retry on its own?
    return;
  }
  for (let i = 0; i < 5 && rec.closes.length === 0; i++) {
    try {
      socket.sendMedia(silence(0.08));
    } catch (error) {
      rec.errors.push(`send: ${String(error?.message ?? error)}`);
      break;
    }
    await sleep(pace);
  }
  await waitFor(() => rec.closes.length > 0, 15, "the server's close");
  await sleep(Number(process.env.SDK_REFUSAL_WATCH_SECONDS ?? 4));
  socket.close();
}

// -- main ------------------------------------------------------------------------------------------
const require = createRequire(import.meta.url);
const sdkVersion = JSON.parse(readFileSync(require.resolve("@deepgram/sdk/package.json"), "utf8")).version;
const summary = {
  sdk: "@deepgram/sdk",
  sdk_version: sdkVersion,
  node_version: process.version,
  base_url: baseUrl,
  connections: [],
  failure: null,
};
const records = [];
try {
  if (args.refusal) {
    const rec = new Record("refusal");
    records.push(rec);
    await refusalPhase(rec);
  } else {
    const a = args.tones ? Buffer.concat([tone(0.75), silence(0.8)]) : Buffer.concat([readWav(args.audio[0]), silence(1.2)]);
    const b = args.tones ? Buffer.concat([tone(2.4), silence(0.2)]) : readWav(args.audio[1]);
    const rec = new Record("stream");
    records.push(rec);
    await streamPhase(rec, a, b);
    if (args.resume) {
      const session = rec.summary().session_id;
      if (!session) throw new Error("Connected carried no session_id to resume");
      const again = new Record("resume");
      records.push(again);
      await resumePhase(again, session, rec.ends().length);
    }
  }
} catch (error) {
  summary.failure = String(error?.stack ?? error);
}
summary.connections = records.map((r) => r.summary());
process.stdout.write(JSON.stringify(summary) + "\n");
process.exit(summary.failure === null ? 0 : 1);
