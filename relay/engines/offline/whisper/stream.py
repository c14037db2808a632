"""One Whisper stream: Silero windows in, turn events out, in order.

The turn machine runs on the event loop and only decides; resampling and VAD run in the engine's
front-end worker, decodes in its decode pool (see the package docstring for how a turn is made).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from relay.exceptions import EngineError
from relay.flux.audio import Resampler
from relay.flux.constants import DEFAULT_EOT_THRESHOLD, DEFAULT_MODEL, MULTILINGUAL_MODEL
from relay.ops.logs import get_logger

from relay.engines.base import (
    TRIGGER_END_OF_STREAM,
    EngineWarning,
    StreamOptions,
    TurnEvent,
    Word,
    base_language,
    language_ignored_warning,
    model_ignored_warning,
)
from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_LATER_UPDATE, PRIORITY_STREAM, PRIORITY_UPDATE, OfflineStream

from .runner import RATE, Decoded
from .vad import SPEECH_OFF, SPEECH_ON, WINDOW, WINDOW_S

if TYPE_CHECKING:
    from .engine import WhisperEngine

log = get_logger("relay.engines.offline.whisper")

START_WINDOWS = 3  # ~100 ms of speech opens a turn
PREROLL_S = 0.4
#: A final's completion probability (Decoded.complete) at or below COMPLETE_LOW reads as
#: unfinished, at or above COMPLETE_HIGH as finished; the hangover is interpolated between.
COMPLETE_LOW = 0.1
COMPLETE_HIGH = 0.4
#: flux-general-multi: a turn's language is settled by the first decode with this much audio (or
#: by its final when shorter). Earlier Updates decode in a provisional guess and report none.
LANGUAGE_LOCK_S = 3.0
#: A decode's span is anchored to the speech, not to the 32 ms VAD windows: it starts ANCHOR_LEAD_S
#: before the turn's first loud 10 ms (no further back than just after the speech before it) and
#: a final ends ANCHOR_TAIL_S after the last, so the same words give the same samples to decode
#: wherever the stream's window boundaries fall. CONTEXT_S of audio from before the turn (the end
#: of the last one) is kept for the lead; the turn's own audio window is unchanged.
ANCHOR_LEAD_S = 0.4
ANCHOR_TAIL_S = 0.05
CONTEXT_S = 0.5
LOUD_SAMPLES = RATE // 100  # 10 ms, slid a sample at a time
LOUD_BELOW_PEAK = 0.01  # amplitude ratio (-40 dB) to the turn's loudest 10 ms
LOUD_FLOOR = 10 ** (-55 / 20)  # never quieter than -55 dBFS
LOUD_OVER_NOISE = 10 ** (10 / 20)  # nor than 10 dB over the noise (the quietest tenth of the audio)
QUIET_GAP = int(0.15 * RATE)  # a quieter stretch this long separates two stretches of speech
#: A pause is measured in samples from where the speculative final's speech ends, not in VAD
#: windows, and speech that resumes is placed where its loud stretch starts: so whether a pause
#: ends the turn depends on the audio alone, not on where the 32 ms windows fall. A pause long
#: enough to end the turn with a loud stretch that began inside it and goes on waits this much
#: more for the VAD to call it speech (the turn goes on) or not (it ends).
RESUME_WAIT_S = 0.128


class Span(NamedTuple):
    start: int  # the first sample to decode
    onset: int  # where the turn's speech starts
    end: int  # one past the last sample to decode (may pass the audio's end: digital silence)
    speech_end: int | None = None  # one past the last loud 10 ms; None: no span found in the samples
    loud: float | None = None  # the mean square that counted as loud


def _power(pcm: np.ndarray) -> np.ndarray:
    """The mean square of the 10 ms after each sample (``pcm.size - LOUD_SAMPLES`` values)."""
    sums = np.cumsum(np.square(pcm, dtype=np.float64))
    return (sums[LOUD_SAMPLES:] - sums[:-LOUD_SAMPLES]) / LOUD_SAMPLES


def _stretches(loud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (last loud sample) of the runs in ``loud`` (sorted sample indices) that no
    quiet stretch of QUIET_GAP splits."""
    cuts = np.flatnonzero(np.diff(loud) > QUIET_GAP)  # loud[cut] ends a stretch, loud[cut + 1] starts the next
    return np.concatenate(([loud[0]], loud[cuts + 1])), np.concatenate((loud[cuts], [loud[-1]]))


def loud_stretches(pcm: np.ndarray, loud: float) -> list[tuple[int, int]]:
    """``(start, end)`` of each loud stretch of ``pcm`` (end: one past its last loud 10 ms), by the
    ``loud`` mean square a final's :class:`Span` found."""
    if pcm.size <= LOUD_SAMPLES:
        return []
    at = np.flatnonzero(_power(pcm) >= loud)
    if not at.size:
        return []
    starts, ends = _stretches(at)
    return [(int(a), int(b) + LOUD_SAMPLES) for a, b in zip(starts, ends)]


