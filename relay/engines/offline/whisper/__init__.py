"""Whisper (faster-whisper / CTranslate2) as a streaming turn engine, fully offline.

How a turn is made:

* **VAD: Silero** (the ONNX model faster-whisper ships), run on every 32 ms window in a small
  front-end worker. It costs about 0.3 % of a core per stream, separates speech from noise far
  better than an energy or WebRTC-style detector, and its per-window speech probability gives
  the turn machine a clean signal. (pocketsphinx's endpointer decides on a 300 ms window, which
  alone would eat half the end-of-turn latency budget.)
* **StartOfTurn** after about 100 ms of speech; the turn keeps 400 ms of audio from before it.
* **Updates**: the open turn is re-decoded greedily after ``first_update_ms`` of speech, then
  about every ``update_interval_ms``, at low priority and at most one in flight per stream; a
  turn's later Updates queue behind every first one, take at most all workers but one and come
  a third as often while no worker is idle, so under load Updates thin out and finals never
  wait for them.
* **Speculative final**: ``speculate_ms`` into a pause the turn is decoded with beam search and
  word alignment. It decodes exactly the turn's audio up to that point, whatever the pace or
  the load, so the same audio always gives the same final.
* **End of turn from what was said**: at ``eot_complete_ms`` of silence the speculative final
  is read (if still decoding, the turn machine waits for it and holds the windows after it,
  already through the VAD, to replay them once it is in). Its words get a
  completion probability (Whisper's decoder as a language model: how likely terminal
  punctuation comes next, :meth:`.runner.WhisperModelRunner.completion`). Words that read
  finished end the turn at ``eot_complete_ms`` of silence, unfinished ones ("I went to the
  store and", "...") only at ``eot_incomplete_ms``, in between by that probability; both scale
  with ``eot_threshold``, ``eot_timeout_ms`` caps them, and ``end_of_turn_confidence`` says how
  finished the words read. Every decision is on the audio's own clock, so it does not depend on
  timing either. EagerEndOfTurn (with ``eager_eot_threshold``) goes out at that share of the
  wait, with the same result the EndOfTurn will carry.
* **Short encoder windows**: CTranslate2 accepts mel inputs shorter than Whisper's 30 s. A turn
  is encoded in a window of its own length plus 3 s of padding (at least 8 s; 20 s for the
  final of a turn under 3 s, where 8 s cost short turns their first word), padded with
  silence; without the padding Whisper falls into repetition loops, so the length of every
  decode is also capped.

* **Spare cores**: a final that finds every other decode worker idle runs its completion pass
  beside its word alignment and is encoded on all the decoding cores (``wide_encode``, on by
  default) by a second copy of the model, kept only if it encodes bit for bit as the
  one-thread model does, so a final never depends on how busy the box was.

The model is loaded once per process (in a background thread, so the event loop never waits on
it) and shared by every stream; decodes run in a :class:`~relay.engines.offline.pool.WorkerPool`
sized by ``workers``. New streams get ``Capacity`` past ``max_streams`` (by default measured from
the box's speed when the model loads: :func:`.engine.default_capacity`) or when decodes queue.

The parts:

* :mod:`.model`: the bundled model files, their sha256 check and cache directory;
* :mod:`.runner`: :class:`WhisperModelRunner`, the loaded model and one decode (with the
  repetition-loop guards);
* :mod:`.vad`: :class:`SileroVad`, speech probability per 32 ms window;
* :mod:`.stream`: :class:`WhisperStream`, the per-stream turn machine;
* :mod:`.engine`: :class:`WhisperEngine`, what ``settings.RELAY_ENGINES`` names.
"""
from __future__ import annotations

import importlib.util

# Checked before any submodule loads, so choosing this engine without its optional packages
# fails with this message (the registry reports it as EngineUnavailable), and importing other
# engines never needs them.
for _module in ("faster_whisper", "ctranslate2", "onnxruntime"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"The whisper engine needs the {_module!r} package (pip install -r requirements.txt).")

from .engine import WhisperEngine  # noqa: E402
from .model import BUNDLED_MODEL_SHA256, bundled_model_dir, check_model_dir, default_cache_dir  # noqa: E402
from .runner import Decoded, WhisperModelRunner  # noqa: E402
from .stream import WhisperStream  # noqa: E402
from .vad import SileroVad  # noqa: E402

__all__ = [
    "BUNDLED_MODEL_SHA256",
    "Decoded",
    "SileroVad",
    "WhisperEngine",
    "WhisperModelRunner",
    "WhisperStream",
    "bundled_model_dir",
    "check_model_dir",
    "default_cache_dir",
]
