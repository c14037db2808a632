"""What a new upstream connection is sent again: the client's audio as whole units on a clock.

Sans-I/O, like :mod:`.flux_client`. A reconnect or a fallback resends the audio the upstream had
not answered for, starting at a time the upstream reported (a turn's start, an EndOfTurn). That
needs two things a byte count cannot give for compressed audio:

* **Time.** Positions are *ticks*: bytes for PCM and G.711 (a second is ``bytes_per_second``
  ticks, and any sample boundary is a place to cut), 48 kHz samples for Opus, whose byte count
  says nothing about time (its bitrate varies): a raw packet's duration comes from its TOC byte
  (RFC 6716 section 3.1), an Ogg unit's from its pages' granule positions (RFC 7845 section 4).
* **Whole units.** Half an Opus packet or Ogg page does not decode, so compressed audio is cut
  only between units: a raw packet (one client frame), or a run of Ogg pages that ends where a
  packet ends (the next page does not continue a packet).

Ogg adds a header: the ``OpusHead`` and ``OpusTags`` pages open every Ogg Opus stream, so every
upstream connection (and a fallback engine) gets them first, then the audio pages renumbered to
follow them (:class:`PageNumbers`): a decoder treats a gap in page sequence numbers as lost
pages. Granule positions stay as the client wrote them; a first audio page whose granule exceeds
its own samples is a stream that starts later than zero, which RFC 7845 section 4.5 allows. Ogg
goes upstream in whole pages on the first connection too, so that every connection gets the same
stream; a page waits until it is complete, which costs no time, as a demuxer yields nothing of a
page before its checksum is in.

Why not decode the replay to PCM and send that: a connection's encoding is fixed in its query,
so everything after a reconnect would have to be transcoded too, on the worker pool, at ten
times the upload. Why not remux with PyAV: its Ogg muxer writes a new stream (serial, granules,
page sizes of its own) from packets with timestamps, so every packet would be demuxed and muxed
again; resending the client's own pages changes four bytes and a CRC per page.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from relay.exceptions import InvalidAudio
from relay.flux.codecs import OPUS_RATE, BadPacketLimit, OggPageReader, ogg_page_info, ogg_page_sequenced, opus_packet_samples

from relay.engines.base import StreamOptions

#: The most a second of Opus weighs (its highest bitrate, 510 kbit/s): bounds the bytes held
#: when granule positions are nonsense.
MAX_OPUS_BYTES_PER_SECOND = 64000
#: No Opus packet comes near this (48 frames of 1275 bytes is 61 KB): a run of pages continuing
#: one packet this long is closed as a unit anyway, so the framer holds a bounded amount.
MAX_UNIT_BYTES = 256 * 1024


class Unit(NamedTuple):
    """What goes upstream as one WebSocket message, and how long it plays in ticks."""

    data: bytes
    ticks: int
    header: bool = False  # an Ogg header page: sent first on every connection, never logged


# --- cutting the client's frames into units -------------------------------------------------------
class Framer(BadPacketLimit):
    """Cuts the client's frames into :class:`Unit` s; PCM and G.711 pass through as they came."""

    #: Ticks per second of audio.
    ticks_per_second: int
    #: Whether a unit may be cut at any multiple of :attr:`width` ticks.
    divisible = True

    def __init__(self, options: StreamOptions) -> None:
        super().__init__()
        self.width = options.sample_width
        self.rate = options.sample_rate
        self.ticks_per_second = options.bytes_per_second
        self.header: list[bytes] = []  # sent before the audio on every connection

    def push(self, data: bytes) -> list[Unit]:
        return [Unit(data, len(data))]

    def ticks(self, seconds: float) -> int:
        """``seconds`` on this clock, rounded to a whole sample."""
        return int(round(seconds * self.rate)) * self.width


class OpusFramer(Framer):
    """``opus``: each client frame is one packet, a unit of its TOC's duration."""

    divisible = False

    def __init__(self, options: StreamOptions) -> None:
        super().__init__(options)
        self.width, self.rate = 1, OPUS_RATE
        self.ticks_per_second = OPUS_RATE

    def push(self, data: bytes) -> list[Unit]:
        # A packet whose TOC makes no sense goes on with no duration: the upstream decodes and
        # judges it, as it would have without the relay.
        return [Unit(data, opus_packet_samples(data))]


