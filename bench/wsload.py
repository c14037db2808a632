"""The load client: many real-time WebSocket streams from one process, cheap enough not to be
the bottleneck (it reports its own CPU so the report can show that).

It speaks just enough RFC 6455 over plain asyncio Protocols: every frame it sends is built once
(masked with a fixed key, which a server must accept) and written as bytes; server frames are
parsed with a small loop. Streams are paced by one timer per process in 5 ms slots, not one
timer per stream.

Run by bench.run as ``python -m bench.wsload '<json config>'``; talks JSON lines on stdout and
takes ``go`` on stdin (so the orchestrator can read server memory while every stream is
connected and idle, then CPU across the measurement window). Modes:

* ``stream``: ``sessions`` speakers, each with ``listeners`` extra tabs in the same session
  (on another server process when there are several), tone audio in ``frame_ms`` frames at
  real time and a ``ForceEndTurn`` every ``turn_s``. With ``ramp`` the speakers connect after
  ``go``, each streaming as soon as it is connected, so later ones arrive at a loaded server
  (what admission control is for);
* ``burst``: ``count`` connections spread evenly over ``burst_s`` seconds, each held until all
  are answered (handshake + session rows, i.e. time to ``Connected``);
* ``replay``: reconnect ``repeat`` times, one after another, to a session with a long history.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import json
import math
import os
import random
import resource
import ssl
import sys
import time
from typing import Any

import numpy as np

RATE = 16000
MASK = b"\x11\x22\x33\x44"
_MASK4 = np.frombuffer(MASK, dtype=np.uint8)
SLOT = 0.005
RING = 512
now = time.perf_counter


def client_frame(payload: bytes, opcode: int) -> bytes:
    """A complete masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    data = np.frombuffer(payload, dtype=np.uint8)
    mask = np.resize(_MASK4, n)
    return head + MASK + (data ^ mask).tobytes()


def tone(seconds: float, freq: float = 440.0, amplitude: int = 8000) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * freq * t) * amplitude).astype("<i2").tobytes()


