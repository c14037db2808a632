// The demo page: wires the microphone, the relay connection and the transcript to the DOM.

import { MicCapture } from "./capture.js";
import { RelayConnection } from "./connection.js";
import { clockTime, toSrt, toText, toVtt } from "./subtitles.js";
import { SessionStore, Speakers, Transcript, newSessionId } from "./transcript.js";

const config = JSON.parse(document.getElementById("relay-config").textContent);
const $ = (id) => document.getElementById(id);
const body = document.body;

// --- the session: from the link, or a new unguessable id written into the address bar ---------
const here = new URL(window.location.href);
let sessionId = here.searchParams.get("session");
if (!sessionId) {
  sessionId = newSessionId();
  here.searchParams.set("session", sessionId);
  window.history.replaceState(null, "", here);
}
// A share link (?share=, from /s/<link>/) admits with its role; ?role=viewer joins without a microphone.
const share = here.searchParams.get("share");
const wantsViewer = here.searchParams.get("role") === "viewer";
let viewOnly = wantsViewer;
const shareLink = `${here.origin}${here.pathname}?session=${encodeURIComponent(sessionId)}${share ? `&share=${encodeURIComponent(share)}` : ""}`;
$("share-link").value = shareLink;
$("manage-link").href = `${config.sessionsPath}${encodeURIComponent(sessionId)}/`;
$("session-id").textContent = sessionId;

const store = new SessionStore(sessionId);
const speakers = new Speakers(store.read("own", []));
const transcript = new Transcript({ times: store.loadTimes() });
let connectionId = null;
let recording = false;
let micBusy = false;
let recordingStartedAt = 0;
let lastStatus = { state: "idle" };

// --- messages in plain words --------------------------------------------------------------------
function explainFailure(error) {
  const code = error.code || "";
  const detail = error.description ? ` (${error.description})` : "";
  if (code === "UNAUTHORIZED" || error.closeCode === 4001)
    return "This relay only transcribes for signed-in users. Sign in, then reload this page.";
  if (code === "SHARE_LINK_INVALID")
    return "This share link no longer works: it expired or was revoked. Ask the session's owner for a new one.";
  if (code === "FORBIDDEN" || error.closeCode === 4003)
    return config.signedIn
      ? "This session belongs to another account, so it cannot be opened here. Ask its owner to invite you, or start a new session."
      : "This session belongs to an account. Sign in if you were invited, or start a new session.";
  if (code === "SESSION_ENDED" || error.closeCode === 4010)
    return "This session has been ended and takes no more audio. Start a new session to keep going.";
  if (code === "INVALID_SESSION")
    return "The session id in this link is not valid. Start a new session instead.";
  if (code === "FRAME_TOO_LARGE" || error.closeCode === 4009)
    return "The relay refused the audio this page sent. Reload the page to start again.";
  return `The relay refused the connection${detail}. Reload the page or start a new session.`;
}

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

let noticeTimer = null;
function notice(text, { keep = false } = {}) {
  $("notice").textContent = text;
  clearTimeout(noticeTimer);
  if (!keep) noticeTimer = setTimeout(() => ($("notice").textContent = ""), 8000);
}

function seconds(value) {
  return `${value.toFixed(1)} s`;
}

// --- connection state ---------------------------------------------------------------------------
function renderStatus() {
  const s = lastStatus;
  const status = $("status");
  let text;
  let tone;
  const waiting = s.queuedSeconds > 0.25 ? ` · ${seconds(s.queuedSeconds)} of audio waiting` : "";
  switch (s.state) {
    case "connecting":
      [text, tone] = ["Connecting…", "wait"];
      break;
    case "open":
      [text, tone] = recording ? ["Live · transcribing", "live"] : ["Connected", "ok"];
      break;
    case "finishing":
      [text, tone] = ["Finishing the last words…", "wait"];
      break;
    case "retrying": {
      const left = Math.max(0, (s.retryAt - Date.now()) / 1000);
      const why = navigator.onLine === false ? "You are offline" : "Connection lost";
      [text, tone] = [`${why} · retrying in ${left.toFixed(1)} s${waiting}`, "wait"];
      break;
    }
    case "reconnecting":
      [text, tone] = [`Reconnecting…${waiting}`, "wait"];
      break;
    case "resuming":
      [text, tone] = [`Reconnected · checking what the relay kept…${waiting}`, "wait"];
      break;
    case "failed":
      [text, tone] = ["Stopped by an error", "bad"];
      break;
    case "closed":
      [text, tone] = ["Disconnected", "idle"];
      break;
    default:
      [text, tone] = ["Starting…", "idle"];
  }
  $("status-text").textContent = text;
  status.dataset.tone = tone;
  body.dataset.state = s.state;
  body.dataset.queuedMs = String(Math.round((s.queuedSeconds || 0) * 1000));
  body.dataset.reconnects = String(s.reconnects || 0);
  body.dataset.resentMs = String(Math.round((s.resentSeconds || 0) * 1000));
  body.dataset.coveredMs = String(Math.round((s.coveredSeconds || 0) * 1000));
  if (s.lastResume) body.dataset.resume = s.lastResume.why;
  renderPresence();
  renderStats();
}

