"""relay.flux.codecs: every Flux encoding through one streaming decoder (PyAV for Opus)."""
from __future__ import annotations

import io
import random

import av
import numpy as np
import pytest

from relay.exceptions import InvalidAudio
from relay.flux import audio
from relay.flux.codecs import MAX_BAD_PACKETS, OggOpusDecoder, _ogg_crc, decoder_for, frame_packet
from tests.support.audio import silence, tone
from tests.support.opus import ogg_opus, opus_packets

PCM = tone(0.5, freq=300) + silence(0.2) + tone(0.3, freq=700)


@pytest.fixture(scope="module")
def ogg() -> bytes:
    return ogg_opus(PCM)


def _decode_all(decoder, pieces) -> np.ndarray:
    out = [decoder.decode(piece) for piece in pieces]
    out.append(decoder.finish())
    return np.concatenate(out)


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, i = [], 0
    while i < len(data):
        n = rng.choice([1, 1, 2, 3, 5, 27, 28, 100, 999, 4096])
        pieces.append(data[i : i + n])
        i += n
    return pieces


def test_linear32_is_32_bit_signed_little_endian():
    samples = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    wire = audio.from_int16(samples, "linear32")
    assert wire == (samples.astype("<i4") << 16).tobytes()
    assert audio.to_int16(wire, "linear32").tolist() == samples.tolist()
    assert audio.to_int16(np.array([2**31 - 1, -(2**31), 65535], dtype="<i4").tobytes(), "linear32").tolist() == [32767, -32768, 0]
    assert audio.sample_width("linear32") == 4 and audio.bytes_per_second("linear32", 16000) == 64000


@pytest.mark.parametrize("encoding", ["mulaw", "alaw", "linear16"])
def test_pcm_decoders_are_the_exact_tables(encoding):
    codes = bytes(range(256)) * 2
    assert decoder_for(encoding, 8000).decode(codes).tolist() == audio.to_int16(codes, encoding).tolist()


def test_sample_aligner_aligns_linear32_and_passes_compressed_bytes_through():
    aligner = audio.SampleAligner(audio.sample_width("linear32"))
    assert aligner.push(b"\x01\x02\x03") == b"" and aligner.pending == 3
    assert aligner.push(b"\x04\x05") == b"\x01\x02\x03\x04" and aligner.pending == 1
    for encoding in ("opus", "ogg-opus"):
        passthrough = audio.SampleAligner(audio.sample_width(encoding))
        assert passthrough.push(b"\x01\x02\x03") == b"\x01\x02\x03" and passthrough.pending == 0


def test_ogg_pages_give_the_packets_pyav_demuxes(ogg):
    seen: list[bytes] = []

    class Recording(OggOpusDecoder):
        def _packet(self, packet: bytes):
            seen.append(packet)
            return super()._packet(packet)

    decoder = Recording()
    pcm = _decode_all(decoder, [ogg])
    with av.open(io.BytesIO(ogg)) as container:
        stream = container.streams.audio[0]
        demuxed = [bytes(p) for p in container.demux(stream) if p.size]
        head = bytes(stream.codec_context.extradata)
    assert seen[0] == head and seen[1].startswith(b"OpusTags") and seen[2:] == demuxed
    assert pcm.size == len(demuxed) * 960 - int.from_bytes(head[10:12], "little")  # pre-skip applied


def test_ogg_opus_split_anywhere_decodes_the_same(ogg):
    whole = _decode_all(decoder_for("ogg-opus", 16000), [ogg])
    rng = random.Random(7)
    for _ in range(20):
        decoder = decoder_for("ogg-opus", 16000)
        assert np.array_equal(_decode_all(decoder, _split(ogg, rng)), whole)
        assert decoder.take_warnings() == []
    one_byte = decoder_for("ogg-opus", 16000)
    assert np.array_equal(_decode_all(one_byte, [ogg[i : i + 1] for i in range(len(ogg))]), whole)


def test_ogg_opus_of_speech_is_close_to_the_original(ogg):
    decoded = _decode_all(decoder_for("ogg-opus", 16000), [ogg])
    original = np.frombuffer(PCM, dtype="<i2").astype(np.float64)
    # 48 kHz out: take every third sample back to 16 kHz and compare the loudness envelope.
    back = decoded[::3][: original.size].astype(np.float64)
    assert abs(np.sqrt(np.mean(back**2)) / np.sqrt(np.mean(original**2)) - 1) < 0.1


