"""Fault tests on the real deployment: nginx (deploy/nginx/relay.conf) in front of two daphne
processes (deploy/systemd/relay@.service, deploy/relay.env.example), a private Redis and a
private PostgreSQL cluster, all on loopback. Things are broken on purpose: a daphne process is
killed with SIGKILL mid-turn, Redis and PostgreSQL are restarted, the engine crashes, a client
stops reading. docs/guarantees.md states what each test proves.

Every wait is on an event (a message, a log line, a port answering), bounded by a timeout that
only turns a hang into a failure. A missing nginx, redis-server, initdb or openssl is a failure
with the install hint, never a skip.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import websockets

from tests.support.audio import silence, tone
from tests.support.deploy_stack import (
    PROCFILE,
    ROOT,
    Daphne,
    Nginx,
    Postgres,
    Redis,
    daphne_argv,
    migrate,
    read_env_file,
    relay_env,
    render_nginx_site,
    unit_exec_start,
)
from tests.support.resuming_client import ResumingClient

WORDS = "one two three four five six seven eight".split()


def words(n: int) -> str:
    return " ".join(WORDS[:n])


def turn(n_words: int) -> bytes:
    """Speech the fake engine transcribes as the first ``n_words`` number words, then the 500 ms
    of silence that ends the turn (plus 200 ms more)."""
    return tone(0.25 * n_words) + silence(0.7)


# --- the stack ---------------------------------------------------------------------------------
class Stack:
    """nginx + N daphne + Redis + a fresh database on the module's PostgreSQL cluster."""

    def __init__(self, pg: Postgres, workdir: Path, *, processes: int = 2, env: dict[str, str] | None = None,
                 daphne_args: list[str] | None = None) -> None:
        self.pg = pg
        self.workdir = workdir
        self.db_name = "relay_fault_" + uuid.uuid4().hex[:8]
        self.redis = Redis(workdir=workdir)
        self.daphnes: list[Daphne] = []
        self.nginx: Nginx | None = None
        self._processes = processes
        self._env = env or {}
        self._daphne_args = daphne_args

    def start(self) -> "Stack":
        with psycopg.connect(self.pg.url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.db_name}"')
        self.redis.start()
        # A short heartbeat so the connections of a killed process stop counting within seconds.
        self.env = relay_env(
            database_url=self.pg.db_url(self.db_name), redis_url=self.redis.url,
            RELAY_HEARTBEAT_SECONDS="1", **self._env,
        )
        migrate(self.env)
        for i in range(self._processes):
            self.daphnes.append(Daphne(self.env, name=f"daphne{i + 1}", extra_args=self._daphne_args, workdir=self.workdir).start())
        self.nginx = Nginx([d.upstream for d in self.daphnes], workdir=self.workdir).start()
        return self

    def close(self) -> None:
        for closer in [self.nginx, *self.daphnes, self.redis]:
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        with contextlib.suppress(Exception), psycopg.connect(self.pg.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def logs(self) -> str:
        parts = [f"--- {d.name} (pid {d.proc.pid if d.proc else '-'}) ---\n{d.output()[-5000:]}" for d in self.daphnes]
        if self.nginx is not None:
            parts.append(f"--- nginx ---\n{self.nginx.output()}")
        return "\n".join(parts)

    # -- the database, read directly (what an operator would see) ------------------------------
    def query(self, sql: str, *args) -> list[tuple]:
        with psycopg.connect(self.pg.db_url(self.db_name), autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    def turns(self, session: str) -> list[tuple[int, str, str]]:
        return [tuple(r) for r in self.query(
            "SELECT index, transcript, trigger FROM relay_turn WHERE session_id = %s ORDER BY index", session
        )]

    def transcripts(self, session: str) -> list[str]:
        return [t for _, t, _ in self.turns(session)]

    def daphne_of(self, connection_id: str) -> Daphne:
        rows = self.query(
            "SELECT p.pid FROM relay_connection c JOIN relay_relayprocess p ON p.id = c.process_id WHERE c.id = %s",
            connection_id,
        )
        assert rows, f"connection {connection_id} has no process row"
        for d in self.daphnes:
            if d.proc is not None and d.proc.pid == rows[0][0]:
                return d
        raise AssertionError(f"connection {connection_id} is on pid {rows[0][0]}, not one of ours")

    async def client_on(self, target: Daphne, session: str, *, resend: bool = True) -> ResumingClient:
        """A client connected through nginx that landed on ``target`` (round robin decides; retry)."""
        assert self.nginx is not None
        for _ in range(10):
            client = await ResumingClient(self.nginx.ws_url, session, ssl=self.nginx.ssl, resend=resend).start()
            if await asyncio.to_thread(self.daphne_of, client.connection_id) is target:
                return client
            await client.close()
        raise AssertionError(f"nginx never routed a connection to {target.name}")


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    cluster = Postgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def running(pg: Postgres, tmp_path: Path, **kwargs) -> Iterator[Stack]:
    stack = Stack(pg, tmp_path, **kwargs)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.close()


def run(coro, timeout: float = 180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- the deployment files themselves (fast) ----------------------------------------------------
def test_deploy_files_render_and_nginx_accepts_the_site(tmp_path):
    env = read_env_file()
    argv = daphne_argv(8001, env)
    assert argv[-1] == "transcription_site.asgi:application"
    assert "tcp:port=8001:interface=127.0.0.1:backlog=1024" in argv
    for flag in ("--proxy-headers", "--application-close-timeout", "--websocket-max-message-size", "--ping-interval"):
        assert flag in argv, f"DAPHNE_FLAGS in deploy/relay.env.example lacks {flag}"
    # daphne must not kill a disconnected client's flush before the relay's own limit ends it.
    from django.conf import settings
    makefile = re.search(r"--application-close-timeout (\d+)", (ROOT / "Makefile").read_text())
    for close_timeout in (argv[argv.index("--application-close-timeout") + 1], makefile and makefile.group(1)):
        assert close_timeout and float(close_timeout) > settings.RELAY_FLUSH_LIMIT_SECONDS
    # nginx must wait longer than daphne's ping interval, or it cuts idle streams.
    ping = int(argv[argv.index("--ping-interval") + 1])
    site = render_nginx_site(upstreams=["127.0.0.1:1", "127.0.0.1:2"], http_port=1080, https_port=1443,
                             cert=tmp_path / "c.pem", key=tmp_path / "k.pem", log_dir=tmp_path)
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        values = re.findall(rf"{directive} (\d+)s;", site)
        assert values and all(int(v) > ping for v in values), f"{directive} must exceed daphne's --ping-interval {ping}"
    directives = "\n".join(line.split("#")[0] for line in site.splitlines())
    assert "ip_hash" not in directives and "sticky" not in directives and "hash " not in directives
    # The Procfile runs the same command as the systemd unit, one port per line.
    unit = unit_exec_start().split("daphne", 1)[1]
    lines = [line for line in PROCFILE.read_text().splitlines() if line and not line.startswith(("#", "worker:"))]
    ports = set()
    for line in lines:
        name, _, command = line.partition(": ")
        port = name.removeprefix("relay")
        ports.add(port)
        assert command.split("daphne", 1)[1] == unit.replace("%i", port), f"Procfile line {name} differs from relay@.service"
    assert len(ports) == len(lines) >= 2
    # And nginx itself accepts the rendered site.
    Nginx(["127.0.0.1:1", "127.0.0.1:2"], workdir=tmp_path).check_config()


# --- kill -9 of a daphne process mid-turn -------------------------------------------------------
async def kill_scenario(s: Stack) -> None:
    doomed, survivor = s.daphnes
    tag = uuid.uuid4().hex[:6]
    # Three clients on the process that will die (two re-send their unacknowledged audio, one is
    # a plain client that does not), two on the survivor, and a listening tab on the survivor in
    # the session of a dying client.
    lost = [await s.client_on(doomed, f"lost{i}-{tag}") for i in range(2)]
    plain = await s.client_on(doomed, f"plain-{tag}", resend=False)
    kept = [await s.client_on(survivor, f"kept{i}-{tag}") for i in range(2)]
    watcher = await s.client_on(survivor, lost[0].session)
    speakers = [*lost, plain, *kept]

    async def before_kill(k: int, c: ResumingClient) -> None:
        await c.say(k + 1, turn(k + 1))
        await c.say(2, turn(2))
        await c.speak(tone(1.0))  # the open turn: four words, no end yet
        await c.wait_for(lambda m: m.get("event") == "Update" and m.get("speaker") == c.connection_id
                         and m["transcript"] == words(4), what="the open turn's 4-word Update")

    await asyncio.gather(*(before_kill(k, c) for k, c in enumerate(speakers)))
    await watcher.wait_for(lambda m: m.get("event") == "Update" and m["transcript"] == words(4), what="the watched open turn")

    doomed.kill9()
    # Each client of the dead process notices, reconnects through nginx and (if it re-sends) puts
    # its unacknowledged audio on the new connection before it goes on speaking.
    await asyncio.gather(*(c.reconnected() for c in [*lost, plain]))

    async def after_kill(c: ResumingClient) -> None:
        await c.speak(silence(0.7))  # ends the open turn (after the re-send, on the new process)
        await c.say(3, turn(3))

    watched = watcher.mark()
    await asyncio.gather(*(after_kill(c) for c in speakers))
    await watcher.wait_final(words(3), after=watched)
    for c in [*speakers, watcher]:
        await c.close()

    for k, c in enumerate(speakers):
        first = words(k + 1)
        if c is plain:
            # The open turn lived only in the killed process: without a re-send it is gone.
            expected = [first, words(2), words(3)]
        else:
            expected = [first, words(2), words(4), words(3)]
        assert s.transcripts(c.session) == expected, f"{c.session}: stored turns"
        assert c.final_transcripts() == expected, f"{c.session}: finals the client holds"
        assert not c.duplicates and not c.errors, (c.duplicates, c.errors)
    for c in [*lost, plain]:
        assert c.closes and c.closes[0][0] == 1006, f"{c.session} should have lost its connection: {c.closes}"
        assert await asyncio.to_thread(s.daphne_of, c.connection_id) is survivor
    for c in kept:
        assert len(c.connection_ids) == 1 and not c.closes, f"{c.session} on the survivor was disturbed"
        assert c.resent_bytes == 0
    assert all(c.resent_bytes > 0 for c in lost)
    assert plain.dropped_bytes > 0 and plain.resent_bytes == 0
    # The re-sent turn reached the other tab of the session live, across processes.
    assert watcher.final_transcripts() == s.transcripts(lost[0].session)
    assert not watcher.closes


@pytest.mark.slow
@pytest.mark.live
def test_kill_9_a_daphne_mid_turn_clients_resume_through_nginx(pg, tmp_path):
    with running(pg, tmp_path) as s:
        run(kill_scenario(s))


# --- Redis restarted ------------------------------------------------------------------------------
def is_live_final(m: dict) -> bool:
    return m.get("event") == "EndOfTurn" and not m.get("replayed")


async def redis_scenario(s: Stack) -> None:
    d1, d2 = s.daphnes
    sid = "redis-" + uuid.uuid4().hex[:6]
    a = await s.client_on(d1, sid)  # speaks
    b = await s.client_on(d2, sid)  # listens from the other process: events cross Redis
    c = await s.client_on(d1, sid)  # listens on the speaker's process: with pub/sub, through Redis too
    await a.say(1, turn(1))
    await b.wait_final(words(1))
    await c.wait_final(words(1))

    log_at = [len(d.output()) for d in (d1, d2)]
    s.redis.kill()
    # Redis down: A's own stream is untouched (its events go straight to its socket, its turns to
    # PostgreSQL); only the copy for B is lost. A new connection cannot start meanwhile (Channels
    # creates a consumer's channel in Redis first); the client keeps retrying until Redis is back.
    await a.say(2, turn(2))
    late = ResumingClient(s.nginx.ws_url, sid, ssl=s.nginx.ssl)
    late_start = asyncio.create_task(late.start())
    await asyncio.wait({late_start}, timeout=0)
    s.redis.start()  # same port, empty: every subscription is gone on the server side
    back_at = asyncio.get_running_loop().time()
    outage_last = max(a.finals)

    # Later events flow again once each process's subscriber has reconnected and resubscribed:
    # A keeps talking until B receives one of its turns live.
    stop = asyncio.Event()

    async def talk() -> None:
        n = 3
        while not stop.is_set():
            await a.say(n, turn(n))
            n = 3 if n == 6 else n + 1

    talker = asyncio.create_task(talk())
    first = await b.wait_for(lambda m: is_live_final(m) and m["turn_index"] > outage_last, timeout=60,
                             what="a live turn after Redis came back")
    recovered_after = asyncio.get_running_loop().time() - back_at
    stop.set()
    await talker
    await late_start
    mark_b, mark_c, mark_late = b.mark(), c.mark(), late.mark()
    await a.say(2, turn(2))
    for tab, mark in ((b, mark_b), (c, mark_c), (late, mark_late)):
        await tab.wait_for(lambda m: is_live_final(m) and m["speaker"] == a.connection_id and m["transcript"] == words(2),
                           after=mark, what="the last turn, live")

    stored = s.turns(sid)
    stored_indexes = [i for i, _, _ in stored]
    # Nothing finished was lost: A has every turn it spoke, all stored.
    assert sorted(a.finals) == stored_indexes and [a.finals[i]["transcript"] for i in stored_indexes] == [t for _, t, _ in stored]
    # Every listener, on either process, never reconnecting, ends with every stored turn exactly
    # once and in order: the ones the layer lost while Redis was down came from the store.
    for tab in (b, c):
        got = [m["turn_index"] for m in tab.messages if m.get("type") == "TurnInfo" and m["event"] == "EndOfTurn"]
        assert got == stored_indexes, (tab.session, got, stored_indexes)
    repaired = [i for i in stored_indexes if b.finals[i].get("replayed")]
    # The tab that connected during the outage got the whole history by replay, then live turns.
    assert sorted(late.finals) == stored_indexes
    print(f"redis restart: live events to the other process resumed {recovered_after:.2f} s after Redis was back; "
          f"B got {len(repaired)} turn(s) from the store (indexes {repaired}), the rest live")
    for tab in (a, b, c):
        assert len(tab.connection_ids) == 1 and not tab.closes and not tab.errors, f"{tab.session} was disturbed: {tab.closes} {tab.errors}"
    for d, at in zip((d1, d2), log_at):  # an outage the relay handles: a warning pair, no traceback
        out = d.output()[at:]
        assert "Traceback" not in out, out[out.index("Traceback") - 300 :][:1500]
        assert "layer_failed" in out and "layer_recovered" in out
    for tab in (a, b, c, late):
        await tab.close()


@pytest.mark.slow
@pytest.mark.live
def test_redis_restart_streams_survive_and_the_layer_recovers(pg, tmp_path):
    with running(pg, tmp_path) as s:
        run(redis_scenario(s))


# --- PostgreSQL restarted ----------------------------------------------------------------------------
async def wait_log(d: Daphne, needle: str, *, after: int = 0, timeout: float = 30) -> None:
    """Wait for a line in a daphne's log (the relay logs one line per event)."""
    async def loop():
        while needle not in d.output()[after:]:
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"{d.name} never logged {needle!r}") from None


def live_connections(s: Stack, session: str) -> int:
    """Connections the relay counts as live (open row, process heartbeating), as relay.models does."""
    return s.query(
        "SELECT count(*) FROM relay_connection c JOIN relay_relayprocess p ON p.id = c.process_id"
        " WHERE c.session_id = %s AND c.closed_at IS NULL AND p.stopped_at IS NULL"
        " AND p.heartbeat_at >= now() - interval '3 seconds'", session,
    )[0][0]


async def pg_restart_scenario(s: Stack, pg: Postgres) -> None:
    d1, d2 = s.daphnes
    sid = "pg-" + uuid.uuid4().hex[:6]
    a = await s.client_on(d1, sid)
    b = await s.client_on(d2, sid)
    await a.say(1, turn(1))
    await b.wait_final(words(1))

    log_at = len(d1.output())
    pg.stop("fast")  # every server connection is closed; nothing answers until the restart
    mark_b = b.mark()
    await a.speak(turn(2))
    await wait_log(d1, "db_unavailable", after=log_at)  # the turn's write is waiting for the database
    pg.start()  # returns once the server accepts connections
    back_at = asyncio.get_running_loop().time()
    await a.wait_final(words(2))
    late = asyncio.get_running_loop().time() - back_at
    # The waiting write goes through promptly once the database answers (a short backoff), not
    # after a long one: the EndOfTurn is late by the outage plus well under half a second.
    assert late < 0.5, f"EndOfTurn came {late:.2f} s after PostgreSQL was back"
    await b.wait_final(words(2), after=mark_b)
    await a.say(3, turn(3))
    await b.wait_final(words(3), after=mark_b)
    fresh = await s.client_on(d2, sid)  # new connections work again
    for c in (a, b, fresh):
        await c.close()

    assert s.transcripts(sid) == [words(1), words(2), words(3)]
    for c in (a, b):
        assert len(c.connection_ids) == 1 and not c.closes and not c.errors, f"{c.session}: {c.closes} {c.errors}"
    assert d1.alive() and d2.alive()
    assert live_connections(s, sid) == 0, "a connection row stayed open after its client left"
    for d in (d1, d2):  # an outage the relay handles: one warning and one recovery line, no traceback
        out = d.output()[log_at:]
        assert "Traceback" not in out, out[out.index("Traceback") - 300 :][:1500]


@pytest.mark.slow
@pytest.mark.live
def test_postgres_restart_turn_is_written_when_it_is_back(pg, tmp_path):
    with running(pg, tmp_path) as s:
        run(pg_restart_scenario(s, pg))


async def pg_outage_scenario(s: Stack, pg: Postgres) -> None:
    d1, d2 = s.daphnes
    tag = uuid.uuid4().hex[:6]
    a = await s.client_on(d1, f"pgout-{tag}")  # re-sends what was not acknowledged
    p = await s.client_on(d1, f"pgplain-{tag}", resend=False)
    for c in (a, p):
        await c.say(1, turn(1))
    log_at = len(d1.output())
    pg.stop("fast")
    for c in (a, p):
        await c.speak(turn(2))
    # Past RELAY_DB_RETRY_SECONDS the relay gives up on the turn and ends the stream with an
    # Error a client may retry (close 4013), instead of holding the audio forever.
    for c in (a, p):
        await c.wait_for(lambda m: m.get("type") == "Error", what="an Error", timeout=30)
        assert c.errors[0]["code"] == "STORAGE_UNAVAILABLE"
    # The relay also gives up recording those connections' close while the database is down.
    while d1.output()[log_at:].count("close_not_recorded") < 2:
        await wait_log(d1, "close_not_recorded", after=log_at)
        await asyncio.sleep(0.05)
    pg.start()
    for c in (a, p):
        await c.reconnected()
        assert c.closes[0] == (4013, "STORAGE_UNAVAILABLE")
    await a.say(3, turn(3))
    await p.say(3, turn(3))
    for c in (a, p):
        await c.close()
    assert d1.alive() and d2.alive()
    # The re-sending client lost nothing; the plain one lost exactly the turn that was open when
    # the relay gave up (its audio was never stored anywhere).
    assert s.transcripts(a.session) == [words(1), words(2), words(3)]
    assert s.transcripts(p.session) == [words(1), words(3)]


@pytest.mark.slow
@pytest.mark.live
def test_postgres_outage_past_the_retry_limit_loses_only_the_open_turn(pg, tmp_path):
    with running(pg, tmp_path, env={"RELAY_DB_RETRY_SECONDS": "1"}) as s:
        run(pg_outage_scenario(s, pg))



# --- the engine fails ---------------------------------------------------------------------------------
async def engine_scenario(s: Stack) -> None:
    from tests.support.fault_engines import FEED_CRASH, WORKER_CRASH, WORKER_RESTART

    d1, d2 = s.daphnes
    tag = uuid.uuid4().hex[:6]
    v = await s.client_on(d1, f"engine-{tag}")  # its engine will fail
    listener = await s.client_on(d2, v.session)  # another tab of the session, other process
    bystander = await s.client_on(d1, f"bystander-{tag}")  # same process, other stream
    stop = asyncio.Event()

    async def chatter() -> int:
        n = 0
        while not stop.is_set():
            await bystander.say(1 + n % 3, turn(1 + n % 3))
            n += 1
        return n

    chatting = asyncio.create_task(chatter())
    await v.say(1, turn(1))

    # 1. feed() raises mid-turn: Error ENGINE_ERROR, close 4011. The relay still flushes the
    #    open turn (the engine's event side is intact), so it is stored and acknowledged.
    await v.speak(tone(0.5))
    await v.wait_for(lambda m: m.get("event") == "Update" and m["transcript"] == words(2), what="open turn")
    await v.send_raw(FEED_CRASH)
    await v.reconnected(2)
    assert v.errors[-1]["code"] == "ENGINE_ERROR" and v.closes[-1] == (4011, "ENGINE_ERROR")
    flushed = v.finals[max(v.finals)]
    assert (flushed["transcript"], flushed["trigger"]) == (words(2), "end_of_stream")
    assert v.resent_bytes == 0  # the flushed EndOfTurn covered all of it
    await v.say(3, turn(3))

    # 2. The engine's worker dies: the exception comes out of the event stream. Error
    #    ENGINE_ERROR again. Whether the relay stores the open turn itself (see
    #    test_engine_event_stream_failure_still_stores_the_open_turn) or the client re-sends its
    #    audio, the turn ends up stored exactly once.
    await v.speak(tone(1.0))
    await v.wait_for(lambda m: m.get("event") == "Update" and m["transcript"] == words(4)
                     and m["speaker"] == v.connection_id, what="open turn")
    await v.send_raw(WORKER_CRASH)
    await v.reconnected(3)
    assert v.errors[-1]["code"] == "ENGINE_ERROR" and v.closes[-1] == (4011, "ENGINE_ERROR")
    await v.speak(silence(0.7))
    await v.wait_final(words(4))

    # 3. An engine that restarts its own worker only warns: the stream goes on.
    await v.send_raw(WORKER_RESTART)
    await v.wait_for(lambda m: m.get("type") == "Warning" and m["code"] == "ENGINE_WORKER_RESTARTED", what="Warning")
    await v.say(2, turn(2))
    assert len(v.connection_ids) == 3

    stop.set()
    spoken = await chatting
    mark = listener.mark()
    await v.say(1, turn(1))
    await listener.wait_final(words(1), after=mark)
    for c in (v, listener, bystander):
        await c.close()

    stored = [(t, trig) for _, t, trig in s.turns(v.session)]
    assert stored[3][0] == words(4) and stored[3][1] in ("model", "end_of_stream")
    assert stored[:3] + stored[4:] == [
        (words(1), "model"), (words(2), "end_of_stream"), (words(3), "model"), (words(2), "model"), (words(1), "model"),
    ]
    assert listener.final_transcripts() == s.transcripts(v.session)
    assert not v.duplicates
    # The other stream on the same process never noticed.
    assert len(bystander.connection_ids) == 1 and not bystander.closes and not bystander.errors
    assert len(s.turns(bystander.session)) == spoken > 0
    assert d1.alive()


@pytest.mark.slow
@pytest.mark.live
def test_engine_failure_is_an_error_and_the_stream_recovers(pg, tmp_path):
    env = {"DJANGO_SETTINGS_MODULE": "tests.support.fault_settings", "RELAY_ENGINE": "faulty"}
    with running(pg, tmp_path, env=env) as s:
        run(engine_scenario(s))


# --- a client that stops reading ------------------------------------------------------------------
#: What one connection may make a daphne process hold for a client that does not read. The
#: kernel's socket buffers and nginx take the first few MB; past that, the relay must refuse to
#: queue more (close the connection) instead of growing.
SLOW_READER_BUDGET_MB = 32


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) // 1024
    return out


async def slow_reader_scenario(s: Stack) -> dict[str, float]:
    d1 = s.daphnes[0]
    warm = await ResumingClient(s.nginx.ws_url, "warm-up", ssl=s.nginx.ssl).start()
    await warm.say(8, tone(2.0) + silence(0.7))
    await warm.close()
    before = vm(d1.pid)

    # Six minutes of speech with no pause: one turn whose Updates grow with every word (the
    # last ones are ~100 kB each), some 70 MB of TurnInfo for a client that reads none of it.
    sid = "slow-" + uuid.uuid4().hex[:6]
    ws = await websockets.connect(f"{s.nginx.ws_url}/v2/listen?session={sid}", ssl=s.nginx.ssl,
                                  ping_interval=None, max_queue=1, max_size=None)
    await ws.recv()  # Connected; from here on the client reads nothing
    log_at = len(d1.output())
    audio = tone(360.0) + silence(0.7)
    sent = 0
    try:
        for i in range(0, len(audio), 2560):
            await ws.send(audio[i : i + 2560])
            sent += 2560
    except websockets.ConnectionClosed:
        pass  # the relay gave up on this client: that is one way to stay bounded
    await wait_log(d1, f"turn_finished session={sid}", after=log_at, timeout=120)
    during = vm(d1.pid)
    ws.transport.abort()
    await wait_log(d1, f"client_disconnected session={sid}", after=log_at, timeout=60)
    after = vm(d1.pid)
    stats = {
        "audio_mb": sent / 1e6,
        "baseline_rss_mb": before["VmRSS"],
        "peak_rss_mb": during["VmHWM"],
        "growth_mb": during["VmHWM"] - max(before["VmHWM"], before["VmRSS"]),
        "rss_after_drop_mb": after["VmRSS"],
    }
    print(f"slow reader: {stats}")
    assert d1.alive()
    assert stats["growth_mb"] < SLOW_READER_BUDGET_MB, (
        f"daphne grew by {stats['growth_mb']} MB (peak {stats['peak_rss_mb']} MB from {stats['baseline_rss_mb']} MB) "
        f"for one client that stopped reading: the relay queues every TurnInfo for it without bound"
    )
    return stats


@pytest.mark.slow
@pytest.mark.live
def test_client_that_stops_reading_keeps_server_memory_bounded(pg, tmp_path):
    with running(pg, tmp_path, processes=1) as s:
        run(slow_reader_scenario(s))


async def ghost_scenario(s: Stack, pg: Postgres) -> None:
    d1, _ = s.daphnes
    sid = "pgghost-" + uuid.uuid4().hex[:6]
    c = await s.client_on(d1, sid)
    await c.say(1, turn(1))
    log_at = len(d1.output())
    pg.stop("fast")
    await c.close()  # the client leaves while the database is down
    await wait_log(d1, "close_not_recorded", after=log_at)
    pg.start()
    # Once the database is back the process must account for the connection it no longer has,
    # at the latest by the time a dead process's connections would stop counting (3 heartbeats).
    deadline = asyncio.get_running_loop().time() + 15
    while (live := await asyncio.to_thread(live_connections, s, sid)) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert live == 0, (
        "a connection whose close could not be written during a database outage still counts as "
        "live after the database came back (its process keeps heartbeating): presence counts and "
        "RELAY_MAX_CONNECTIONS_PER_SESSION see a ghost"
    )


@pytest.mark.slow
@pytest.mark.live
def test_connection_closed_during_a_database_outage_stops_counting_as_live(pg, tmp_path):
    with running(pg, tmp_path, env={"RELAY_DB_RETRY_SECONDS": "1"}) as s:
        run(ghost_scenario(s, pg))


async def worker_crash_flush_scenario(s: Stack) -> None:
    from tests.support.fault_engines import WORKER_CRASH

    d1, _ = s.daphnes
    c = await s.client_on(d1, "workerflush-" + uuid.uuid4().hex[:6], resend=False)
    await c.say(1, turn(1))
    await c.speak(tone(1.0))
    await c.wait_for(lambda m: m.get("event") == "Update" and m["transcript"] == words(4), what="open turn")
    await c.send_raw(WORKER_CRASH)
    await c.reconnected(2)
    await c.close()
    assert c.errors[-1]["code"] == "ENGINE_ERROR"
    # docs/protocol.md: "Before the relay closes for an error it finishes and stores the open
    # turn". The engine can still flush (finish() works), but the relay has stopped reading its
    # events by then, so the EndOfTurn it produces is dropped.
    assert [(t, trig) for _, t, trig in s.turns(c.session)] == [(words(1), "model"), (words(4), "end_of_stream")]


@pytest.mark.slow
@pytest.mark.live
def test_engine_event_stream_failure_still_stores_the_open_turn(pg, tmp_path):
    env = {"DJANGO_SETTINGS_MODULE": "tests.support.fault_settings", "RELAY_ENGINE": "faulty"}
    with running(pg, tmp_path, env=env) as s:
        run(worker_crash_flush_scenario(s))


async def sigterm_scenario(s: Stack) -> None:
    d1, d2 = s.daphnes
    c = await s.client_on(d1, "sigterm-" + uuid.uuid4().hex[:6], resend=False)
    await c.say(2, turn(2))
    await c.speak(tone(1.0))
    await c.wait_for(lambda m: m.get("event") == "Update" and m["transcript"] == words(4), what="open turn")
    first = c.connection_id
    d1.proc.terminate()  # what systemctl stop/restart (a deploy) does
    await asyncio.to_thread(d1.proc.wait, 30)
    await c.reconnected()
    await c.close()
    assert await asyncio.to_thread(s.daphne_of, c.connection_id) is d2
    # A restart is planned: the relay has time to do what it does on any close, flush the open
    # turn and record the close, instead of dropping the streams like a crash.
    assert s.transcripts(c.session) == [words(2), words(4)], "the open turn was lost on SIGTERM"
    closed = s.query("SELECT closed_at IS NOT NULL FROM relay_connection WHERE id = %s", first)[0][0]
    assert closed, "the connection's close was not recorded on SIGTERM"


@pytest.mark.slow
@pytest.mark.live
def test_sigterm_restart_stores_open_turns_like_a_close(pg, tmp_path):
    with running(pg, tmp_path) as s:
        run(sigterm_scenario(s))


async def cut_flush_scenario(s: Stack) -> None:
    c = await s.client_on(s.daphnes[0], "cutflush-" + uuid.uuid4().hex[:6])
    await c.say(2, turn(2))
    await c.speak(tone(1.0))
    await c.wait_for(lambda m: m.get("event") == "Update" and m["transcript"] == words(4), what="open turn")
    first = c.connection_id
    await c.close()  # the engine never finishes this flush: the relay cuts it and says so
    assert [e["code"] for e in c.errors] == ["FLUSH_INCOMPLETE"], c.errors
    assert c.resent_bytes > 0 and len(c.connection_ids) == 2, (c.resent_bytes, c.connection_ids)
    # The client sent the open turn's audio again on a new connection and closed there: the turn
    # is stored once, finished by that connection's close.
    assert s.transcripts(c.session) == [words(2), words(4)], s.turns(c.session)
    assert s.turns(c.session)[-1][2] == "end_of_stream"
    code = s.query("SELECT last_error_code FROM relay_connection WHERE id = %s", first)[0][0]
    assert code == "FLUSH_INCOMPLETE", code


@pytest.mark.slow
@pytest.mark.live
def test_the_test_client_closing_into_a_cut_flush_sends_the_open_turn_again(pg, tmp_path):
    # stalling-flush never finishes the process's first flush of an open turn; one process, so the
    # reconnect lands where that has been used up.
    env = {"DJANGO_SETTINGS_MODULE": "tests.support.fault_settings", "RELAY_ENGINE": "stalling-flush",
           "RELAY_FLUSH_TIMEOUT_SECONDS": "1"}
    with running(pg, tmp_path, processes=1, env=env) as s:
        run(cut_flush_scenario(s))
