"""Every Flux encoding behind one streaming decoder: bytes in, Int16 mono out, no I/O.

PCM and G.711 decode sample by sample (:func:`relay.flux.audio.to_int16`). Opus goes through
PyAV (FFmpeg's libopus decoder, FFmpeg's own when libopus is missing), never a codec of ours:

- ``opus``: one Opus packet (RFC 6716) per WebSocket binary frame, as WebCodecs'
  ``AudioEncoder`` and RTP payloads carry them. Packet boundaries are the only framing raw Opus
  has, so :func:`frame_packet` keeps them through the relay's queues (a length prefix);
  decoded at 48 kHz, mono.
- ``ogg-opus``: an Ogg Opus stream (RFC 7845), split across frames at any byte. FFmpeg's Ogg
  demuxer cannot be fed this way (once its reader sees the end of the bytes it has, it stops for
  good), so the pages are cut here from a growing buffer (RFC 3533 framing: capture pattern,
  lacing, CRC) and only the packets go to PyAV, with the ``OpusHead`` packet as the codec's
  extradata (pre-skip and output gain are applied by the decoder).

The same Ogg page reader (:class:`OggPageReader`), packet durations from the Opus TOC byte
(:func:`opus_packet_samples`) and page renumbering (:func:`ogg_page_sequenced`) serve the upstream
engines, which pass Opus through without decoding it (relay.engines.upstream.replay).

Malformed compressed audio costs a warning per bad packet (:attr:`Decoder.warnings`, code
``INVALID_AUDIO_PACKET``) and, past :data:`MAX_BAD_PACKETS`, or when an Ogg stream does not start
like one, :class:`~relay.exceptions.InvalidAudio`. Decoders run wherever the engine decodes (its
worker pool); they hold no lock and must be used by one thread at a time.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np

from relay.exceptions import InvalidAudio
from relay.flux.audio import to_int16

INVALID_AUDIO_PACKET = "INVALID_AUDIO_PACKET"
#: Bad packets a stream may send (each answered by a Warning); the next one ends it.
MAX_BAD_PACKETS = 5
OPUS_RATE = 48000
#: Encodings whose unit is a packet, not a byte: one WebSocket frame each.
PACKET_ENCODINGS = frozenset({"opus"})

_LENGTH = struct.Struct("<I")
_OGG_MAGIC = b"OggS"
_OGG_HEADER = 27
_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def frame_packet(frame: bytes) -> bytes:
    """One packet, length-prefixed, so packets joined in a queue can be told apart again."""
    return _LENGTH.pack(len(frame)) + frame


def _ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, no initial value or final XOR).

    zlib computes the reflected CRC with both; reflecting the bytes and the result, and
    cancelling zlib's initial value with the CRC of as many zero bytes, gives Ogg's at C speed.
    """
    crc = zlib.crc32(page.translate(_BIT_REVERSED)) ^ zlib.crc32(bytes(len(page)))
    return int(f"{crc:032b}"[::-1], 2)


def ogg_page_sequenced(page: bytes, sequence: int) -> bytes:
    """``page`` with its page sequence number set to ``sequence`` and its CRC made to match.

    A page resent on a new connection, after that connection's own header pages, must carry the
    next number there: a decoder takes a gap in the numbers for lost pages (RFC 3533).
    """
    number = sequence.to_bytes(4, "little")
    if page[18:22] == number:
        return page
    unsigned = page[:18] + number + b"\0\0\0\0" + page[26:]
    return unsigned[:22] + _ogg_crc(unsigned).to_bytes(4, "little") + unsigned[26:]


#: Opus frame durations in 48 kHz samples by TOC configuration (RFC 6716 section 3.1, Table 2):
#: SILK 10/20/40/60 ms (configs 0-11), Hybrid 10/20 ms (12-15), CELT 2.5/5/10/20 ms (16-31).
_OPUS_FRAME_SAMPLES = (480, 960, 1920, 2880) * 3 + (480, 960) * 2 + (120, 240, 480, 960) * 4


def opus_packet_samples(packet: bytes) -> int:
    """How long an Opus packet plays, in 48 kHz samples, from its TOC byte (RFC 6716 section 3.1).

    0 for what cannot be an Opus packet (empty, a code 3 packet without its frame count, more
    than 120 ms). Reads the header only; decoding is libopus's business.
    """
    if not packet:
        return 0
    toc = packet[0]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    elif len(packet) < 2:
        return 0
    else:
        frames = packet[1] & 0x3F
    samples = frames * _OPUS_FRAME_SAMPLES[toc >> 3]
    return samples if samples <= 5760 else 0