def test_raw_opus_packets_decode_at_48khz():
    packets = opus_packets(PCM, frame_ms=20)
    decoder = decoder_for("opus", 16000)
    assert decoder.rate == 48000
    pcm = _decode_all(decoder, [frame_packet(p) for p in packets])
    assert pcm.size == len(packets) * 960 and decoder.take_warnings() == []
    joined = decoder_for("opus", 16000).decode(b"".join(frame_packet(p) for p in packets))
    assert np.array_equal(joined, pcm)  # packets joined in a queue keep their edges


def test_garbage_opus_packets_warn_then_fail():
    decoder = decoder_for("opus", 16000)
    good = frame_packet(opus_packets(tone(0.02))[0])
    bad = frame_packet(b"\xff\xff\xff" + bytes(3000))  # a code-3 packet that cannot be parsed
    for n in range(1, MAX_BAD_PACKETS + 1):
        decoder.decode(bad + good)
        (warning,) = decoder.take_warnings()
        assert f"({n} of {MAX_BAD_PACKETS} allowed)" in warning
    with pytest.raises(InvalidAudio) as caught:
        decoder.decode(bad)
    assert caught.value.code == "INVALID_AUDIO" and caught.value.close_code == 4007


@pytest.mark.parametrize("start", [b"RIFF....WAVEfmt ", b"\x00" * 40, b"Ogg!" + bytes(40)])
def test_garbage_where_an_ogg_stream_must_start_is_fatal(start):
    decoder = decoder_for("ogg-opus", 16000)
    with pytest.raises(InvalidAudio):
        decoder.decode(start)


def _ogg_page(packet: bytes, *, flags: int = 0x02, serial: int = 1) -> bytes:
    """One Ogg page holding one short packet (RFC 3533)."""
    header = b"OggS\x00" + bytes([flags]) + bytes(8) + serial.to_bytes(4, "little") + bytes(8) + bytes([1, len(packet)])
    page = header + packet
    return page[:22] + _ogg_crc(page).to_bytes(4, "little") + page[26:]


def test_ogg_that_does_not_carry_opus_is_fatal():
    vorbis = _ogg_page(b"\x01vorbis" + bytes(22))
    assert decoder_for("ogg-opus", 16000).decode(b"").size == 0
    with pytest.raises(InvalidAudio, match="OpusHead"):
        decoder_for("ogg-opus", 16000).decode(vorbis)
    with pytest.raises(InvalidAudio, match="beginning-of-stream"):
        decoder_for("ogg-opus", 16000).decode(_ogg_page(b"OpusHead", flags=0))


def test_garbage_inside_an_ogg_stream_is_skipped_with_a_warning(ogg):
    whole = _decode_all(decoder_for("ogg-opus", 16000), [ogg])
    cut = ogg.find(b"OggS", ogg.find(b"OggS", ogg.find(b"OggS", 1) + 1) + 1)  # third page: first audio
    decoder = decoder_for("ogg-opus", 16000)
    pcm = _decode_all(decoder, [ogg[:cut], b"garbage" * 30, ogg[cut:]])
    assert np.array_equal(pcm, whole)
    (warning,) = decoder.take_warnings()
    assert "not an Ogg page" in warning
    corrupt = bytearray(ogg)
    corrupt[cut + 40] ^= 0xFF  # a flipped bit inside a page: its CRC fails, the page is dropped
    decoder = decoder_for("ogg-opus", 16000)
    pcm = _decode_all(decoder, [bytes(corrupt)])
    assert len(decoder.take_warnings()) == 1 and 0 < whole.size - pcm.size <= 48000


def test_truncated_ogg_decodes_what_arrived_and_warns(ogg):
    decoder = decoder_for("ogg-opus", 16000)
    pcm = _decode_all(decoder, [ogg[: len(ogg) - 50]])
    assert pcm.size > 0
    (warning,) = decoder.take_warnings()
    assert "ended inside an Ogg page" in warning
    with pytest.raises(InvalidAudio):
        _decode_all(decoder_for("ogg-opus", 16000), [ogg[:20]])  # not even the header


def test_resampler_decodes_compressed_audio_to_16khz(ogg):
    resampler = audio.Resampler("ogg-opus", 16000, 16000)
    out = np.concatenate([resampler.process(ogg), resampler.process(b"", last=True)])
    assert abs(out.size - len(PCM) // 2) < 16000 * 0.05