function renderStats() {
  const sent = connection.sentBytes / connection.bytesPerSecond;
  const n = connection.reconnects;
  const reconnects = n === 1 ? "1 reconnect" : `${n} reconnects`;
  $("stats").textContent = `Engine ${config.engine} · ${seconds(sent)} of audio sent · ${reconnects}`;
}

let countdown = null;
let droppedShown = 0;
let lateShown = 0;
let relayError = null;
function onStatus(status) {
  lastStatus = status;
  clearInterval(countdown);
  if (status.state === "retrying") countdown = setInterval(renderStatus, 200);
  if (status.reconnected && status.state !== "resuming") {
    notice(
      status.backlogSeconds > 0.1
        ? `Reconnected. Sending the ${seconds(status.backlogSeconds)} of audio recorded while the connection was down.`
        : "Reconnected.",
    );
  } else if (status.resumed) {
    const { resentBytes, coveredBytes } = status.resumed;
    const resent = resentBytes / connection.bytesPerSecond;
    const parts = [];
    if (coveredBytes > 0) parts.push("the relay had kept your last words");
    if (resent > 0.1) parts.push(`sending again the ${seconds(resent)} the relay had not finished`);
    const waiting = status.backlogSeconds - resent;
    if (waiting > 0.1) parts.push(`then the ${seconds(waiting)} recorded while the connection was down`);
    notice(parts.length ? `Reconnected: ${parts.join(", ")}.` : "Reconnected.");
  }
  if (status.lateFinishes > lateShown) {
    lateShown = status.lateFinishes;
    notice("The relay finished your last words after this page had sent them again, so a few may show twice.", { keep: true });
  }
  if (status.droppedSeconds > droppedShown + 0.5) {
    droppedShown = status.droppedSeconds;
    notice(`The connection was down for too long: the oldest ${seconds(status.droppedSeconds)} of audio could not be kept.`, { keep: true });
  }
  if (status.state === "failed" && status.error) {
    showError(explainFailure(status.error));
    if (recording) stopMic({ finish: false });
  } else if (status.state === "retrying" && relayError) {
    notice(`The relay reported a problem (${relayError.description}); reconnecting.`);
  } else if (status.state === "open") {
    clearError();
  }
  if (status.state !== "open") relayError = null;
  renderStatus();
}

function renderPresence() {
  const n = Number(body.dataset.connections || 0);
  const live = ["open", "resuming", "finishing"].includes(lastStatus.state);
  $("presence").textContent = !live || !n ? "Not connected" : n === 1 ? "Just you" : n === 2 ? "You + 1 other" : `You + ${n - 1} others`;
}

function onPresence(message) {
  body.dataset.connections = String(message.connections);
  renderPresence();
  if (message.event === "leave") {
    for (const turn of transcript.dropInterims((t) => t.speaker === message.connection_id)) removeInterim(turn.index);
  }
}

function onMessage(message) {
  switch (message.type) {
    case "Connected":
      setRole(message.role);
      connectionId = message.connection_id;
      body.dataset.connectionId = connectionId;
      speakers.addOwn(connectionId);
      store.write("own", [...speakers.own].slice(-200));
      // Our earlier connection's open turn comes back final (the relay flushed it) or not at all.
      for (const turn of transcript.dropInterims((t) => speakers.isOwn(t.speaker) && t.speaker !== connectionId))
        removeInterim(turn.index);
      break;
    case "Presence":
      onPresence(message);
      break;
    case "History":
      // The replay is complete: every finished turn this page had not seen is on screen.
      body.dataset.history = String(message.turns);
      break;
    case "TurnInfo":
      onTurn(message);
      break;
    case "Warning":
      notice(`Note from the relay: ${message.description}`);
      break;
    case "Error":
      if (message.code === "FORBIDDEN" && viewOnly) {  // not fatal: a viewer's audio or control message was refused
        notice("You are viewing this session and cannot speak in it.");
        break;
      }
      relayError = message; // said when the close that follows shows whether a retry helps
      break;
    default:
  }
}

// --- transcript rendering -----------------------------------------------------------------------
const turnsList = $("turns");
const interimsList = $("interims");
const scroller = $("transcript");
const interimElements = new Map();
let saveTimesTimer = null;