class BadPacketLimit:
    """A warning for each malformed packet, :class:`~relay.exceptions.InvalidAudio` past the limit."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.bad_packets = 0

    def take_warnings(self) -> list[str]:
        if not self.warnings:  # the usual case, once per frame: nothing to allocate
            return self.warnings
        warnings, self.warnings = self.warnings, []
        return warnings

    def _bad(self, what: str) -> None:
        self.bad_packets += 1
        if self.bad_packets > MAX_BAD_PACKETS:
            raise InvalidAudio(f"{what}; more than {MAX_BAD_PACKETS} bad audio packets, so the stream ends.")
        self.warnings.append(f"{what}; it was skipped ({self.bad_packets} of {MAX_BAD_PACKETS} allowed).")


class Decoder(BadPacketLimit):
    """Streaming decoder of one encoding: :meth:`decode` what arrived, :meth:`finish` at the end."""

    rate: int

    def decode(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def finish(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int16)


class OggPageReader:
    """Whole, CRC-checked Ogg pages (RFC 3533) cut from bytes that arrive in any pieces.

    FFmpeg's Ogg demuxer cannot be fed a growing buffer, hence this. Garbage before the first
    page is :class:`~relay.exceptions.InvalidAudio` (the stream is not Ogg); garbage later is
    skipped up to the next page, and ``lost_sync`` is called once per run of it.
    """

    def __init__(self, lost_sync: Callable[[], None]) -> None:
        self._buffer = bytearray()
        self._lost_sync = lost_sync
        self._resyncing = False
        self.started = False  # a page came out

    def push(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes held: the start of a page not whole yet."""
        return len(self._buffer)

    def clear(self) -> None:
        self._buffer.clear()

    def next_page(self) -> bytes | None:
        buffer = self._buffer
        while True:
            if not buffer.startswith(_OGG_MAGIC[: len(buffer)]) or (len(buffer) >= 5 and buffer[4] != 0):
                self._skip()
                continue
            if len(buffer) < _OGG_HEADER or len(buffer) < _OGG_HEADER + buffer[26]:
                return None
            segments = buffer[26]
            size = _OGG_HEADER + segments + sum(buffer[_OGG_HEADER : _OGG_HEADER + segments])
            if len(buffer) < size:
                return None
            page = bytes(buffer[:size])
            if _ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != _LENGTH.unpack_from(page, 22)[0]:
                self._skip()
                continue
            del buffer[:size]
            self._resyncing = False
            self.started = True
            return page

    def _skip(self) -> None:
        """Garbage where a page should begin: fatal at the start, else skip to the next page."""
        if not self.started:
            raise InvalidAudio("The audio is not an Ogg stream (encoding=ogg-opus expects Ogg Opus pages).")
        if not self._resyncing:
            self._resyncing = True
            self._lost_sync()
        found = self._buffer.find(_OGG_MAGIC, 1)
        if found < 0:  # keep a tail that may begin the next capture pattern
            found = len(self._buffer) - next((k for k in (3, 2, 1) if self._buffer.endswith(_OGG_MAGIC[:k])), 0)
        del self._buffer[: max(found, 1)]


def ogg_page_info(page: bytes) -> tuple[int, bytes, int, bytes]:
    """A whole page's (flags, serial number, granule position, lacing values)."""
    return page[5], page[14:18], int.from_bytes(page[6:14], "little", signed=True), page[_OGG_HEADER : _OGG_HEADER + page[26]]


class PcmDecoder(Decoder):
    """linear16, linear32, mulaw, alaw: whole samples in (SampleAligner saw to that)."""

    def __init__(self, encoding: str, rate: int) -> None:
        super().__init__()
        self.encoding = encoding
        self.rate = rate

    def decode(self, data: bytes) -> np.ndarray:
        return to_int16(data, self.encoding)


