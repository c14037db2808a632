"""What a new upstream connection is resent (relay.engines.upstream.replay), with Opus as the hard case.

Opus test audio is made with PyAV's libopus encoder and checked by decoding it again, with the
relay's decoders and with FFmpeg's own Ogg demuxer: a resent stream must decode from its first
byte. The stream-level tests drive UpstreamStream's writer with a fake socket, as
test_upstream_connection.py does: no server, no timing.
"""
from __future__ import annotations

import asyncio
import io
import random

import av
import numpy as np
import pytest

from relay.engines.base import StreamOptions, TurnEvent
from relay.engines.upstream.deepgram import DeepgramEngine
from relay.engines.upstream.replay import MAX_UNIT_BYTES, AudioLog, OggOpusFramer, OpusFramer, PageNumbers, Unit, framer_for
from relay.engines.upstream.stream import UpstreamStream
from relay.exceptions import InvalidAudio
from relay.flux.codecs import OPUS_RATE, OggOpusDecoder, OpusDecoder, _ogg_crc, _Opus, frame_packet, opus_packet_samples
from tests.support.audio import silence, tone
from tests.support.opus import _frames, ogg_opus, opus_packets
from tests.unit.test_upstream_connection import FakeSocket, settle

PCM = tone(0.75) + silence(0.7) + tone(1.0) + silence(0.8)
OGG_OPTIONS = StreamOptions(encoding="ogg-opus", sample_rate=48000)
OPUS_OPTIONS = StreamOptions(encoding="opus", sample_rate=48000)


@pytest.fixture(scope="module")
def ogg() -> bytes:
    return ogg_opus(PCM)


def pages_of(data: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS"
        size = 27 + data[pos + 26] + sum(data[pos + 27 : pos + 27 + data[pos + 26]])
        pages.append(data[pos : pos + size])
        pos += size
    return pages


def split_anywhere(data: bytes, seed: int) -> list[bytes]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 26, 27, 28, 100, 999, 4096])
        pieces.append(data[i : i + n])
        i += n
    return pieces


def ffmpeg_decodes(data: bytes) -> int:
    """Samples FFmpeg's own Ogg demuxer and Opus decoder get from ``data``; raises if they cannot."""
    with av.open(io.BytesIO(data), format="ogg") as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def relay_decodes(data: bytes) -> int:
    decoder = OggOpusDecoder()
    samples = decoder.decode(data).size + decoder.finish().size
    assert decoder.take_warnings() == []
    return samples


# --- Opus durations from the TOC byte ----------------------------------------------------------------
@pytest.mark.parametrize("application", ["voip", "audio", "lowdelay"])  # SILK, Hybrid and CELT configurations
@pytest.mark.parametrize("frame_ms", ["2.5", "5", "10", "20", "40", "60", "120"])  # frame counts of codes 0-3
def test_opus_packet_durations_are_what_libopus_decodes(application, frame_ms):
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format, codec.bit_rate = 48000, "mono", "s16", 24000
    codec.options = {"frame_duration": frame_ms, "application": application}
    codec.open()
    packets = []
    for frame in _frames(tone(0.3) + silence(0.1), 16000, frame_size=codec.frame_size):
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    decoder = _Opus()
    assert [opus_packet_samples(p) for p in packets] == [decoder.packet(p).size for p in packets]
    assert opus_packet_samples(packets[0]) == int(float(frame_ms) * 48)


def test_what_cannot_be_an_opus_packet_has_no_duration():
    assert opus_packet_samples(b"") == 0
    assert opus_packet_samples(bytes([0x03])) == 0  # code 3 without its frame count byte
    assert opus_packet_samples(bytes([(11 << 3) | 3, 3])) == 0  # three 60 ms frames: over 120 ms
    assert opus_packet_samples(bytes([(11 << 3) | 3, 2])) == 5760
    assert opus_packet_samples(bytes([(16 << 3) | 1])) == 240  # two CELT 2.5 ms frames