function buildTurn(turn) {
  const li = document.createElement("li");
  li.className = turn.final ? "turn" : "turn interim";
  li.dataset.index = String(turn.index);
  li.dataset.speaker = turn.speaker;
  li.dataset.tone = String(speakers.tone(turn.speaker));
  li.dataset.replayed = String(turn.replayed);
  const meta = document.createElement("div");
  meta.className = "turn-meta";
  const who = document.createElement("span");
  who.className = "speaker";
  meta.append(who);
  const time = document.createElement("time");
  const language = document.createElement("span");
  language.className = "turn-lang";
  meta.append(time, language);
  const text = document.createElement("p");
  text.className = "turn-text";
  li.append(meta, text);
  fillTurn(li, turn);
  return li;
}

function fillTurn(li, turn) {
  li.querySelector(".speaker").textContent = speakers.label(turn.speaker);
  const time = li.querySelector("time");
  if (turn.startedAt != null) {
    time.dateTime = new Date(turn.startedAt).toISOString();
    time.textContent = clockTime(turn.startedAt);
  } else {
    time.textContent = "earlier";
  }
  li.querySelector(".turn-text").textContent = turn.transcript;
  const language = li.querySelector(".turn-lang");
  language.textContent = (turn.languages || []).join(", ");
  language.title = turn.languages?.length ? "Language of this turn" : "";
  language.hidden = !turn.languages?.length;
}

function insertOrdered(list, li, index) {
  const last = list.lastElementChild;
  if (!last || Number(last.dataset.index) < index) {
    list.append(li);
    return;
  }
  for (const child of list.children) {
    if (Number(child.dataset.index) > index) {
      list.insertBefore(li, child);
      return;
    }
  }
  list.append(li);
}

function removeInterim(index) {
  const li = interimElements.get(index);
  if (li) li.remove();
  interimElements.delete(index);
  updateEmpty();
}

function updateEmpty() {
  $("empty").hidden = turnsList.children.length + interimsList.children.length > 0;
}

/** How the relay serves this page: a viewer watches live and never sends audio. */
function setRole(role) {
  body.dataset.role = role || "speaker";
  $("manage-link").hidden = role !== "owner";
  if (role === "owner") $("share-label").textContent = "Link for you and the people you invite (others need a share link)";
  const viewer = role === "viewer";
  if (viewer && recording) stopMic({ finish: false });
  if (viewer) $("mic-hint").textContent = "You are viewing this session: the transcript appears live, but you cannot speak in it.";
  viewOnly = viewer;
  renderMic();
}

function onTurn(message) {
  if (message.speaker_name) speakers.setName(message.speaker, message.speaker_name);
  const stick = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 64;
  const spokenAt = connection.captureTime(message.speaker, Number(message.audio_window_start));
  const { kind, turn } = transcript.apply(message, { startedAt: spokenAt });
  if (kind === "final") {
    removeInterim(turn.index);
    if (turn.transcript) insertOrdered(turnsList, buildTurn(turn), turn.index);
    clearTimeout(saveTimesTimer);
    saveTimesTimer = setTimeout(() => store.saveTimes(transcript.times), 1000);
  } else if (kind === "interim") {
    let li = interimElements.get(turn.index);
    if (li) fillTurn(li, turn);
    else {
      li = buildTurn(turn);
      interimElements.set(turn.index, li);
      insertOrdered(interimsList, li, turn.index);
    }
  } else {
    return;
  }
  updateEmpty();
  body.dataset.finalTurns = String(transcript.finals.size);
  if (stick) scroller.scrollTop = scroller.scrollHeight;
}

// --- language: English only (flux-general-en), detected per turn, or one language (a hint) -------
const LANGUAGE_KEY = "relay:language";  // a preference of this browser, not of the session
const languageSelect = $("language");
try {
  const saved = localStorage.getItem(LANGUAGE_KEY);
  if (saved && [...languageSelect.options].some((o) => o.value === saved)) languageSelect.value = saved;
} catch {
  // Private mode: English only, as by default.
}

function languageQuery() {
  const choice = languageSelect.value;
  if (choice === "en") return { model: "flux-general-en" };
  return choice === "auto" ? { model: "flux-general-multi" } : { model: "flux-general-multi", language_hint: choice };
}

languageSelect.addEventListener("change", async () => {
  try {
    localStorage.setItem(LANGUAGE_KEY, languageSelect.value);
  } catch {
    // Not kept across reloads; this page still uses it.
  }
  if (recording || micBusy) return;
  // The query is read when connecting: reconnect so the next turn uses the new language.
  micBusy = true;
  renderMic();
  await connection.finish();
  connection.open();
  micBusy = false;
  renderMic();
});