class _Opus:
    """PyAV's Opus decoder for one stream, downmixing to mono Int16."""

    def __init__(self, head: bytes | None = None) -> None:
        import av

        codecs = av.codecs_available
        self._av = av
        self.ctx = av.CodecContext.create("libopus" if "libopus" in codecs else "opus", "r")
        self.ctx.sample_rate = OPUS_RATE
        if head is not None:
            self.ctx.extradata = head  # channels, pre-skip, gain, channel mapping
            self.ctx.layout = "stereo" if head[9] == 2 else "mono"
        else:
            self.ctx.layout = "mono"  # libopus folds stereo packets down itself

    def packet(self, data: bytes) -> np.ndarray | None:
        """The packet's samples, or None when the decoder refused it."""
        try:
            frames = self.ctx.decode(self._av.Packet(data))
        except (self._av.FFmpegError, ValueError):
            return None
        parts = [self._mono(frame) for frame in frames]
        if not parts:
            return np.zeros(0, dtype=np.int16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @staticmethod
    def _mono(frame) -> np.ndarray:
        samples = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if frame.format.is_planar:
            samples = samples.mean(axis=0) if channels > 1 else samples[0]
        else:
            samples = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples.reshape(-1)
        if samples.dtype.kind == "f":
            return np.clip(np.rint(samples * 32767.0), -32768, 32767).astype(np.int16)
        return samples.astype(np.int16, copy=False)


class OpusDecoder(Decoder):
    """``opus``: length-prefixed packets (:func:`frame_packet`), one per client frame."""

    rate = OPUS_RATE

    def __init__(self) -> None:
        super().__init__()
        self._opus: _Opus | None = None

    def decode(self, data: bytes) -> np.ndarray:
        if self._opus is None:
            self._opus = _Opus()
        out: list[np.ndarray] = []
        view, pos = memoryview(data), 0
        while pos + _LENGTH.size <= len(view):
            (size,) = _LENGTH.unpack_from(view, pos)
            packet = bytes(view[pos + _LENGTH.size : pos + _LENGTH.size + size])
            pos += _LENGTH.size + size
            samples = self._opus.packet(packet)
            if samples is None:
                self._bad(f"A {size}-byte frame is not an Opus packet")
            elif samples.size:
                out.append(samples)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)


class OggOpusDecoder(Decoder):
    """``ogg-opus``: Ogg pages reassembled from a growing buffer, their Opus packets decoded."""

    rate = OPUS_RATE

    def __init__(self) -> None:
        super().__init__()
        self._pages = OggPageReader(self._lost_sync)
        self._serial: bytes | None = None  # the first Opus stream's; other logical streams are skipped
        self._opus: _Opus | None = None
        self._tags_seen = False
        self._partial = bytearray()  # a packet continued on the next page

    def decode(self, data: bytes) -> np.ndarray:
        self._pages.push(data)
        out: list[np.ndarray] = []
        while (page := self._pages.next_page()) is not None:
            for packet in self._packets(page):
                samples = self._packet(packet)
                if samples is not None and samples.size:
                    out.append(samples)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)

    def finish(self) -> np.ndarray:
        if self._serial is None and self._pages.pending:
            raise InvalidAudio("The audio ended before a whole Ogg Opus header arrived.")
        dropped = self._pages.pending + len(self._partial)
        if dropped:
            self.warnings.append(f"The audio ended inside an Ogg page; its last {dropped} bytes were dropped.")
        self._pages.clear()
        self._partial.clear()
        return np.zeros(0, dtype=np.int16)

    # -- pages ----------------------------------------------------------------------------------
    def _lost_sync(self) -> None:
        self._partial.clear()
        self._bad("Bytes that are not an Ogg page arrived")

    def _packets(self, page: bytes) -> list[bytes]:
        flags, serial = page[5], page[14:18]
        if self._serial is None:
            if not flags & 0x02:
                raise InvalidAudio("The Ogg stream does not begin with a beginning-of-stream page.")
            self._serial = serial
        elif serial != self._serial:
            return []
        segments = page[26]
        lacing = page[_OGG_HEADER : _OGG_HEADER + segments]
        body = memoryview(page)[_OGG_HEADER + segments :]
        packets: list[bytes] = []
        continued = bool(flags & 0x01)
        if not continued and self._partial:
            self._partial.clear()
            self._bad("An Ogg packet was cut off by the next page")
        skipping = continued and not self._partial and self._opus is not None and self._tags_seen
        pos = 0
        for value in lacing:
            if not skipping:
                self._partial += body[pos : pos + value]
            pos += value
            if value < 255:
                if not skipping:
                    packets.append(bytes(self._partial))
                self._partial.clear()
                skipping = False
        return packets

    # -- packets --------------------------------------------------------------------------------
    def _packet(self, packet: bytes) -> np.ndarray | None:
        if self._opus is None:
            if not packet.startswith(b"OpusHead") or len(packet) < 19 or packet[9] not in (1, 2):
                raise InvalidAudio("The Ogg stream does not carry mono or stereo Opus (no OpusHead header).")
            self._opus = _Opus(packet)
            return None
        if not self._tags_seen:
            self._tags_seen = True
            if packet.startswith(b"OpusTags"):
                return None
        samples = self._opus.packet(packet)
        if samples is None:
            self._bad(f"A {len(packet)}-byte Ogg packet is not an Opus packet")
        return samples


def decoder_for(encoding: str, sample_rate: int) -> Decoder:
    """A fresh streaming decoder; its output rate is :attr:`Decoder.rate` (48 kHz for Opus)."""
    if encoding == "opus":
        return OpusDecoder()
    if encoding == "ogg-opus":
        return OggOpusDecoder()
    return PcmDecoder(encoding, sample_rate)
