"""Build session/connection/turn histories in the database for admin, dashboard and export tests."""
from __future__ import annotations

import random
from datetime import datetime, timedelta

from django.utils import timezone

from relay.models import Connection, RelayProcess, Session, Turn


def process(pid: str = "test-host:1:live", *, heartbeat_age: float = 0.0, stopped: bool = False) -> RelayProcess:
    now = timezone.now()
    proc, _ = RelayProcess.objects.update_or_create(
        pk=pid,
        defaults={
            "hostname": "test-host",
            "pid": 1,
            "heartbeat_at": now - timedelta(seconds=heartbeat_age),
            "stopped_at": now if stopped else None,
        },
    )
    return proc


def session(sid: str, *, created: datetime | None = None, owner=None, engine: str = "fake", ended: bool = False, **fields) -> Session:
    created = created or timezone.now()
    return Session.objects.create(
        pk=sid, owner=owner, engine=engine, created_at=created, last_activity_at=fields.pop("last_activity_at", created),
        ended_at=created + timedelta(seconds=1) if ended else None, **fields,
    )


def connection(
    sess: Session,
    *,
    opened: datetime,
    duration: float | None,
    code: int | None = 1000,
    proc: RelayProcess | None = None,
    reason: str = "",
    **fields,
) -> Connection:
    return Connection.objects.create(
        session=sess,
        process=proc,
        engine=sess.engine,
        opened_at=opened,
        closed_at=opened + timedelta(seconds=duration) if duration is not None else None,
        close_code=code if duration is not None else None,
        close_reason=reason or ({1000: "client closed", 1006: "connection lost", 4011: "ENGINE_ERROR"}.get(code, "") if duration is not None else ""),
        **fields,
    )


def turns(sess: Session, conn: Connection | None, texts: list[str], *, start_index: int = 0, gap: float = 0.5, length: float = 1.5) -> list[Turn]:
    made = []
    t = 0.0
    for i, text in enumerate(texts):
        made.append(
            Turn.objects.create(
                session=sess,
                connection=conn,
                index=start_index + i,
                transcript=text,
                words=[{"word": w, "confidence": 0.9} for w in text.split()],
                audio_window_start=round(t, 3),
                audio_window_end=round(t + length, 3),
                end_of_turn_confidence=0.95,
                trigger="model",
                created_at=(conn.opened_at if conn else sess.created_at) + timedelta(seconds=t + length),
            )
        )
        t += length + gap
    Session.objects.filter(pk=sess.pk).update(next_turn_index=start_index + len(texts))
    return made


def busy_day(*, seed: int = 7, now: datetime | None = None) -> dict[str, int]:
    """A day of traffic: mostly long clean connections, some drops and errors, reconnects, and a
    few live sessions on a live process plus one orphaned by a crashed process."""
    rng = random.Random(seed)
    now = now or timezone.now()
    live = process("test-host:100:live")
    dead = process("test-host:200:dead", heartbeat_age=3600)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    counts = {"sessions": 0, "connections": 0, "turns": 0}
    for n in range(60):
        start = now - timedelta(hours=23.5) + timedelta(minutes=n * 23 + rng.randint(0, 10))
        s = session(f"day-{n:03d}", created=start, audio_seconds=0.0)
        counts["sessions"] += 1
        t = start
        index = 0
        prev = None
        for k in range(rng.choice([1, 1, 2, 3])):
            duration = rng.choice([20, 90, 400, 900, 1800, 2400])
            code = rng.choices([1000, 1001, 1006, 4011], weights=[80, 8, 9, 3])[0]
            gap = None if k == 0 else rng.choice([0.2, 0.3, 0.4, 0.8, 1.5, 3.0])
            t = t + timedelta(seconds=gap or 0)
            end = t + timedelta(seconds=duration)
            if end > now:
                break
            c = connection(
                s, opened=t, duration=duration, code=code, proc=live, resumed=k > 0, gap_seconds=gap,
                audio_seconds=duration * 0.9, audio_bytes=int(duration * 0.9 * 32000),
                error_count=1 if code == 4011 else 0, client_addr=f"10.0.0.{n % 250}", user_agent="Mozilla/5.0 test",
            )
            counts["connections"] += 1
            if prev is not None and prev.close_code not in (1000, 1001):  # its client came back: a reconnect
                Connection.objects.filter(pk=prev.pk).update(resumed_after_seconds=gap)
                Connection.objects.filter(pk=c.pk).update(previous=prev.pk)
            prev = c
            texts = [" ".join(rng.sample(words, 4)) for _ in range(rng.randint(2, 6))]
            turns(s, c, texts, start_index=index)
            index += len(texts)
            counts["turns"] += len(texts)
            t = end
        Session.objects.filter(pk=s.pk).update(last_activity_at=t, audio_seconds=sum(c.audio_seconds for c in s.connections.all()))
    for n in range(3):
        s = session(f"live-{n}", created=now - timedelta(minutes=10 + n))
        connection(s, opened=now - timedelta(minutes=10 + n), duration=None, proc=live, client_addr="10.1.0.1")
        counts["sessions"] += 1
        counts["connections"] += 1
    orphan = session("orphaned", created=now - timedelta(hours=2))
    connection(orphan, opened=now - timedelta(hours=2), duration=None, proc=dead)
    counts["sessions"] += 1
    counts["connections"] += 1
    return counts
