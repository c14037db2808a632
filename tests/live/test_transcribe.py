"""The CLI client against a real daphne (fake engine): turns printed as they come, any format
PyAV decodes (mp3, ogg, flac made here by PyAV from a WAV), resuming a session, errors reported,
and a session of two uploads exported on one timeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from relay.management.commands.transcribe import open_audio, stream_url
from tests.support.audio import silence, tone, wav_bytes
from tests.support.live import ROOT, LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

SPEECH = (tone(0.75) + silence(0.7)) * 3 + tone(0.5)  # the fake engine: 3 x "one two three", then "one two"


def transcribe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_DEBUG": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", "transcribe", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(sqlite_env(tmp_path_factory.mktemp("cli"))) as live:
        yield live


def test_wav_streams_and_prints_turns_in_order(server, tmp_path):
    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(SPEECH))
    result = transcribe(str(wav), "--url", server.ws_url + "/v2/listen", "--session", "cli-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[0] one two three", "[1] one two three", "[2] one two three", "[3] one two"]
    assert "session cli-1" in result.stderr and "4 turn(s)" in result.stderr
    assert "audio:" in result.stderr and "100%" in result.stderr  # the progress bar reached the end


def encode(pcm: bytes, path, *, codec: str, rate: int = 44100, layout: str = "stereo") -> None:
    """``pcm`` (16 kHz mono s16) written by PyAV as ``path`` in ``codec``, at another rate and layout."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype="<i2").reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for converted in (*resampler.resample(frame), *resampler.resample(None)):
            converted.pts = None
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize(("name", "codec"), [("speech.mp3", "libmp3lame"), ("speech.ogg", "libopus"), ("speech.flac", "flac")])
def test_any_format_pyav_decodes_is_converted(server, tmp_path, name, codec):
    path = tmp_path / name
    encode(SPEECH, path, codec=codec, rate=48000 if codec == "libopus" else 44100)
    source = open_audio(str(path), chunk_ms=100)
    assert source.converted and source.rate == 16000
    assert source.seconds == pytest.approx(len(SPEECH) / 32000, abs=0.1)  # encoders pad a frame or so
    pcm = b"".join(source.chunks())
    assert len(pcm) / 32000 == pytest.approx(len(SPEECH) / 32000, abs=0.1)
    result = transcribe(str(path), "--url", server.ws_url + "/v2/listen", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0] == "[0] one two three" and lines[3].startswith("[3] one two")


def test_the_audio_track_of_a_video_file_is_transcribed(tmp_path):
    path = tmp_path / "talk.m4a"  # an MP4 container, as a video file's audio comes
    encode(SPEECH, path, codec="aac")
    pcm = b"".join(open_audio(str(path), chunk_ms=100).chunks())
    assert len(pcm) / 32000 == pytest.approx(len(SPEECH) / 32000, abs=0.1)


def test_realtime_resume_and_json_lines(server, tmp_path):
    wav = tmp_path / "short.wav"
    wav.write_bytes(wav_bytes(tone(0.5) + silence(0.7)))
    first = transcribe(str(wav), "--url", server.ws_url + "/v2/listen", "--session", "cli-rt", "--realtime", "--no-progress")
    assert first.returncode == 0 and first.stdout.splitlines() == ["[0] one two"]
    again = transcribe(str(wav), "--url", server.ws_url + "/v2/listen", "--session", "cli-rt", "--json", "--no-progress")
    assert again.returncode == 0, again.stderr
    messages = [json.loads(line) for line in again.stdout.splitlines()]
    assert messages[0]["type"] == "Connected" and messages[0]["resumed"] is True
    ends = [m for m in messages if m.get("event") == "EndOfTurn"]
    assert [(m["turn_index"], m.get("replayed", False)) for m in ends] == [(0, True), (1, False)]
    assert "(resumed)" in again.stderr


def test_relay_errors_become_a_failing_exit(server, tmp_path):
    wav = tmp_path / "short.wav"
    wav.write_bytes(wav_bytes(tone(0.2)))
    result = transcribe(str(wav), "--url", server.ws_url + "/v2/listen", "--session", "bad session id!")
    assert result.returncode != 0 and "INVALID_SESSION" in result.stderr


def test_unreadable_files_and_urls_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not audio at all" * 10)
    result = transcribe(str(junk), "--url", "ws://127.0.0.1:9/v2/listen")
    assert result.returncode != 0 and "Cannot decode" in result.stderr
    assert "No such file" in transcribe(str(tmp_path / "missing.wav")).stderr
    wav = tmp_path / "short.wav"
    wav.write_bytes(wav_bytes(tone(0.2)))
    assert "ws:// or wss://" in transcribe(str(wav), "--url", "http://127.0.0.1:9/").stderr


def test_stream_url_keeps_existing_query_and_adds_ours():
    url = stream_url("wss://relay.example/v2/listen?eot_threshold=0.8", session="s", since=3, rate=8000)
    assert url == "wss://relay.example/v2/listen?eot_threshold=0.8&encoding=linear16&sample_rate=8000&session=s&since=3"


def test_what_the_cli_streamed_exports_and_probes_answer_over_daphne(server, tmp_path):
    """The ASGI paths end to end: streamed exports, async /healthz, /metrics from the database."""
    import urllib.request

    import srt
    from prometheus_client.parser import text_string_to_metric_families

    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(SPEECH))
    assert transcribe(str(wav), "--url", server.ws_url + "/v2/listen", "--session", "cli-export", "--no-progress").returncode == 0
    with urllib.request.urlopen(server.http_url + "/sessions/cli-export/transcript.srt") as response:
        subs = list(srt.parse(response.read().decode()))
    assert [s.content for s in subs] == ["one two three"] * 3 + ["one two"]
    assert subs[0].start.total_seconds() == pytest.approx(0.0, abs=0.05)
    with urllib.request.urlopen(server.http_url + "/healthz") as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(server.http_url + "/metrics") as response:
        names = {s.name for f in text_string_to_metric_families(response.read().decode()) for s in f.samples}
    assert {"relay_live_connections", "relay_live_sessions", "relay_database_up"} <= names


def test_two_uploads_into_one_session_export_without_overlapping_cues(server, tmp_path):
    """Uploads go faster than real time: the second one's audio follows the first's, not the clock."""
    import urllib.request

    import srt

    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(SPEECH))
    for _ in range(2):
        result = transcribe(str(wav), "--url", server.ws_url + "/v2/listen", "--session", "cli-two", "--no-progress")
        assert result.returncode == 0, result.stderr
    with urllib.request.urlopen(server.http_url + "/sessions/cli-two/transcript.srt") as response:
        subs = list(srt.parse(response.read().decode()))
    with urllib.request.urlopen(server.http_url + "/sessions/cli-two/transcript.vtt") as response:
        vtt = response.read().decode()
    assert len(subs) == 8
    for before, after in zip(subs, subs[1:]):
        assert after.start >= before.end, f"cue {after.index} starts before cue {before.index} ends"
    # The second upload starts where the first's audio ended, not seconds of wall clock later.
    audio = len(SPEECH) / 32000
    assert subs[4].start.total_seconds() == pytest.approx(audio, abs=0.5)
    times = [line.split(" --> ") for line in vtt.splitlines() if " --> " in line]
    assert len(times) == 8 and all(a[1] <= b[0] for a, b in zip(times, times[1:]))