// --- the relay connection -----------------------------------------------------------------------
const wsScheme = window.location.protocol === "https:" ? "wss:" : "ws:";
const connection = new RelayConnection({
  endpoint: `${wsScheme}//${window.location.host}${config.wsPath}`,
  query: () => ({ session: sessionId, since: transcript.since(), encoding: "linear16", sample_rate: 16000, relay_events: "presence,history", ...languageQuery(),
    share, role: wantsViewer ? "viewer" : null }),
  onMessage,
  onStatus,
  bufferSeconds: config.bufferSeconds,
});

// --- microphone ---------------------------------------------------------------------------------
const micButton = $("mic");
const meter = $("meter");
const meterFill = meter.querySelector(".meter-fill");
let meterValue = 0;

function showLevel(rms) {
  const db = 20 * Math.log10(Math.max(rms, 1e-5));
  const target = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  meterValue = target > meterValue ? target : meterValue * 0.6 + target * 0.4;
  meterFill.style.setProperty("--level", `${meterValue.toFixed(1)}%`);
  meter.setAttribute("aria-valuenow", String(Math.round(meterValue)));
}

const capture = new MicCapture({
  workletUrl: config.workletUrl,
  onChunk: (pcm, capturedAt) => connection.sendAudio(pcm, capturedAt),
  onLevel: showLevel,
  onEnded: () => {
    showError("The microphone stopped (unplugged or access revoked). Press Start to use it again.");
    stopMic();
  },
});

let elapsedTimer = null;
function renderMic() {
  micButton.setAttribute("aria-pressed", String(recording));
  $("mic-label").textContent = recording ? "Stop" : "Start microphone";
  micButton.disabled = micBusy || viewOnly;
  languageSelect.disabled = recording || micBusy;
  body.dataset.recording = String(recording);
  const elapsed = recording ? Math.floor((Date.now() - recordingStartedAt) / 1000) : 0;
  $("elapsed").textContent = `${Math.floor(elapsed / 60)}:${String(elapsed % 60).padStart(2, "0")}`;
  renderStatus();
}

async function startMic() {
  micBusy = true;
  clearError();
  renderMic();
  try {
    await capture.start();
  } catch (error) {
    showError(error.message);
    micBusy = false;
    renderMic();
    return;
  }
  recording = true;
  micBusy = false;
  recordingStartedAt = Date.now();
  elapsedTimer = setInterval(renderMic, 1000);
  connection.open();
  renderMic();
  body.dataset.capture = JSON.stringify(capture.path);
  $("mic-hint").textContent = capture.inputRate
    ? `Microphone on (${(capture.inputRate / 1000).toFixed(1)} kHz, sent as 16 kHz). Speak naturally; pause to end a turn.`
    : "Microphone on.";
}

async function stopMic({ finish = true } = {}) {
  if (!recording) return;
  micBusy = true;
  recording = false;
  clearInterval(elapsedTimer);
  renderMic();
  await capture.stop();
  $("mic-hint").textContent = "Microphone off. Press Start to speak again.";
  if (finish) {
    // CloseStream makes the relay finish the open turn; then listen on, for the other tabs.
    await connection.finish();
    connection.open();
  }
  micBusy = false;
  renderMic();
}

micButton.addEventListener("click", () => {
  if (micBusy || viewOnly) return;
  if (recording) stopMic();
  else startMic();
});

// --- share, download, errors --------------------------------------------------------------------
$("copy-link").addEventListener("click", async () => {
  const input = $("share-link");
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select();
    document.execCommand("copy");
  }
  notice("Share link copied. Anyone who opens it sees this transcript live.");
});
$("share-link").addEventListener("focus", (event) => event.target.select());
$("error-dismiss").addEventListener("click", clearError);

const FORMATS = {
  txt: { make: toText, type: "text/plain" },
  srt: { make: toSrt, type: "application/x-subrip" },
  vtt: { make: toVtt, type: "text/vtt" },
};
for (const button of document.querySelectorAll("[data-download]")) {
  button.addEventListener("click", () => {
    const kind = button.dataset.download;
    const turns = transcript.finishedTurns();
    if (!turns.length) {
      notice("Nothing to download yet: no finished turns.");
      return;
    }
    const text = FORMATS[kind].make(turns, { label: (id) => speakers.label(id), sessionId });
    const href = URL.createObjectURL(new Blob([text], { type: `${FORMATS[kind].type};charset=utf-8` }));
    const a = document.createElement("a");
    a.href = href;
    a.download = `relay-${sessionId}.${kind}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 10000);
  });
}

window.addEventListener("offline", () => notice(`You are offline. Audio is kept (up to ${config.bufferSeconds} s) and sent when you are back.`, { keep: true }));
window.addEventListener("online", () => notice("Back online."));
window.addEventListener("pagehide", () => {
  store.saveTimes(transcript.times);
  connection.close();
});

renderMic();
connection.open();
