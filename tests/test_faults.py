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

from tests.audio import silence, tone
from tests.deploy_stack import (
    PROCFILE,
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
from tests.resuming_client import ResumingClient

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
    lines = [line for line in PROCFILE.read_text().splitlines() if line and not line.startswith("#")]
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
