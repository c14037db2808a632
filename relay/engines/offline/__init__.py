"""Engines that transcribe inside the relay process, with no network (docs/engines.md).

* :mod:`.pool`: the priority worker pool and the ordered stream both engines build on;
* :mod:`.whisper`: faster-whisper with Silero VAD (a package: model files, runner, VAD, stream, engine);
* :mod:`.sphinx`: pocketsphinx, cheap and streaming, less accurate.
"""
