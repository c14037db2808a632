"""Transcript exports: txt, json, srt and vtt at ``/sessions/<id>/transcript.<fmt>``.

Access follows the rules for joining a session (:mod:`relay.store.access`): an anonymous
session's id is the capability; a session with an owner is readable by its owner, its members,
staff, and whoever presents a usable share link (``?share=``). Ended sessions stay exportable.

History is read page by page (``relay.store.selectors``) and streamed, so a long session is never held
in memory. Times: turn windows are relative to their connection's audio, so every connection gets
an offset on one session timeline and each turn is placed at that offset plus its audio window
(:func:`session_timeline`). A connection starts at its wall-clock offset from the session's
creation, but never before the audio of an earlier connection that had closed when it opened
has ended: a file uploaded faster than real time takes its audio's length on the timeline, so a
second upload follows the first instead of overlapping it, while a live reconnect (whose audio
is never longer than the wall clock) keeps the real gap. Connections open at the same time
(several tabs) keep their wall-clock offsets and are told apart by speaker labels; a single
user's sequential connections read as one voice, whose cues never overlap. Labels are the
connections' speaker names (a user's display name, "Guest N"), given when more than one name
spoke or connections overlapped; overlapping connections with no name are "Speaker 1", ...
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import srt
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Max
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden, StreamingHttpResponse
from django.views.decorators.http import require_GET

from relay.exceptions import ShareLinkInvalid
from relay.store import access, selectors
from relay.store.turns import turn_fields
from relay.models import Connection, Session

FORMATS: dict[str, str] = {
    "txt": "text/plain; charset=utf-8",
    "json": "application/json",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def session_readable(session: Session, user: Any, share: str | None = None) -> bool:
    """The join rule, for reading: unowned sessions are open to whoever has the id."""
    if session.owner_id is None or access.can_read(access.session_role(user=user, session=session)):
        return True
    if not share:
        return False
    try:
        access.share_link_resolve(token=share, session_id=session.pk)
    except ShareLinkInvalid:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Timeline:
    """Where each connection's audio sits in the session, and who speaks."""

    offsets: dict[str, float]
    labels: dict[str, str]


def session_timeline(*, session: Session) -> Timeline:
    """Each connection's offset on the session's one timeline, and speaker labels if any overlapped."""
    rows = list(
        Connection.objects.filter(session=session, turns__isnull=False)
        .annotate(last_window_end=Max("turns__audio_window_end"))
        .order_by("opened_at", "id")
        .values("id", "opened_at", "closed_at", "audio_seconds", "last_window_end", "speaker_name")
    )
    offsets: dict[str, float] = {}
    ended: list[tuple[Any, float]] = []  # (closed_at, where its audio ends on the timeline)
    for r in rows:
        offset = max(0.0, (r["opened_at"] - session.created_at).total_seconds())
        # Audio of connections that had closed before this one opened comes first.
        offset = max([offset, *(end for closed_at, end in ended if closed_at <= r["opened_at"])])
        offsets[str(r["id"])] = offset
        if r["closed_at"] is not None:
            ended.append((r["closed_at"], offset + max(r["audio_seconds"] or 0.0, r["last_window_end"] or 0.0)))
    concurrent = False
    latest_end = None
    for r in rows:
        if latest_end is not None and r["opened_at"] < latest_end:
            concurrent = True
            break
        end = r["closed_at"] or r["opened_at"] + timedelta(days=36500)
        latest_end = end if latest_end is None else max(latest_end, end)
    names = {r["speaker_name"] for r in rows if r["speaker_name"]}
    labels = {}
    if concurrent or len(names) > 1:
        labels = {str(r["id"]): r["speaker_name"] or (f"Speaker {n}" if concurrent else "") for n, r in enumerate(rows, 1)}
    return Timeline(offsets=offsets, labels=labels)


@dataclass(frozen=True, slots=True)
class Cue:
    index: int
    start: float
    end: float
    speaker: str
    text: str
    record: dict[str, Any]


def cue(record: dict[str, Any], timeline: Timeline) -> Cue:
    speaker = record["speaker"]
    event = record["event"]
    offset = timeline.offsets.get(speaker, 0.0)
    start = offset + float(event.audio_window_start)
    end = max(offset + float(event.audio_window_end), start + 0.001)
    return Cue(record["index"], start, end, timeline.labels.get(speaker, ""), event.transcript.strip(), record)