# --- cutting frames into units ------------------------------------------------------------------------
def test_pcm_passes_through_with_bytes_as_ticks():
    framer = framer_for(StreamOptions(encoding="linear16", sample_rate=16000))
    assert framer.push(bytes(2560)) == [Unit(bytes(2560), 2560)]
    assert framer.ticks(1.0) == framer.ticks_per_second == 32000 and framer.divisible
    assert framer_for(StreamOptions(encoding="mulaw", sample_rate=8000)).ticks(0.5) == 4000


def test_opus_frames_are_units_of_their_own_duration():
    packets = opus_packets(PCM, frame_ms=20)
    framer = OpusFramer(OPUS_OPTIONS)
    units = [u for p in packets for u in framer.push(p)]
    assert [u.data for u in units] == packets and {u.ticks for u in units} == {960}
    assert framer.ticks(1.0) == OPUS_RATE and not framer.divisible


@pytest.mark.parametrize("seed", range(4))
def test_ogg_comes_out_as_header_pages_then_whole_units_wherever_frames_split(ogg, seed):
    framer = OggOpusFramer(OGG_OPTIONS)
    units = [u for piece in split_anywhere(ogg, seed) for u in framer.push(piece)]
    pages = pages_of(ogg)
    assert framer.header == pages[:2] and pages[0][28:36] == b"OpusHead" and pages[1][28:36] == b"OpusTags"
    assert [u.data for u in units if u.header] == pages[:2]
    audio = [u for u in units if not u.header]
    assert b"".join(u.data for u in audio) == b"".join(pages[2:])  # nothing lost, nothing added
    assert all(not u.data[5] & 0x01 for u in audio)  # no unit starts inside a packet
    pre_skip = int.from_bytes(pages[0][28 + 10 : 28 + 12], "little")
    last_granule = int.from_bytes(pages[-1][6:14], "little", signed=True)
    assert sum(u.ticks for u in audio) == last_granule - pre_skip
    # Granules are the encoder's word; what decodes differs by at most the pre-skip it drops.
    assert abs(sum(u.ticks for u in audio) - relay_decodes(ogg)) <= pre_skip
    assert framer.take_warnings() == []


def repaginate(ogg: bytes, max_segments: int) -> bytes:
    """The same Ogg Opus stream in pages of at most ``max_segments`` lacing values, so packets
    span pages (FFmpeg's muxer does that only past 255 segments). RFC 3533 framing."""
    pages = pages_of(ogg)
    segments: list[tuple[int, bytes, int | None]] = []  # (lacing value, bytes, granule if it ends a packet)
    granule = int.from_bytes(pages[0][38:40], "little")  # pre-skip: FFmpeg's granules count it
    for page in pages[2:]:
        lacing, pos, start = page[27 : 27 + page[26]], 27 + page[26], 27 + page[26]
        for value in lacing:
            pos += value
            if value < 255:  # a packet ends: its granule is the samples up to its end
                granule += opus_packet_samples(page[start:pos])
                start = pos
            segments.append((value, page[pos - value : pos], granule if value < 255 else None))
    out, continued = list(pages[:2]), False
    for n, first in enumerate(range(0, len(segments), max_segments)):
        run = segments[first : first + max_segments]
        granule = next((g for _, _, g in reversed(run) if g is not None), -1)
        last = first + max_segments >= len(segments)
        page = (
            b"OggS\0" + bytes([(0x01 if continued else 0) | (0x04 if last else 0)]) + granule.to_bytes(8, "little", signed=True)
            + pages[0][14:18] + (n + 2).to_bytes(4, "little") + bytes(4) + bytes([len(run)])
            + bytes(v for v, _, _ in run) + b"".join(d for _, d, _ in run)
        )
        out.append(page[:22] + _ogg_crc(page).to_bytes(4, "little") + page[26:])
        continued = run[-1][0] == 255
    return b"".join(out)