def speech_span(pcm: np.ndarray, final: bool, speech_at: int = 0, context: int = 0) -> Span:
    """The :class:`Span` of ``pcm`` to decode; ``speech_at``: about where the VAD heard the turn's
    speech begin; ``context``: how many samples of ``pcm`` come from before the turn.

    Loud: a mean square over 10 ms, at any sample, within LOUD_BELOW_PEAK of the loudest 10 ms
    from ``speech_at`` on and LOUD_OVER_NOISE above the quietest tenth.
    The turn's speech starts where the loud stretch going on at ``speech_at`` (or the next one)
    starts, stretches being apart when quiet for QUIET_GAP; the span starts ANCHOR_LEAD_S before
    it but not before the previous stretch's end. A final ends ANCHOR_TAIL_S after the last loud
    10 ms; an Update keeps all it has. Everything here is a function of the samples, so the span
    moves with the speech sample for sample (``speech_at`` only picks the stretch). ``onset``:
    where the speech starts. When no quiet stretch tells the turn from what came before it (no
    loud sample, or noise as loud as speech running back into the context): the turn's own audio.
    """
    if pcm.size <= LOUD_SAMPLES:
        return Span(context, context, pcm.size)
    power = _power(pcm)
    peak = float(power[min(max(0, speech_at), power.size - 1) :].max())  # the turn's speech, not the context's
    every = power[:: LOUD_SAMPLES]
    noise = float(np.partition(every, every.size // 10)[every.size // 10])
    threshold = max(LOUD_FLOOR ** 2, peak * LOUD_BELOW_PEAK ** 2, noise * LOUD_OVER_NOISE ** 2)
    threshold = 10 ** (round(10 * np.log10(threshold)) / 10)  # in whole dB: a hair more noise moves nothing
    loud = np.flatnonzero(power >= threshold)
    if not loud.size:
        return Span(context, context, pcm.size)
    starts, ends = _stretches(loud)
    k = min(int(np.searchsorted(ends, speech_at)), ends.size - 1)  # the stretch going on at speech_at, or the next
    onset = int(starts[k])
    # The previous turn ended on a pause, so its speech is in the context and this turn's starts
    # after it. When no quiet stretch tells them apart (noise as loud as speech), decode the
    # turn's own audio as the VAD cut it rather than risk the last turn's words.
    if onset < context - LOUD_SAMPLES:
        return Span(context, context, pcm.size)
    # With nothing loud before, the whole lead: digital silence where the stream had not begun
    # yet (a negative start), so the first turn of a stream decodes the same wherever it started.
    start = onset - int(ANCHOR_LEAD_S * RATE)
    if k > 0:
        start = max(start, int(ends[k - 1]) + LOUD_SAMPLES)
    speech_end = int(loud[-1]) + LOUD_SAMPLES
    return Span(start, onset, speech_end + int(ANCHOR_TAIL_S * RATE) if final else pcm.size, speech_end, threshold)


def decode_span(decode: Any, pcm: np.ndarray, context: int, speech_at: int, final: bool, hotwords: str | None, *language: str | None,
                detect: Any = None) -> Decoded:
    """Worker thread: ``decode`` the :func:`speech_span` of ``pcm`` (whose first ``context``
    samples come from before the turn); word times from the turn's start.

    ``detect`` (flux-general-multi, the turn's language not settled yet): the language is
    detected on the first LANGUAGE_LOCK_S of the speech itself (from its onset, without the
    lead) once there is that much, so an Update that settles it and a final that comes before any
    such Update find the same language, however much audio each happened to have. Whisper base's
    guess on a 3 s window moves with the silence before the speech: the tests' espeak-ng German,
    from its onset, is German; with 300 ms of digital silence before it, Thai.

    A first turn whose speech starts less than ANCHOR_LEAD_S into the stream gets the rest of its
    lead as digital silence (:func:`speech_span` returns a negative start), so it decodes the same
    however long the stream ran before it spoke.
    """
    start, onset, end, speech_end, loud = speech_span(pcm, final, speech_at, context)
    # Digital silence where the span passes the audio: before it, the stream began inside the
    # lead; after it, a final was read before ANCHOR_TAIL_S of the pause came.
    piece = np.pad(pcm[max(0, start) : end], (max(0, -start), max(0, end - pcm.size)))
    speech = piece[onset - start :]  # the lead is left out: silence before the speech sways Whisper's guess
    settled = detect is not None and language == (None,) and speech.size >= LANGUAGE_LOCK_S * RATE
    if settled:
        language = (detect(speech[: int(LANGUAGE_LOCK_S * RATE)]),)
    decoded: Decoded = decode(piece, final, hotwords, *language)
    decoded.settled = settled
    if final and speech_end is not None:
        decoded.speech_end, decoded.loud = speech_end - context, loud
    if start != context:
        # Word times from the turn's start; none before the speech (Whisper puts the first word's
        # start anywhere in the lead), nor before the turn.
        shift, first = (start - context) / RATE, max(0.0, (onset - context) / RATE)
        at = lambda t: None if t is None else max(first, t + shift)  # noqa: E731
        decoded.words = [Word(w.word, w.confidence, at(w.start), at(w.end)) for w in decoded.words]
    return decoded


class WhisperStream(OfflineStream):
    engine: "WhisperEngine"

    def __init__(self, engine: "WhisperEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        self.resampler = Resampler(options.encoding, options.sample_rate, RATE)
        self.vad_state: dict[str, np.ndarray] | None = None
        self.carry = np.zeros(0, dtype=np.float32)
        self.windows_done = 0
        self.turn = 0
        # Events leave in order; an EndOfTurn still being decoded holds back the next turn's.
        self._outbox: collections.deque[TurnEvent | asyncio.Future] = collections.deque()
        self._out_idle = asyncio.Event()
        self._out_idle.set()
        self.update_task: asyncio.Task | None = None
        self.spec: asyncio.Future | None = None
        # Set when a running decode's result is no longer wanted, so it stops at its next stage.
        self.update_abandoned = threading.Event()
        self.spec_abandoned = threading.Event()
        # flux-general-multi only (set in start()): the pinned language (one hint), the languages
        # detection chooses from (several hints), the last turn's language (the prior).
        self.multilingual = False
        self.pinned: str | None = None
        self.candidates: frozenset[str] | None = None
        self.last_language: str | None = None
        self._reset_turn()
        self.preroll: list[np.ndarray] = []
        #: The latest windows whatever the turn state: a new turn's context (CONTEXT_S before its pre-roll).
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=int(CONTEXT_S / WINDOW_S) + int(PREROLL_S / WINDOW_S) + START_WINDOWS)
        self.speech_run = 0
        #: Windows (with their batch's fed_at) that came while the turn machine waits for a
        #: speculative final to decide the end of turn; None when it is not waiting.
        self._held: collections.deque[tuple[np.ndarray, float, float | None]] | None = None

    # -- options --------------------------------------------------------------------------------
    def _scale(self) -> float:
        """``eot_threshold / 0.7``: a higher threshold asks for more certainty, so every hangover is longer."""
        return (self.options.eot_threshold or DEFAULT_EOT_THRESHOLD) / DEFAULT_EOT_THRESHOLD

    def _timeout(self) -> float | None:
        """Silence after which the turn ends whatever was said (``eot_timeout_ms``), if the client set one."""
        return None if self.options.eot_timeout_ms is None else self.options.eot_timeout_ms / 1000

    def _decide_at(self) -> float:
        """VAD silence at which the speculative final is read (and waited for, if still decoding):
        a window after it starts, so that every pause is measured from where its speech ends."""
        return self.engine.speculate_s + WINDOW_S

    def _limit(self) -> tuple[float | None, str]:
        """(pause that ends the turn, its trigger): the hangover once the speculative final is read,
        or ``eot_timeout_ms`` when that comes first; None: neither applies yet."""
        timeout = self._timeout()
        if self.hangover is not None and (timeout is None or self.hangover <= timeout):
            return self.hangover, "model"
        return timeout, "timeout"

    def _pause(self) -> float:
        """Seconds of pause: from where the speculative final's speech ends, once it is read and
        found it; before that (or when it found none), the VAD's silence."""
        if self.speech_end is None:
            return self.silence
        return (self.turn_samples - self.speech_end) / RATE

    def _stretches_since(self, at: int) -> list[tuple[int, int]]:
        """The loud stretches of the turn's audio from sample ``at`` on, in samples from there."""
        assert self.loud is not None
        first = at // WINDOW
        pcm = np.concatenate(self.turn_audio[first:]) if len(self.turn_audio) > first else np.zeros(0, dtype=np.float32)
        return loud_stretches(pcm[at - first * WINDOW :], self.loud)

    def _may_speculate(self) -> bool:
        """After a speculative final found the speech going on past its audio: not before that
        loud stretch has been quiet for ``speculate_ms`` in the samples too (or the VAD's silence
        is as long as the longest hangover), so the next one has all of it."""
        if self.respec_from is None or self.silence >= self.engine.eot_incomplete_s * self._scale():
            return True
        stretches = self._stretches_since(self.respec_from)
        heard = self.turn_samples - self.respec_from
        return not stretches or heard - stretches[-1][1] >= self.engine.speculate_s * RATE

    def _hangover(self, decoded: Decoded | None) -> tuple[float, float]:
        """(silence that ends the turn, how finished the utterance reads, 0..1) for a speculative final.

        A finished-sounding utterance closes after ``eot_complete_ms``, an unfinished one waits
        ``eot_incomplete_ms``, in between by the final's completion probability; both scale with
        ``eot_threshold``. The decision depends on the decoded audio alone, never on timing.
        """
        p = decoded.complete if decoded is not None and decoded.complete is not None else None
        q = 0.0 if p is None else min(1.0, max(0.0, (p - COMPLETE_LOW) / (COMPLETE_HIGH - COMPLETE_LOW)))
        short, long = self.engine.eot_complete_s, self.engine.eot_incomplete_s
        return (long - q * (long - short)) * self._scale(), q

    def _hotwords(self) -> str | None:
        terms = [t.strip() for t in self.options.keyterms if t.strip()]
        return ", ".join(terms)[:400] if terms else None

    async def start(self) -> list[EngineWarning]:
        try:
            await self.engine.wait_loaded()
        except BaseException:
            self._release()
            raise
        self.vad_state = self.engine.vad.new_state()
        await super().start()
        runner = self.engine.runner
        if self.options.model == MULTILINGUAL_MODEL and runner.multilingual:
            self.multilingual = True
            return self._apply_hints()
        serving = f"transcribing English with {self.engine.model_label}"
        supported = {DEFAULT_MODEL, MULTILINGUAL_MODEL} if runner.multilingual else DEFAULT_MODEL
        warnings = [model_ignored_warning(self.options, serving=serving, supported=supported), language_ignored_warning(self.options, serving=serving)]
        return [w for w in warnings if w is not None]

    def _apply_hints(self) -> list[EngineWarning]:
        """One usable hint pins the language; several narrow detection to them; none: any language."""
        codes = list(dict.fromkeys(base_language(h) for h in self.options.language_hints))
        usable = [c for c in codes if c in self.engine.runner.languages]
        self.pinned = usable[0] if len(usable) == 1 else None
        self.candidates = frozenset(usable) if len(usable) > 1 else None
        if self.pinned is not None:
            self.turn_language = self.pinned
        unknown = [c for c in codes if c not in usable]
        if not unknown:
            return []
        return [EngineWarning("LANGUAGE_IGNORED", f"{self.engine.model_label} cannot transcribe {', '.join(unknown)}; that hint is not used.")]

    async def configure(
        self, thresholds: dict[str, Any], keyterms: list[str] | None, *, language_hints: list[str] | None = None
    ) -> list[EngineWarning]:
        # _scale(), _timeout() and _hotwords() read the options live; new hints apply from the next decode.
        await super().configure(thresholds, keyterms, language_hints=language_hints)
        if language_hints is None:
            return []
        if not self.multilingual:
            warning = language_ignored_warning(self.options, serving=f"transcribing English with {self.engine.model_label}")
            return [warning] if warning is not None else []
        return self._apply_hints()

    # -- turn state -----------------------------------------------------------------------------
    def _reset_turn(self) -> None:
        # Queued decodes of a finished turn would only be thrown away: take them off the pool.
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
            self.update_abandoned.set()  # running: it stops before its search
        self._drop_spec()
        self.in_turn = False
        self.turn_audio: list[np.ndarray] = []
        self.context: list[np.ndarray] = []  # windows before turn_audio, for the decodes' lead only
        self.speech_at = 0  # samples into turn_audio where the VAD's speech run began
        self.turn_samples = 0
        self.turn_start = 0.0  # stream seconds of the first sample in turn_audio
        self.silence = 0.0
        self.speech_since_update = 0.0
        self.updates_started = False
        self.eager_sent = False
        self.last_decoded: Decoded | None = None
        self.hangover: float | None = None  # silence that ends this pause's turn, once the spec is read
        self.finished = 0.0  # how finished the spec's text reads (0..1)
        self.speech_end: int | None = None  # sample of turn_audio where the spec's speech ends (see _pause)
        #: The running speculative final's speech end and loudness, found at its launch from the same
        #: samples its decode gets (speech_span), so known before its result (see _moot).
        self.spec_span: tuple[int, float] | None = None
        self.loud: float | None = None  # the mean square the turn's last speculative final counted as loud
        self.respec_from: int | None = None  # a spec's speech_end, when the speech went on past it (_may_speculate)
        self.turn_language: str | None = self.pinned  # flux-general-multi: settled for this turn

    def _now(self) -> float:
        return self.windows_done * WINDOW_S

    def _turn_event(
        self, name: str, decoded: Decoded | None = None, *, window: tuple[int, float, float] | None = None, **extra: Any
    ) -> TurnEvent:
        turn, start, end = window or (self.turn, self.turn_start, self._now())
        words = [
            Word(w.word, w.confidence, None if w.start is None else start + w.start, None if w.end is None else start + w.end)
            for w in (decoded.words if decoded else [])
        ]
        return TurnEvent(
            event=name,  # type: ignore[arg-type]
            turn=turn,
            transcript=decoded.text if decoded else "",
            words=words,
            audio_window_start=round(start, 3),
            audio_window_end=round(end, 3),
            languages=self._languages(name, decoded),
            **extra,
        )

    def _languages(self, name: str, decoded: Decoded | None) -> list[str] | None:
        """flux-general-multi: a final's own language; otherwise the turn's, once settled."""
        if not self.multilingual:
            return None
        if name in ("EagerEndOfTurn", "EndOfTurn") and decoded is not None and decoded.language:
            return [decoded.language]
        return [self.turn_language] if self.turn_language else None

    def _out(self, item: TurnEvent | asyncio.Future) -> None:
        self._outbox.append(item)
        if isinstance(item, asyncio.Future):
            self._out_idle.clear()
            item.add_done_callback(self._drain_out)
        self._drain_out()

    def _drain_out(self, _: object = None) -> None:
        while self._outbox:
            head = self._outbox[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    return
                self._outbox.popleft()
                if head.cancelled():
                    continue
                if head.exception() is not None:
                    log.error("whisper_final_failed", exc_info=head.exception())
                    self.emit(EngineError("The Whisper decoder failed."))
                    continue
                self.emit(head.result())
            else:
                self.emit(self._outbox.popleft())
        self._out_idle.set()

    def _turn_pcm(self) -> tuple[np.ndarray, int, int]:
        """The audio to decode from: the context, then the turn's own; the context's length; where speech began."""
        windows = self.context + self.turn_audio
        pcm = np.concatenate(windows) if windows else np.zeros(0, dtype=np.float32)
        context = sum(w.size for w in self.context)
        return pcm, context, context + self.speech_at

    def _speculate(self) -> asyncio.Future | None:
        """Start the speculative final once the audio holds all of the span it decodes (to
        ANCHOR_TAIL_S past the last loud 10 ms), so that its samples are the recording's, never
        digital silence standing in for a tail that had not come yet: which it had depended on
        where the VAD windows fell. None: not yet. A loud stretch that goes on at the audio's end
        (noise the VAD calls silence) waits for nothing past ANCHOR_TAIL_S more of VAD silence."""
        turn_pcm = self._turn_pcm()
        pcm, context, speech_at = turn_pcm
        span = speech_span(pcm, True, speech_at, context)
        if span.end > pcm.size and self.silence < self.engine.speculate_s + ANCHOR_TAIL_S:
            return None
        self.spec_abandoned = threading.Event()
        return self._launch(True, turn_pcm=turn_pcm, span=span, abandoned=self.spec_abandoned)

    def _launch(self, final: bool, priority: int = PRIORITY_UPDATE, *, turn_pcm: tuple[np.ndarray, int, int] | None = None,
                span: Span | None = None, abandoned: threading.Event | None = None) -> asyncio.Future:
        """Queue a decode of the turn; ``abandoned``, once set, stops it at its next stage (runner.Abandoned)."""
        priority = PRIORITY_FINAL if final else priority
        turn_pcm = turn_pcm or self._turn_pcm()
        if final:
            pcm, context, speech_at = turn_pcm
            span = span or speech_span(pcm, True, speech_at, context)
            self.spec_span = None if span.speech_end is None or span.loud is None else (span.speech_end - context, span.loud)
        runner = self.engine.runner
        if not self.multilingual:
            decode = runner.decode if abandoned is None else functools.partial(runner.decode, abandoned=abandoned)
            return asyncio.ensure_future(self.engine.pool.run(priority, decode_span, decode, *turn_pcm, final, self._hotwords()))
        # turn_language None: the language is detected (see decode_span).
        decode = functools.partial(runner.decode, candidates=self.candidates, prior=self.last_language, abandoned=abandoned)
        detect = functools.partial(runner.detect_audio, candidates=self.candidates, prior=self.last_language)
        return asyncio.ensure_future(self.engine.pool.run(priority, functools.partial(decode_span, detect=detect), decode, *turn_pcm,
                                                          final, self._hotwords(), self.turn_language))

    # -- audio ----------------------------------------------------------------------------------
    def _frontend(self, data: bytes, last: bool) -> tuple[np.ndarray, np.ndarray]:
        """Worker thread: resample, cut 32 ms windows, Silero probabilities."""
        pcm = self.resampler.process(data, last=last) if (data or last) else np.zeros(0, dtype=np.float32)
        pcm = np.concatenate((self.carry, pcm)) if self.carry.size else pcm
        if last and pcm.size % WINDOW:
            pcm = np.concatenate((pcm, np.zeros(WINDOW - pcm.size % WINDOW, dtype=np.float32)))
        k = pcm.size // WINDOW
        windows = pcm[: k * WINDOW].reshape(k, WINDOW).astype(np.float32, copy=False)
        self.carry = pcm[k * WINDOW :].copy()
        assert self.vad_state is not None
        return windows, self.engine.vad(windows, self.vad_state)

    async def process_audio(self, audio: bytes, last: bool = False) -> None:
        windows, probs = await self.engine.frontend.run(PRIORITY_STREAM, self._frontend, audio, last)
        for window, prob in zip(windows, probs):
            if self._held is not None:
                self._held.append((window, float(prob), self.fed_at))
            else:
                await self._window(window, float(prob))
        await self.resume()

    async def resume(self) -> None:
        """Read a speculative final the turn machine waits for, if ready (or go on without it when
        it is moot), and go on with the held windows."""
        while self._held is not None and (self.spec is None or self.spec.done() or self._moot()):
            held, self._held = self._held, None
            if self.spec is not None and self.spec.done():
                self._read_spec()
                await self._decide()
            elif self.spec is not None:
                self._read_moot()
            while held:
                if self._held is not None:  # the next pause waits for its own final
                    self._held.extend(held)
                    break
                window, prob, fed_at = held.popleft()
                self.fed_at = fed_at
                await self._window(window, prob)

    async def _catch_up(self) -> None:
        """Wait until no window is held (before a control message or the end of the stream)."""
        while self._held is not None:
            if self.spec is not None:
                await asyncio.wait([self.spec])
            await self.resume()

    async def _window(self, window: np.ndarray, prob: float) -> None:
        self.windows_done += 1
        self.recent.append(window)
        if not self.in_turn:
            self.preroll.append(window)
            limit = int(PREROLL_S / WINDOW_S) + START_WINDOWS
            if len(self.preroll) > limit:
                del self.preroll[: len(self.preroll) - limit]
            self.speech_run = self.speech_run + 1 if prob >= SPEECH_ON else 0
            if self.speech_run >= START_WINDOWS:
                self.in_turn = True
                self.turn_audio = self.preroll
                self.turn_samples = sum(w.size for w in self.preroll)
                self.context = list(self.recent)[: max(0, len(self.recent) - len(self.preroll))]
                self.speech_at = self.turn_samples - START_WINDOWS * WINDOW
                self.turn_start = self._now() - self.turn_samples / RATE
                self.preroll = []
                self.speech_run = 0
                self.speech_since_update = START_WINDOWS * WINDOW_S
                self._out(self._turn_event("StartOfTurn"))
            return

        self.turn_audio.append(window)
        self.turn_samples += window.size
        speaking = prob >= SPEECH_OFF if self.silence == 0.0 else prob >= SPEECH_ON
        if speaking and self.silence and self.speech_end is not None and await self._resumed_after_the_end(window, prob):
            return
        if speaking:
            self.silence = 0.0
            self.respec_from = None
            self.speech_since_update += WINDOW_S
            self._drop_spec()  # speech went on: a speculative final is stale
            if self.eager_sent:
                self.eager_sent = False
                self._out(self._turn_event("TurnResumed", self.last_decoded))
            self._maybe_update()
        else:
            self.silence += WINDOW_S
        if self.turn_samples / RATE >= self.engine.max_turn_s:
            await self.end_turn_now("max_duration")
            return
        # The speculative final decodes exactly the turn's audio up to speculate_ms into the
        # pause, whatever the pace or the load, so the same audio always gives the same final.
        if self.speech_end is not None:
            stretches = self._stretches_since(self.speech_end)
            if stretches and stretches[0][0] < QUIET_GAP:
                # The speech's own loud stretch (a trailing consonant the VAD calls silence) goes
                # on past the audio the speculative final had, which thus depended on where the
                # VAD's windows fell: decode again once it is over.
                respec_from = self.speech_end
                self._drop_spec()
                self.respec_from = respec_from
                if self.eager_sent:  # as when speech resumes: the EndOfTurn will come from the next one
                    self.eager_sent = False
                    self._out(self._turn_event("TurnResumed", self.last_decoded))
        if self.silence >= self.engine.speculate_s and self.spec is None and self._may_speculate():
            self.spec = self._speculate()
            if self.spec is not None:
                self.respec_from = None
        if self.spec is not None and self.hangover is None and self.silence >= self._decide_at():
            if not self.spec.done():
                # The turn machine waits for it; the audio after it is held meanwhile (resampled
                # and through the VAD already). When the turn ends is thus decided by what was
                # said and the audio's own clock, not by how busy the pool is.
                self._held = collections.deque()
                self.spec.add_done_callback(lambda _: self.wake())
                return
            self._read_spec()
        await self._decide()

    def _read_spec(self) -> None:
        spec = self.spec
        ok = spec is not None and spec.done() and not spec.cancelled() and spec.exception() is None
        # A failed decode decides nothing here: end_turn_now reports it with the EndOfTurn.
        decoded: Decoded | None = spec.result() if ok else None  # type: ignore[union-attr]
        self.hangover, self.finished = self._hangover(decoded)
        if decoded is not None and decoded.speech_end is not None and decoded.speech_end <= self.turn_samples:
            self.speech_end, self.loud = decoded.speech_end, decoded.loud

    def _moot(self) -> bool:
        """Whether the held windows already show speech coming back before this pause could end
        the turn, whatever the speculative final says. Then its result would only be dropped when
        the speech resumes, so the turn machine does not wait for it (:meth:`_read_moot`): a short
        pause between words no longer stalls the stream for a whole decode.

        From the audio alone, as every decision here: the pause is counted in samples from the
        speech end the final's decode will find (``spec_span``, the same function of the same
        samples), against the shortest limit any result could set (the finished hangover, the
        client's ``eot_timeout_ms``, the EagerEndOfTurn share of the hangover); and in VAD
        silence against the limit a failed decode would leave (the unfinished hangover)."""
        if self._held is None or self.spec_span is None or self.spec_span[0] > self.turn_samples:
            return False
        complete, timeout, ratio = self.engine.eot_complete_s * self._scale(), self._timeout(), self._eager_ratio()
        bound = min([complete] + ([timeout] if timeout is not None else []) + ([complete * ratio] if ratio is not None else [])) * RATE
        failed = self.engine.eot_incomplete_s * self._scale() if timeout is None else min(timeout, self.engine.eot_incomplete_s * self._scale())
        samples, silence = self.turn_samples, self.silence
        for window, prob, _ in self._held:
            samples += window.size
            if samples - self.spec_span[0] >= bound:
                return False
            if prob >= SPEECH_ON:  # the VAD hears speech again (a pause's threshold: silence > 0 here)
                return True
            silence += WINDOW_S
            if silence >= failed:
                return False
        return False

    def _read_moot(self) -> None:
        """Go on without a moot speculative final's result (:meth:`_moot`): no hangover ends this
        pause before the speech comes back, where the result is dropped as any would be."""
        assert self.spec_span is not None
        self.hangover, self.finished = float("inf"), 0.0
        self.speech_end, self.loud = self.spec_span

    async def _resumed_after_the_end(self, window: np.ndarray, prob: float) -> bool:
        """The VAD hears speech again in a measured pause: True when it starts (its loud stretch,
        or this window when nothing is loud) a pause long enough to end the turn after its speech
        ended. Then the turn ends there and this window begins the next one's pre-roll."""
        limit, trigger = self._limit()
        if limit is None:
            return False
        stretches = self._stretches_since(self.speech_end)  # type: ignore[arg-type]
        onset = stretches[-1][0] if stretches else self.turn_samples - window.size - self.speech_end  # type: ignore[operator]
        if onset < limit * RATE:
            return False
        self.turn_audio.pop()  # the turn's audio window ends before this one
        self.turn_samples -= window.size
        await self.end_turn_now(trigger)
        self.preroll = [window]
        self.speech_run = 1 if prob >= SPEECH_ON else 0
        return True

    async def _decide(self) -> None:
        limit, trigger = self._limit()
        pause = self._pause()
        if self.hangover is not None:
            ratio = self._eager_ratio()
            if ratio is not None and not self.eager_sent and pause >= self.hangover * ratio and self._spec_ok():
                self._send_eager(self.spec)  # type: ignore[arg-type]
        if limit is None or pause < limit:
            return
        if self.speech_end is not None and pause < limit + RESUME_WAIT_S:
            # The last 10 ms heard cannot be called loud or not yet: wait until all of the pause
            # up to the limit can. Then, something loud began inside the pause and goes on: speech
            # resuming in time (the turn goes on) unless the VAD still calls it silence
            # RESUME_WAIT_S after the limit.
            if pause < limit + LOUD_SAMPLES / RATE:
                return
            stretches = self._stretches_since(self.speech_end)
            heard = self.turn_samples - self.speech_end
            if stretches and stretches[-1][0] < limit * RATE and heard - stretches[-1][1] < QUIET_GAP:
                return
        await self.end_turn_now(trigger)

    def _eager_ratio(self) -> float | None:
        """``eager_eot_threshold / eot_threshold``: EagerEndOfTurn at that share of the hangover."""
        if self.options.eager_eot_threshold is None:
            return None
        return min(1.0, self.options.eager_eot_threshold / (self.options.eot_threshold or DEFAULT_EOT_THRESHOLD))

    def _spec_ok(self) -> bool:
        spec = self.spec
        return spec is not None and spec.done() and not spec.cancelled() and spec.exception() is None

    def _drop_spec(self) -> None:
        if self.spec is not None and not self.spec.done():
            self.spec.cancel()  # still queued: never runs; running: its result is ignored,
            self.spec_abandoned.set()  # and it stops at its next stage (search, alignment, completion)
        self.spec = None
        self.spec_span = None
        self.hangover = None
        self.finished = 0.0
        self.speech_end = None

    def _maybe_update(self) -> None:
        if self.eager_sent:
            return
        if not self.updates_started:
            interval, priority = self.engine.first_update_s, PRIORITY_UPDATE
        else:
            # Updates thin out first: with no worker idle, a running turn's Updates come a third as often.
            busy = not self.engine.pool.idle()
            interval, priority = self.engine.update_interval_s * (3 if busy else 1), PRIORITY_LATER_UPDATE
        if self.speech_since_update < interval:
            return
        if self.update_task is not None and not self.update_task.done():
            return
        self.updates_started = True
        self.speech_since_update = 0.0
        self.update_abandoned = threading.Event()
        job = self._launch(False, priority, abandoned=self.update_abandoned)
        self.update_task = asyncio.get_running_loop().create_task(self._update(self.turn, job))

    async def _update(self, turn: int, job: asyncio.Future) -> None:
        try:
            decoded: Decoded = await job
        except Exception:
            log.exception("whisper_update_failed")
            return
        if turn != self.turn or not self.in_turn or self.eager_sent or self._closed:
            return
        self.last_decoded = decoded
        if self.multilingual and self.turn_language is None and decoded.settled:
            self.turn_language = decoded.language
        expected = self.hangover if self.hangover is not None else self.engine.eot_incomplete_s * self._scale()
        confidence = min(0.99, self.silence / max(expected, 1e-3))
        self._out(self._turn_event("Update", decoded, end_of_turn_confidence=round(confidence, 3)))

    def _send_eager(self, future: asyncio.Future) -> None:
        decoded: Decoded = future.result()
        self.eager_sent = True
        self.last_decoded = decoded
        self._out(self._turn_event("EagerEndOfTurn", decoded, end_of_turn_confidence=self.options.eager_eot_threshold or 0.5))

    async def end_turn_now(self, trigger: str) -> None:
        """Close the turn now; its EndOfTurn leaves when its final decode is done.

        Audio processing goes on meanwhile (the next turn may start), but the next turn's events
        queue behind this EndOfTurn, so clients always see turns in order.
        """
        if self._held is not None:
            await self._catch_up()  # ForceEndTurn applies after the audio sent before it
        if not self.in_turn:
            return
        job = self.spec if self.spec is not None else self._launch(final=True)
        self.spec = None  # handed over: _reset_turn must not cancel it,
        self.spec_abandoned = threading.Event()  # nor stop it
        threshold = self.options.eot_threshold or DEFAULT_EOT_THRESHOLD
        # model: at or above the threshold, the more so the more finished the words read.
        confidence = {"model": round(threshold + (1 - threshold) * self.finished, 3), "timeout": 0.5}.get(trigger, 1.0)
        window = (self.turn, self.turn_start, self.turn_start + self.turn_samples / RATE)  # up to the turn's last window
        fed_at = self.fed_at  # the turn's end arrived with this batch, not with the one after its decode

        async def final() -> TurnEvent:
            decoded: Decoded = await job
            if decoded.language and self.multilingual:
                self.last_language = decoded.language
            event = self._turn_event("EndOfTurn", decoded, window=window, end_of_turn_confidence=confidence, trigger=trigger)
            return self.stamped(event, fed_at)

        self._out(asyncio.ensure_future(final()))
        self.turn += 1
        self._reset_turn()

    def release(self) -> None:
        """Closed (after flush, or aborted): a speculative final or an Update still running is no
        longer wanted. A final handed to an EndOfTurn is not touched."""
        self._drop_spec()
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
            self.update_abandoned.set()

    async def flush(self) -> None:
        await self.process_audio(b"", last=True)
        await self._catch_up()
        await self.end_turn_now(TRIGGER_END_OF_STREAM)
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
            self.update_abandoned.set()
        await self._out_idle.wait()