class Renderer:
    """One format: a header, then turns in pages, then a footer (all strings)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def header(self) -> str:
        return ""

    def page(self, cues: Iterable[Cue]) -> str:
        raise NotImplementedError

    def footer(self) -> str:
        return ""


class TextRenderer(Renderer):
    def page(self, cues: Iterable[Cue]) -> str:
        return "".join(f"{c.speaker + ': ' if c.speaker else ''}{c.text}\n" for c in cues if c.text)


class JsonRenderer(Renderer):
    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.first = True

    def header(self) -> str:
        s = self.session
        head = {
            "id": s.pk,
            "title": s.title,
            "engine": s.engine,
            "created_at": s.created_at,
            "last_activity_at": s.last_activity_at,
            "ended_at": s.ended_at,
            "end_reason": s.end_reason,
            "audio_seconds": round(s.audio_seconds, 3),
        }
        return '{"session":' + json.dumps(head, cls=DjangoJSONEncoder, ensure_ascii=False) + ',"turns":['

    def page(self, cues: Iterable[Cue]) -> str:
        parts = []
        for c in cues:
            r = c.record
            item = {
                "index": c.index,
                "start": round(c.start, 3),
                "end": round(c.end, 3),
                "speaker": c.speaker,
                "speaker_name": r.get("speaker_name") or "",
                "connection_id": r["speaker"],
                **turn_fields(r["event"]),
                "created_at": r["created_at"],
            }
            parts.append(("" if self.first else ",") + json.dumps(item, cls=DjangoJSONEncoder, ensure_ascii=False))
            self.first = False
        return "".join(parts)

    def footer(self) -> str:
        return "]}\n"


class SrtRenderer(Renderer):
    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.number = 0

    def page(self, cues: Iterable[Cue]) -> str:
        parts = []
        for c in cues:
            if not c.text:
                continue
            self.number += 1
            content = f"{c.speaker}: {c.text}" if c.speaker else c.text
            parts.append(
                srt.Subtitle(self.number, timedelta(seconds=c.start), timedelta(seconds=c.end), content).to_srt()
            )
        return "".join(parts)


def _vtt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def _vtt_escape(text: str) -> str:
    return " ".join(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").split())


class VttRenderer(Renderer):
    def header(self) -> str:
        return "WEBVTT\n\n"

    def page(self, cues: Iterable[Cue]) -> str:
        parts = []
        for c in cues:
            if not c.text:
                continue
            voice = f"<v {_vtt_escape(c.speaker)}>" if c.speaker else ""
            parts.append(f"turn-{c.index}\n{_vtt_time(c.start)} --> {_vtt_time(c.end)}\n{voice}{_vtt_escape(c.text)}\n\n")
        return "".join(parts)


RENDERERS: dict[str, type[Renderer]] = {"txt": TextRenderer, "json": JsonRenderer, "srt": SrtRenderer, "vtt": VttRenderer}


def export_chunks(*, session: Session, fmt: str) -> Iterator[str]:
    """The export as string chunks, one per history page (sync: admin actions, commands)."""
    renderer = RENDERERS[fmt](session)
    timeline = session_timeline(session=session)
    yield renderer.header()
    for page in selectors.turn_pages(session_id=session.pk, page_size=settings.RELAY_EXPORT_PAGE_SIZE):
        yield renderer.page(cue(r, timeline) for r in page)
    yield renderer.footer()


def export_text(*, session: Session, fmt: str) -> str:
    return "".join(export_chunks(session=session, fmt=fmt))


async def aexport_chunks(*, session: Session, fmt: str) -> AsyncIterator[bytes]:
    renderer = RENDERERS[fmt](session)
    timeline = await database_sync_to_async(session_timeline)(session=session)
    yield renderer.header().encode()
    async for page in selectors.aturn_pages(session_id=session.pk, page_size=settings.RELAY_EXPORT_PAGE_SIZE):
        yield renderer.page(cue(r, timeline) for r in page).encode()
    yield renderer.footer().encode()


def export_filename(session_id: str, fmt: str) -> str:
    return f"transcript-{session_id}.{fmt}"


@require_GET
async def transcript_view(request: HttpRequest, session_id: str, fmt: str) -> HttpResponse:
    """A session's transcript; ``?download=1`` asks the browser to save it."""
    if fmt not in FORMATS:
        raise Http404("Unknown transcript format.")
    session = await Session.objects.filter(pk=session_id).afirst()
    if session is None:
        raise Http404("No such session.")
    user = await request.auser()
    if not await database_sync_to_async(session_readable)(session, user, request.GET.get("share")):
        return HttpResponseForbidden("This session belongs to another user.\n", content_type="text/plain")
    response = StreamingHttpResponse(aexport_chunks(session=session, fmt=fmt), content_type=FORMATS[fmt])
    disposition = "attachment" if request.GET.get("download") else "inline"
    response["Content-Disposition"] = f'{disposition}; filename="{export_filename(session.pk, fmt)}"'
    response["Cache-Control"] = "private, no-cache"
    response["Vary"] = "Cookie"
    return response