class OggOpusFramer(Framer):
    """``ogg-opus``: whole pages of the first logical stream, header pages apart, audio pages in
    units that end where a packet ends, each as long as its granule positions say."""

    divisible = False

    def __init__(self, options: StreamOptions) -> None:
        super().__init__(options)
        self.width, self.rate = 1, OPUS_RATE
        self.ticks_per_second = OPUS_RATE
        self._pages = OggPageReader(lambda: self._bad("Bytes that are not an Ogg page arrived"))
        self._serial: bytes | None = None
        self._in_header = True
        self._pre_skip = 0
        self._time = 0  # the end of the last unit, in 48 kHz samples after pre-skip
        self._unit: list[bytes] = []  # pages of a unit whose last packet goes on
        self._unit_bytes = 0

    def push(self, data: bytes) -> list[Unit]:
        """Units completed by ``data``; raises InvalidAudio when the stream is not Ogg Opus."""
        self._pages.push(data)
        units: list[Unit] = []
        while (page := self._pages.next_page()) is not None:
            flags, serial, granule, lacing = ogg_page_info(page)
            if self._serial is None:
                if not flags & 0x02 or not page[27 + len(lacing) :].startswith(b"OpusHead") or len(page) < 27 + len(lacing) + 19:
                    raise InvalidAudio("The Ogg stream does not begin with an Opus identification header (OpusHead).")
                self._serial = serial
                self._pre_skip = int.from_bytes(page[27 + len(lacing) + 10 : 27 + len(lacing) + 12], "little")
                self._header_page(page, units)
                continue
            if serial != self._serial:
                continue  # another logical stream: the relay's decoders skip it too
            ends_packet = not lacing or lacing[-1] < 255
            if self._in_header:
                self._header_page(page, units)
                self._in_header = not ends_packet  # OpusTags ends its last page (RFC 7845 section 3)
                continue
            self._unit.append(page)
            self._unit_bytes += len(page)
            if ends_packet or self._unit_bytes > MAX_UNIT_BYTES:
                units.append(self._close_unit(granule))
        return units

    def _header_page(self, page: bytes, units: list[Unit]) -> None:
        self.header.append(page)
        units.append(Unit(page, 0, header=True))

    def _close_unit(self, granule: int) -> Unit:
        end = max(self._time, granule - self._pre_skip) if granule >= 0 else self._time
        ticks, self._time = end - self._time, end
        pages, self._unit, self._unit_bytes = self._unit, [], 0
        return Unit(pages[0] if len(pages) == 1 else b"".join(pages), ticks)


def framer_for(options: StreamOptions) -> Framer:
    if options.encoding == "opus":
        return OpusFramer(options)
    if options.encoding == "ogg-opus":
        return OggOpusFramer(options)
    return Framer(options)


class PageNumbers:
    """Renumbers the Ogg pages of one upstream connection (or fallback stream) from 0.

    A resent unit follows the header pages, so its pages need the numbers that come next there;
    on the first connection the client's own numbers already are those, and pages go unchanged.
    """

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, data: bytes) -> bytes:
        out, pos = [], 0
        while pos < len(data):  # a unit may hold several pages
            size = 27 + data[pos + 26] + sum(data[pos + 27 : pos + 27 + data[pos + 26]])
            out.append(ogg_page_sequenced(data[pos : pos + size], self.next))
            self.next += 1
            pos += size
        return out[0] if len(out) == 1 else b"".join(out)


def page_numbers_for(options: StreamOptions) -> PageNumbers | None:
    return PageNumbers() if options.encoding == "ogg-opus" else None


# --- the replay buffer ----------------------------------------------------------------------------
class AudioLog:
    """Audio the upstream has not answered for: the client's units at absolute tick positions.

    ``commit(pos)`` says audio before ``pos`` needs no resend (a turn ended there, or it is old
    silence); a unit that straddles ``pos`` stays whole unless the framer allows cuts. The log
    never holds more than ``max_ticks`` (nor ``max_bytes``); past that the oldest audio goes, and
    :attr:`lost` says how much of it had not been answered for.
    """

    def __init__(self, *, max_ticks: int, width: int = 1, divisible: bool = True, max_bytes: int | None = None) -> None:
        self.max_ticks = max(max_ticks, width)
        self.max_bytes = max_bytes
        self.width = width
        self.divisible = divisible
        self.base = 0  # absolute position of the first tick held
        self.fed = 0  # absolute position after the last tick held
        self.answered = 0  # highest position committed
        self._units: deque[Unit] = deque()
        self._bytes = 0

    def append(self, unit: Unit) -> None:
        self._units.append(unit)
        self.fed += unit.ticks
        self._bytes += len(unit.data)
        while len(self._units) > 1 and (
            self.fed - self.base > self.max_ticks or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            self._drop()

    def commit(self, pos: int) -> None:
        pos = min(pos - pos % self.width, self.fed)
        self.answered = max(self.answered, pos)
        while self._units and self.base + self._units[0].ticks <= pos and (self._units[0].ticks or self.base < pos):
            self._drop()
        if self.divisible and self._units and self.base < pos:
            first, cut = self._units[0], pos - self.base
            self._units[0] = Unit(first.data[cut:], first.ticks - cut)
            self._bytes -= cut
            self.base = pos

    def _drop(self) -> None:
        unit = self._units.popleft()
        self.base += unit.ticks
        self._bytes -= len(unit.data)

    def clear(self) -> None:
        self._units.clear()
        self._bytes = 0
        self.base = self.answered = self.fed

    def units(self) -> list[Unit]:
        return list(self._units)

    @property
    def size(self) -> int:
        """Ticks held."""
        return self.fed - self.base

    @property
    def lost(self) -> int:
        """Ticks dropped for space before they were answered for."""
        return max(0, self.base - self.answered)