def test_packets_that_span_pages_stay_in_one_unit():
    noise = np.random.default_rng(7).normal(0, 6000, 16000).clip(-32000, 32000).astype("<i2").tobytes()
    ogg = repaginate(ogg_opus(noise + silence(0.3), bitrate=128000), max_segments=3)
    pages = pages_of(ogg)
    assert any(page[5] & 0x01 for page in pages), "the test stream must have packets that span pages"
    framer = OggOpusFramer(OGG_OPTIONS)
    units = [u for piece in split_anywhere(ogg, 1) for u in framer.push(piece) if not u.header]
    assert b"".join(u.data for u in units) == b"".join(pages[2:])
    assert all(not u.data[5] & 0x01 for u in units) and any(len(pages_of(u.data)) > 1 for u in units)
    for k in (1, len(units) // 2, len(units) - 1):  # resent from any unit, it decodes from its first byte
        numbers = PageNumbers()
        resent = b"".join(numbers(p) for p in framer.header + [u.data for u in units[k:]])
        assert abs(relay_decodes(resent) - sum(u.ticks for u in units[k:])) <= 312  # the pre-skip
        assert ffmpeg_decodes(resent) > 0


def test_ogg_that_is_not_ogg_opus_is_refused_and_garbage_later_is_skipped_with_a_warning(ogg):
    with pytest.raises(InvalidAudio):
        OggOpusFramer(OGG_OPTIONS).push(b"RIFF....WAVEfmt " + bytes(40))
    framer = OggOpusFramer(OGG_OPTIONS)
    pages = pages_of(ogg)
    units = framer.push(b"".join(pages[:3])) + framer.push(b"garbage" * 20) + framer.push(b"".join(pages[3:]))
    assert b"".join(u.data for u in units) == ogg
    assert ["not an Ogg page" in w for w in framer.take_warnings()] == [True]


def test_a_packet_that_never_ends_is_still_forwarded_in_bounded_units(ogg):
    header = pages_of(ogg)[:2]
    framer = OggOpusFramer(OGG_OPTIONS)
    framer.push(b"".join(header))
    held = []
    for n in range(20):  # 20 pages of 255 segments of 255 bytes: one packet of 1.3 MB, never ended
        page = b"OggS\0" + bytes([0x01 if n else 0]) + (-1).to_bytes(8, "little", signed=True) + header[0][14:18]
        page += (n + 2).to_bytes(4, "little") + bytes(4) + bytes([255]) + bytes([255] * 255) + bytes(255 * 255)
        units = framer.push(page[:22] + _ogg_crc(page).to_bytes(4, "little") + page[26:])
        held.append(sum(len(p) for p in framer._unit))
        assert all(len(u.data) <= MAX_UNIT_BYTES + len(page) for u in units)
    assert max(held) <= MAX_UNIT_BYTES


# --- renumbering pages --------------------------------------------------------------------------------
def test_a_resent_ogg_stream_has_its_header_and_contiguous_page_numbers(ogg):
    framer = OggOpusFramer(OGG_OPTIONS)
    units = [u for u in framer.push(ogg) if not u.header]
    numbers = PageNumbers()
    resent = b"".join(numbers(p) for p in framer.header + [u.data for u in units[2:]])
    pages = pages_of(resent)
    assert [int.from_bytes(p[18:22], "little") for p in pages] == list(range(len(pages)))
    assert all(_ogg_crc(p[:22] + bytes(4) + p[26:]) == int.from_bytes(p[22:26], "little") for p in pages)
    assert abs(relay_decodes(resent) - sum(u.ticks for u in units[2:])) <= 312  # the pre-skip
    assert ffmpeg_decodes(resent) > 0  # FFmpeg's demuxer takes it too (it trims to the granules it reads)
    first = PageNumbers()  # the first connection: the client's own numbers, the client's own bytes
    assert b"".join(first(p) for p in framer.header + [u.data for u in units]) == ogg


# --- the replay buffer --------------------------------------------------------------------------------
def test_audio_log_commits_bounds_and_counts_lost_pcm():
    log = AudioLog(max_ticks=100, width=2)
    for _ in range(4):
        log.append(Unit(bytes(30), 30))
    assert (log.base, log.fed, log.size, log.lost) == (30, 120, 90, 30)  # one frame dropped unanswered
    log.commit(75)  # rounds down to a whole sample, cuts inside a frame
    assert (log.base, log.size, log.lost) == (74, 46, 0) and b"".join(u.data for u in log.units()) == bytes(46)
    log.commit(10_000)
    assert log.size == 0 and log.base == log.fed == 120


def test_audio_log_never_cuts_a_compressed_unit():
    log = AudioLog(max_ticks=5 * 960, divisible=False, max_bytes=700)
    for i in range(4):
        log.append(Unit(bytes([i]) * 100, 960))
    log.commit(960 + 500)  # inside the second packet: it stays whole
    assert (log.base, log.size) == (960, 3 * 960) and [u.data[0] for u in log.units()] == [1, 2, 3]
    log.commit(2 * 960)
    assert [u.data[0] for u in log.units()] == [2, 3]
    for i in range(4, 9):
        log.append(Unit(bytes([i]) * 100, 960))
    assert [u.data[0] for u in log.units()] == [4, 5, 6, 7, 8] and log.lost == 2 * 960  # the time bound
    log.append(Unit(bytes([9]) * 450, 0))  # granules that say nothing: the byte bound still holds
    assert [u.data[0] for u in log.units()] == [7, 8, 9]


# --- the stream: what each connection is sent ---------------------------------------------------------
def upstream_stream(options: StreamOptions) -> UpstreamStream:
    engine = DeepgramEngine("deepgram-test", {"url": "ws://127.0.0.1:9/v2/listen", "api_key": "k", "keepalive_seconds": 3600.0})
    return UpstreamStream(engine, options)


async def run_writer(stream: UpstreamStream, ws: FakeSocket) -> asyncio.Task:
    link = stream._begin(ws)  # type: ignore[arg-type]
    writer = asyncio.get_running_loop().create_task(stream._write(link))
    await settle(writer, 10)
    return writer


def end_of_turn(start: float, end: float) -> TurnEvent:
    return TurnEvent("EndOfTurn", 0, "one", [], audio_window_start=start, audio_window_end=end, trigger="model")


async def test_ogg_after_a_reconnect_starts_with_the_header_and_decodes(ogg):
    stream = upstream_stream(OGG_OPTIONS)
    first = FakeSocket()
    writer = await run_writer(stream, first)
    for piece in split_anywhere(ogg, 3):
        stream.feed(piece)
    await settle(writer, 10)
    assert b"".join(first.sent) == ogg  # the first connection hears the client's own pages
    link = stream._link
    stream._on_turn_info(link, end_of_turn(0.1, 1.2))  # the upstream answered for the first 1.2 s
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)

    second = FakeSocket()
    writer = await run_writer(stream, second)  # a reconnect
    resent = b"".join(second.sent)
    assert resent.startswith(b"".join(pages_of(ogg)[:2]))
    # Resent from the 1 s page that holds 1.2 s (FFmpeg's muxer writes 1 s pages), all of it.
    assert stream._link.offset == 1.0 and relay_decodes(resent) == relay_decodes(ogg) - stream._link.start
    assert ffmpeg_decodes(resent) > 0
    assert [int.from_bytes(p[18:22], "little") for p in pages_of(resent)] == list(range(len(pages_of(resent))))
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


async def test_opus_after_a_reconnect_is_whole_packets_from_a_packet_boundary():
    packets = opus_packets(PCM, frame_ms=20)
    stream = upstream_stream(OPUS_OPTIONS)
    first = FakeSocket()
    writer = await run_writer(stream, first)
    for packet in packets:
        stream.feed(packet)
    await settle(writer, 10)
    assert first.sent == packets and stream._link.sent == 960 * len(packets)
    stream._on_turn_info(stream._link, end_of_turn(0.1, 1.23))  # 1.23 s is inside a 20 ms packet
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)

    second = FakeSocket()
    writer = await run_writer(stream, second)
    assert second.sent == packets[61:]  # from the packet holding 1.23 s (1.22-1.24 s), whole
    assert stream._link.offset == pytest.approx(61 * 0.02)
    decoder = OpusDecoder()
    assert decoder.decode(b"".join(frame_packet(p) for p in second.sent)).size == 960 * (len(packets) - 61)
    assert decoder.take_warnings() == []
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
