"""Silero VAD v6 (the ONNX model faster-whisper ships): a speech probability per 32 ms window.

One ONNX session per engine, run in the engine's front-end worker; each stream keeps its own
recurrent state (:meth:`SileroVad.new_state`).
"""
from __future__ import annotations

import os

import numpy as np

from .runner import RATE

WINDOW = 512  # Silero VAD window: 32 ms at 16 kHz
WINDOW_S = WINDOW / RATE
CONTEXT = 64  # samples of the previous window Silero v6 expects in front of each window
SPEECH_ON = 0.5  # Silero probability that starts speech
SPEECH_OFF = 0.35  # below this it is silence (hysteresis, as in faster_whisper.vad)


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