def handshake_request(host: str, port: int, path: str, *, deflate: bool = False, origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "User-Agent: relay-bench",
    ]
    if deflate:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def summary(values: list[float]) -> dict[str, Any]:
    """Percentiles in milliseconds (values are seconds)."""
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2), "max": round(float(a.max()), 2)}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Run:
    """Counters and samples shared by the connections of one client process."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.errors: dict[str, int] = {}
        self.refused = 0
        self.measuring = False
        self.streaming = False
        self.fet_rtt: list[float] = []
        self.upd: list[float] = []
        self.lst_upd: list[float] = []
        self.handshake: list[float] = []
        self.first_replay: list[float] = []
        self.last_replay: list[float] = []
        self.dropped = 0  # Updates missing from a speaker's finished turn
        self.turns_checked = 0
        self.frames_sent = 0
        self.frames_skipped = 0
        self.frames_due = 0
        self.frames_window = 0
        self.messages = 0
        self.lost_mid_stream = 0
        self.first_headers = ""

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Conn(asyncio.Protocol):
    """One WebSocket connection (a speaker tab or a listening tab)."""

    def __init__(self, run: Run, request: bytes, *, speaker: "Conn | None" = None) -> None:
        self.run = run
        self.request = request
        self.speaker = speaker  # set on listening tabs
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.counted = False  # this connection's failure is already in run.errors (counted once)
        self.status = b""
        self.headers = b""
        self.started = now()
        self.connected: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.session_id = ""
        self.close_code: int | None = None
        self.error_code = ""
        self.frame_no = 0
        self.ring = [0.0] * RING
        self.fet_times: collections.deque[float] = collections.deque()
        self.eot_times: dict[int, tuple[float, float]] = {}  # speaker: turn -> (ForceEndTurn sent, EndOfTurn received)
        self.eots: list[tuple[int, float]] = []  # listener: (turn, EndOfTurn received)
        self.window_eots: set[int] = set()  # speaker: turns whose EndOfTurn arrived while measuring
        self.updates: dict[int, int] = {}
        self.replayed = 0
        self.replay_expected = 0
        self.replay_done: asyncio.Future | None = None
        self.bye = False
        self.ended = False
        self.turn_log: list[int] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        established = self.connected.done()  # counted as lost mid-stream only if it was ever Connected
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"lost before Connected (status {self.status.decode(errors='replace')!r}, close {self.close_code})"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        if self.replay_done is not None and not self.replay_done.done():
            self.replay_done.set_result(None)
        if established and self.run.streaming and not self.bye and self.close_code is None:
            self.run.lost_mid_stream += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            self.status = head.split(b"\r\n", 1)[0]
            self.headers = head
            if not self.run.first_headers:
                self.run.first_headers = head.decode(errors="replace")
            if b" 101 " not in self.status + b" ":
                self.run.error("http_" + self.status.decode(errors="replace")[9:12])
                self.counted = True
                self.transport.close()
                return
            self.upgraded = True
        self._frames()

    # -- frames -------------------------------------------------------------------------------------
    def _frames(self) -> None:
        buf = self.buf
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            ln, hdr = b1 & 0x7F, 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < hdr + ln:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + ln])
            pos += hdr + ln
            op = b0 & 0x0F
            if op == 1:
                self._text(payload)
            elif op == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.bye:
                    self.transport.write(client_frame(payload[:2], 8))
                self.transport.close()
            elif op == 9:
                self.transport.write(client_frame(payload, 10))
        if pos:
            del buf[:pos]

    def _text(self, payload: bytes) -> None:
        t = now()
        run = self.run
        run.messages += 1
        msg = json.loads(payload)
        kind = msg["type"]
        if kind == "TurnInfo":
            event = msg["event"]
            idx = msg["turn_index"]
            if self.turn_log is not None and event == "EndOfTurn" and (self.speaker is None):
                self.turn_log.append(idx)
            if msg.get("replayed"):
                self.replayed += 1
                if self.replayed == 1:
                    run.first_replay.append(t - self.started)
                if self.replayed == self.replay_expected and self.replay_done is not None and not self.replay_done.done():
                    run.last_replay.append(t - self.started)
                    self.replay_done.set_result(None)
                return
            if event == "Update":
                self.updates[idx] = self.updates.get(idx, 0) + 1
                src = self.speaker or self
                frame = math.ceil(round(msg["audio_window_end"] * RATE) / run.cfg["frame_samples"]) - 1
                if run.measuring and 0 <= src.frame_no - frame <= RING:
                    (run.lst_upd if self.speaker else run.upd).append(t - src.ring[frame % RING])
            elif event == "EndOfTurn":
                if self.speaker is not None:
                    # listeners get interim Updates coalesced (each carries the turn so far), so
                    # fewer Updates than words is not a loss for them; a missing EndOfTurn is
                    self.eots.append((idx, t))
                    self.updates.pop(idx, None)
                    return
                if run.streaming:
                    run.turns_checked += 1
                    run.dropped += max(0, len(msg["words"]) - self.updates.pop(idx, 0))
                if run.measuring:
                    self.window_eots.add(idx)
                if msg.get("trigger") == "manual" and self.fet_times:
                    sent = self.fet_times.popleft()
                    self.eot_times[idx] = (sent, t)
                    if run.measuring:
                        run.fet_rtt.append(t - sent)
        elif kind == "Connected":
            self.session_id = msg.get("session_id", "")
            run.handshake.append(t - self.started)
            if not self.connected.done():
                self.connected.set_result(self)
        elif kind == "Error":
            self.error_code = msg.get("code", "")
            if self.error_code == "CAPACITY":
                run.refused += 1
            else:
                run.error("error_" + self.error_code)
                self.counted = True
            if not self.connected.done():
                self.connected.set_exception(ConnectionRefusedError(self.error_code))

    # -- sending ------------------------------------------------------------------------------------
    def send_frame(self, frame: bytes, t: float) -> None:
        tr = self.transport
        if self.ended or tr is None or tr.is_closing():
            return
        self.run.frames_due += 1
        if tr.get_write_buffer_size() > 65536:  # the server is not reading: do not queue more
            self.run.frames_skipped += 1
            return
        tr.write(frame)
        self.ring[self.frame_no % RING] = t
        self.frame_no += 1
        self.run.frames_sent += 1
        if self.run.measuring:
            self.run.frames_window += 1

    def send_fet(self, frame: bytes, t: float) -> None:
        if self.ended or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(frame)
        self.fet_times.append(t)

    def goodbye(self) -> None:
        self.bye = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame((1000).to_bytes(2, "big"), 8))


# -- modes --------------------------------------------------------------------------------------
_tls: dict[str, ssl.SSLContext] = {}


def tls_context(cafile: str | None) -> ssl.SSLContext | None:
    """TLS to a server whose certificate ``cafile`` holds (nginx in front of the relay); None: plain TCP."""
    if not cafile:
        return None
    if cafile not in _tls:
        _tls[cafile] = ssl.create_default_context(cafile=cafile)
    return _tls[cafile]


async def open_conn(run: Run, host: str, port: int, path: str, *, speaker: Conn | None = None, timeout: float = 30.0,
                    deflate: bool = False, turn_log: list[int] | None = None) -> Conn:
    loop = asyncio.get_running_loop()
    conn = Conn(run, handshake_request(host, port, path, deflate=deflate, origin=run.cfg.get("origin")), speaker=speaker)
    conn.turn_log = turn_log  # set before connecting: replayed turns may share a read with Connected
    try:
        await asyncio.wait_for(loop.create_connection(lambda: conn, host, port, ssl=tls_context(run.cfg.get("tls_cafile"))), timeout)
        await asyncio.wait_for(asyncio.shield(conn.connected), timeout)
    except ConnectionRefusedError as exc:
        if str(exc) != "CAPACITY" and not conn.counted:
            run.error("refused_tcp" if not conn.upgraded else "refused")
        raise
    except asyncio.TimeoutError:
        run.error("timeout")
        if conn.transport is not None:
            conn.transport.abort()
        raise
    except OSError as exc:
        if not conn.counted:  # an HTTP answer other than 101 was counted when it came
            run.error(type(exc).__name__)
        raise
    return conn


async def paced(items: list[Any], rate: float, concurrency: int, fn) -> list[Any]:
    """Start ``fn(item)`` at ``rate`` per second, at most ``concurrency`` pending; results or None."""
    sem = asyncio.Semaphore(concurrency)
    start = now()
    results: list[Any] = [None] * len(items)

    async def one(i: int, item: Any) -> None:
        try:
            results[i] = await fn(item)
        except Exception:
            results[i] = None
        finally:
            sem.release()

    tasks = []
    for i, item in enumerate(items):
        due = start + i / rate
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        await sem.acquire()
        tasks.append(asyncio.create_task(one(i, item)))
    await asyncio.gather(*tasks)
    return results


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def progress(text: str) -> None:
    sys.stderr.write(f"  [client {os.getpid()}] {text}\n")
    sys.stderr.flush()


async def wait_go() -> None:
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("orchestrator went away")


async def mode_stream(cfg: dict[str, Any]) -> dict[str, Any]:
    run = Run(cfg)
    targets = [tuple(t) for t in cfg["targets"]]
    frame_ms = cfg["frame_ms"]
    fs = RATE * frame_ms // 1000
    cfg["frame_samples"] = fs
    audio = tone(max(1.0, frame_ms / 1000 * 8))
    frames = [client_frame(audio[i : i + fs * 2], 2) for i in range(0, len(audio) - fs * 2 + 1, fs * 2)]
    fet = client_frame(b'{"type":"ForceEndTurn"}', 1)
    path = cfg.get("path", "/v2/listen") + "?" + cfg.get("query", "encoding=linear16&sample_rate=16000")
    offset = cfg.get("target_offset", 0)
    rng = random.Random(cfg.get("seed", 1))

    slots = max(1, round(frame_ms / 1000 / SLOT))
    buckets: list[list[Conn]] = [[] for _ in range(slots)]
    turn_frames = max(2, round(cfg.get("turn_s", 2.0) * 1000 / frame_ms))
    countdown: dict[int, int] = {}
    live: list[Conn] = []

    def start_streaming(s: Conn) -> Conn:
        """Give a speaker its phase inside the frame period and its first turn length."""
        live.append(s)
        buckets[rng.randrange(slots)].append(s)
        countdown[id(s)] = rng.randrange(turn_frames // 2, turn_frames + 1)
        return s

    async def connect_speaker(i: int) -> Conn:
        conn = await open_conn(run, *targets[(offset + i) % len(targets)], path, timeout=cfg.get("connect_timeout_s", 30))
        return start_streaming(conn) if ramp else conn

    def connect_all() -> Any:
        return paced(list(range(cfg["sessions"])), cfg.get("connect_rate", 400), cfg.get("connect_concurrency", 200), connect_speaker)

    ramp = bool(cfg.get("ramp"))
    if not ramp:
        for s in await connect_all():
            if s is not None:
                start_streaming(s)
    listeners: list[Conn] = []
    if cfg.get("listeners") and not ramp:
        speakers = list(live)
        pairs = [(i, s) for i, s in enumerate(speakers) for _ in range(cfg["listeners"])]

        def listen(item):
            i, s = item
            k = (offset + i + 1 + len(listeners)) % len(targets)
            return open_conn(run, *targets[k], f"{path}&session={s.session_id}", speaker=s, timeout=cfg.get("connect_timeout_s", 30))

        listeners = [c for c in await paced(pairs, cfg.get("connect_rate", 400), cfg.get("connect_concurrency", 200), listen) if c is not None]
    if cfg.get("stop_reading"):
        for c in listeners or live:
            c.transport.pause_reading()
    emit({"event": "connected", "speakers": len(live), "listeners": len(listeners), "refused": run.refused, "errors": run.errors})
    if cfg.get("wait_go", True):
        await wait_go()

    # real-time pacing: each speaker has a slot (phase) inside the frame period
    settle, window = cfg.get("settle_s", 2.0), cfg["window_s"]
    run.streaming = True
    connecting = asyncio.create_task(connect_all()) if ramp else None
    start = now()
    cpu0 = wall0 = None
    tick = 0
    nframes = len(frames)
    while True:
        t = now()
        el = t - start
        if cpu0 is None and el >= settle and (connecting is None or connecting.done()):  # a ramp is in before the window
            run.measuring = True
            cpu0, wall0 = cpu_seconds(), t
            emit({"event": "window_start"})
            progress(f"window open: {len(live)} speakers, {len(listeners)} listeners")
        if wall0 is not None and t - wall0 >= window:
            break
        due = start + tick * SLOT
        if due > t:
            await asyncio.sleep(due - t)
            t = now()
        for s in list(buckets[tick % slots]):
            s.send_frame(frames[s.frame_no % nframes], t)
            k = id(s)
            countdown[k] -= 1
            if countdown[k] <= 0:
                s.send_fet(fet, t)
                countdown[k] = turn_frames
        tick += 1
    run.measuring = False
    cpu1, wall1 = cpu_seconds(), now()
    emit({"event": "window_end"})
    if connecting is not None:
        await connecting
    # drain: give the last ForceEndTurns time to come back (and their EndOfTurns time to reach
    # the listening tabs), then count what never did
    deadline = now() + cfg.get("drain_s", 3.0)
    while now() < deadline and (any(s.fet_times for s in live) or listener_missing(listeners)):
        await asyncio.sleep(0.05)
    missing_eot = sum(len(s.fet_times) for s in live)
    lst_missing = listener_missing(listeners)
    run.streaming = False
    fan, lst_eot = [], []
    for c in listeners:
        for idx, t in c.eots:
            got = c.speaker.eot_times.get(idx)
            if got is not None:
                lst_eot.append(t - got[0])
                fan.append(t - got[1])
    for c in live + listeners:
        c.goodbye()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in live + listeners)), 10)
    except asyncio.TimeoutError:
        for c in live + listeners:
            if c.transport is not None:
                c.transport.abort()
    cpu = cpu1 - cpu0 if cpu0 is not None else 0.0
    wall = wall1 - wall0 if wall0 is not None else 1.0
    expected_rate = len(live) * 1000 / frame_ms
    return {
        "speakers": len(live),
        "listeners": len(listeners),
        "refused": run.refused,
        "errors": run.errors,
        "lost_mid_stream": run.lost_mid_stream,
        "missing_eot": missing_eot,
        "dropped_updates": run.dropped,
        "listener_missing_eot": lst_missing,
        "turns_checked": run.turns_checked,
        "frames_sent": run.frames_sent,
        "frames_skipped": run.frames_skipped,
        "frames_due": run.frames_due,
        "frames_window": run.frames_window,
        "expected_fps": expected_rate,
        "window_s": wall,
        "client_cpu_s": cpu,
        "client_cores": cpu / wall if wall else 0.0,
        "handshake": summary(run.handshake),
        "samples": {
            "fet_rtt": run.fet_rtt,
            "upd": run.upd,
            "lst_upd": run.lst_upd,
            "lst_eot": lst_eot,
            "fan": fan,
        },
    }


def listener_missing(listeners: list[Conn]) -> int:
    """EndOfTurns a speaker got during the measured window that its listening tab never got."""
    missing = 0
    for c in listeners:
        got = {idx for idx, _ in c.eots}
        missing += len(c.speaker.window_eots - got)
    return missing


async def mode_burst(cfg: dict[str, Any]) -> dict[str, Any]:
    run = Run(cfg)
    targets = [tuple(t) for t in cfg["targets"]]
    path = cfg.get("path", "/v2/listen") + "?" + cfg.get("query", "encoding=linear16&sample_rate=16000")
    count = cfg["count"]
    if cfg.get("wait_go", False):
        await wait_go()
    t0 = now()
    conns = await paced(
        list(range(count)), count / cfg.get("burst_s", 1.0), cfg.get("connect_concurrency", count),
        lambda i: open_conn(run, *targets[i % len(targets)], path, timeout=cfg.get("timeout_s", 30.0), deflate=cfg.get("deflate", False)),
    )
    t1 = now()
    ok = [c for c in conns if c is not None]
    headers = run.first_headers
    for c in ok:
        c.goodbye()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in ok)), 15)
    except asyncio.TimeoutError:
        pass
    return {
        "count": count,
        "ok": len(ok),
        "refused": run.refused,
        "errors": run.errors,
        "span_s": t1 - t0,
        "rate": len(ok) / (t1 - t0) if t1 > t0 else 0.0,
        "handshake": summary(run.handshake),
        "first_response_headers": headers,
    }


async def mode_replay(cfg: dict[str, Any]) -> dict[str, Any]:
    run = Run(cfg)
    host, port = cfg["targets"][0]
    base = cfg.get("path", "/v2/listen") + "?" + cfg.get("query", "encoding=linear16&sample_rate=16000")
    for i in range(cfg["repeat"]):
        since = cfg.get("since")
        path = f"{base}&session={cfg['session']}" + (f"&since={since}" if since is not None else "")
        conn = Conn(run, handshake_request(host, port, path))
        conn.replay_expected = cfg["expected"]
        conn.replay_done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), 10)
            await asyncio.wait_for(conn.replay_done, 30)
        except (asyncio.TimeoutError, OSError) as exc:
            run.error(type(exc).__name__)
        if conn.replayed != conn.replay_expected:
            run.error("replay_count")
        conn.goodbye()
        try:
            await asyncio.wait_for(asyncio.shield(conn.closed), 10)
        except asyncio.TimeoutError:
            conn.transport.abort()
    return {"repeat": cfg["repeat"], "errors": run.errors, "first": summary(run.first_replay), "last": summary(run.last_replay)}


async def mode_soak(cfg: dict[str, Any]) -> dict[str, Any]:
    """Streams that come and go for ``minutes``: each slot keeps one session alive through a
    chain of connections that end cleanly or are dropped abruptly, then resume with ``since``."""
    run = Run(cfg)
    targets = [tuple(t) for t in cfg["targets"]]
    frame_ms = cfg.get("frame_ms", 80)
    fs = RATE * frame_ms // 1000
    cfg["frame_samples"] = fs
    audio = tone(2.0)
    frames = [client_frame(audio[i : i + fs * 2], 2) for i in range(0, len(audio) - fs * 2 + 1, fs * 2)]
    fet = client_frame(b'{"type":"ForceEndTurn"}', 1)
    base = cfg.get("path", "/v2/listen") + "?" + cfg.get("query", "encoding=linear16&sample_rate=16000")
    end = now() + cfg["minutes"] * 60
    period = frame_ms / 1000
    turn_frames = max(2, round(cfg.get("turn_s", 2.0) / period))
    records: list[dict[str, Any]] = []  # one per connection, as the client saw it
    reconnects: list[float] = []
    turns: dict[int, list[int]] = {}
    sessions: dict[int, str] = {}
    counters = {"connections": 0, "clean": 0, "abrupt": 0, "server_closed": 0, "unexpected_lost": 0, "connect_failed": 0, "live": 0}

    async def slot(i: int) -> None:
        rng = random.Random(cfg.get("seed", 7) * 1000 + i)
        session, since, dropped_at = None, None, None
        seen = turns.setdefault(i, [])
        await asyncio.sleep(rng.uniform(0, min(5.0, cfg["minutes"] * 60 / 4)))
        attempt = 0
        while now() < end - 2:
            path = base if session is None else f"{base}&session={session}" + (f"&since={since}" if since is not None else "")
            host, port = targets[(i + attempt) % len(targets)]
            attempt += 1
            try:
                conn = await open_conn(run, host, port, path, timeout=15, turn_log=seen)
            except Exception:
                counters["connect_failed"] += 1
                await asyncio.sleep(1.0)
                continue
            opened = now()
            if dropped_at is not None:
                reconnects.append(opened - dropped_at)
            counters["connections"] += 1
            counters["live"] += 1
            session = sessions[i] = conn.session_id
            life = min(max(rng.expovariate(1 / cfg.get("mean_life_s", 60.0)), 3.0), cfg.get("max_life_s", 180.0))
            stop = min(opened + life, end - 1)
            countdown = rng.randrange(turn_frames // 2, turn_frames + 1)
            k = 0
            while now() < stop and not conn.ended:
                conn.send_frame(frames[conn.frame_no % len(frames)], now())
                countdown -= 1
                if countdown <= 0:
                    conn.send_fet(fet, now())
                    countdown = turn_frames
                k += 1
                delay = opened + k * period - now()
                if delay > 0:
                    await asyncio.sleep(delay)
            counters["live"] -= 1
            if conn.ended:  # the server closed or the connection broke: not our doing
                counters["server_closed" if conn.close_code else "unexpected_lost"] += 1
                kind = "server"
            elif now() < end - 1 and rng.random() < cfg.get("abrupt_share", 0.3):
                conn.transport.abort()
                counters["abrupt"] += 1
                kind = "abrupt"
            else:
                conn.goodbye()
                try:
                    await asyncio.wait_for(asyncio.shield(conn.closed), 10)
                except asyncio.TimeoutError:
                    conn.transport.abort()
                counters["clean"] += 1
                kind = "clean"
            dropped_at = now()
            records.append({"opened": opened, "ended": dropped_at, "kind": kind, "code": conn.close_code})
            since = max(seen) if seen else None
            await asyncio.sleep(rng.uniform(0.05, 0.5))

    async def ticker() -> None:
        t0 = now()
        while now() < end:
            await asyncio.sleep(min(cfg.get("tick_s", 10.0), max(0.1, end - now())))
            emit({"event": "tick", "t": round(now() - t0, 1), "cpu_s": round(cpu_seconds(), 2), "errors": run.errors,
                  "refused": run.refused, "dropped_updates": run.dropped, **counters})

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(slot(i) for i in range(cfg["streams"])))
    await tick
    # a turn index a session never showed (live or replayed) is a gap; one shown twice, a duplicate
    gaps = dups = 0
    detail = []
    for i, seen in turns.items():
        if seen:
            missing = sorted(set(range(min(seen), max(seen) + 1)) - set(seen))
            gaps += len(missing)
            dups += len(seen) - len(set(seen))
            if missing and len(detail) < 20:
                detail.append({"session": sessions.get(i), "missing": missing[:10]})
    return {"streams": cfg["streams"], "errors": run.errors, "refused": run.refused, "dropped_updates": run.dropped,
            "counters": counters, "records": records, "reconnect": summary(reconnects), "reconnects": reconnects,
            "turn_gaps": gaps, "turn_gap_detail": detail, "turn_duplicates": dups, "turns_seen": sum(len(set(v)) for v in turns.values())}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    mode = {"stream": mode_stream, "burst": mode_burst, "replay": mode_replay, "soak": mode_soak}[cfg["mode"]]
    result = asyncio.run(mode(cfg))
    result["client_pid"] = os.getpid()
    emit({"event": "result", **result})


if __name__ == "__main__":
    main()
