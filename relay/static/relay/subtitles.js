// Transcript downloads, generated in the browser: plain text, SubRip (.srt) and WebVTT (.vtt).
//
// Subtitle times run from the first turn. A turn whose wall-clock start is known (seen live, or
// remembered from an earlier visit) is placed at that moment; one known only from history is
// placed right after the turn before it, for as long as its audio lasted.

const GAP_SECONDS = 0.2;
const MIN_CUE_SECONDS = 0.8;

/** [{turn, start, end}] in seconds from the first turn, sorted by start. */
export function timeline(turns) {
  const ordered = [...turns].sort((a, b) => a.index - b.index);
  const origin = ordered.find((t) => t.startedAt != null)?.startedAt ?? null;
  const cues = [];
  let cursor = 0;
  for (const turn of ordered) {
    const length = Math.max(MIN_CUE_SECONDS, turn.duration || 0);
    let start = turn.startedAt != null && origin != null ? (turn.startedAt - origin) / 1000 : cursor;
    if (start < 0) start = 0;
    const end = start + length;
    cues.push({ turn, start, end });
    cursor = Math.max(cursor, end + GAP_SECONDS);
  }
  return cues.sort((a, b) => a.start - b.start || a.turn.index - b.turn.index);
}

function pad(n, width = 2) {
  return String(n).padStart(width, "0");
}

/** 3723.5 -> "01:02:03,500" (SRT) or "01:02:03.500" (VTT). */
export function timestamp(seconds, separator) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  return `${pad(h)}:${pad(m)}:${pad(s)}${separator}${pad(ms % 1000, 3)}`;
}

export function clockTime(ms) {
  if (ms == null) return "";
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/**
 * @param {Array} turns finished turns
 * @param {{label: (id: string) => string, sessionId: string, exportedAt?: Date}} options
 */
export function toText(turns, { label, sessionId, exportedAt = new Date() }) {
  const lines = [`Relay transcript, session ${sessionId}, exported ${exportedAt.toISOString()}`, ""];
  for (const turn of [...turns].sort((a, b) => a.index - b.index)) {
    const time = turn.startedAt != null ? `[${clockTime(turn.startedAt)}] ` : "";
    lines.push(`${time}${label(turn.speaker)}: ${turn.transcript}`);
  }
  return lines.join("\n") + "\n";
}

export function toSrt(turns, { label }) {
  return timeline(turns)
    .map(
      (cue, i) =>
        `${i + 1}\n${timestamp(cue.start, ",")} --> ${timestamp(cue.end, ",")}\n${label(cue.turn.speaker)}: ${cue.turn.transcript}\n`,
    )
    .join("\n");
}

function vttEscape(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

export function toVtt(turns, { label }) {
  const cues = timeline(turns).map(
    (cue) =>
      `${timestamp(cue.start, ".")} --> ${timestamp(cue.end, ".")}\n<v ${vttEscape(label(cue.turn.speaker))}>${vttEscape(cue.turn.transcript)}\n`,
  );
  return ["WEBVTT\n", ...cues].join("\n");
}
