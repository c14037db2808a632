"""Who may do what in a session: the one place the rules live, for the WebSocket, the pages and the API.

Roles, strongest first:

* ``owner``: the session's owner (and staff, who may already open any session from the admin):
  everything, including inviting, share links, renaming and deleting;
* ``speaker``: sends audio, Configure and ForceEndTurn; reads live turns and history;
* ``viewer``: reads live turns and history; never changes the transcript.

A user gets a role by who they are (:func:`session_role`: owner, or a :class:`Membership`) or
by a share link they present (:func:`share_link_resolve`); a connection is served with the
stronger of the two, or the weaker one it asked for (:func:`connection_role`). An anonymous
session (no owner) admits everyone as a speaker, as it always did, unless the deployment sets
``RELAY_ANONYMOUS_READ_ONLY``: then only the connection that created it (and that client's
reconnects) speak, see :func:`relay.store.services.connection_open`.

Reads only; the writes (invites, links, rename, delete) are in :mod:`relay.store.rooms`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core import signing
from django.db import connection as db_connection
from django.db.models import Count, Exists, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from relay.exceptions import Forbidden, ShareLinkInvalid
from relay.store.db import db_async
from relay.models import ROLE_OWNER, ROLE_SPEAKER, ROLE_VIEWER, Connection, Membership, Session, ShareLink, Turn

ROLES = (ROLE_OWNER, ROLE_SPEAKER, ROLE_VIEWER)
_RANK: dict[str | None, int] = {None: 0, ROLE_VIEWER: 1, ROLE_SPEAKER: 2, ROLE_OWNER: 3}
SHARE_LINK_SALT = "relay.share-link"
#: The text-search configuration: ``simple`` (no stemming, no stop words), because transcripts
#: come in whatever languages were spoken.
SEARCH_CONFIG = "simple"


# --- roles ---------------------------------------------------------------------------------------
def is_signed_in(user: Any) -> bool:
    return bool(user is not None and getattr(user, "is_authenticated", False))


def stronger(a: str | None, b: str | None) -> str | None:
    """The stronger of two roles (None: no access)."""
    return a if _RANK[a] >= _RANK[b] else b


def can_read(role: str | None) -> bool:
    return role is not None


def can_speak(role: str | None) -> bool:
    """Audio, Configure and ForceEndTurn: owners and speakers."""
    return role in (ROLE_OWNER, ROLE_SPEAKER)


def can_manage(role: str | None) -> bool:
    """Invite, make and revoke share links, rename, delete: the owner only."""
    return role == ROLE_OWNER


def display_name(user: Any) -> str:
    """What a user's turns are labelled with: their full name, else their username."""
    if not is_signed_in(user):
        return ""
    return (user.get_full_name() or "").strip() or user.get_username()


def session_role(*, user: Any, session: Session, now: datetime | None = None) -> str | None:
    """The role ``user`` has in ``session`` by who they are: "owner", "speaker", "viewer" or None.

    A membership that came from a share link counts only while that link is usable.
    """
    if session.owner_id is None:
        return ROLE_VIEWER if settings.RELAY_ANONYMOUS_READ_ONLY else ROLE_SPEAKER
    if not is_signed_in(user):
        return None
    if user.pk == session.owner_id or user.is_staff:
        return ROLE_OWNER
    membership = Membership.objects.filter(session=session, user=user).select_related("link").first()
    if membership is None:
        return None
    if membership.link is not None and not membership.link.usable(now or timezone.now()):
        return None
    return membership.role


def connection_role(*, user: Any, session: Session, share: str | None = None, wants: str | None = None, now: datetime | None = None) -> str:
    """The role a new connection is served with; raises when it may not join at all.

    ``share``: a signed share link the client presented (``?share=``); a bad one is refused
    (:class:`ShareLinkInvalid`) rather than ignored, so its holder learns it expired.
    ``wants``: the role the client announced (``?role=``): ``viewer`` is always granted (a
    speaker may join as a listener); ``speaker`` is refused (:class:`Forbidden`) when the
    connection may only view.
    """
    role = session_role(user=user, session=session, now=now)
    if share:
        role = stronger(role, share_link_resolve(token=share, session_id=session.pk, now=now).role)
    if role is None:
        raise Forbidden("This session belongs to another user; ask its owner for an invitation or a share link.")
    return _as_wanted(role, wants)


def _as_wanted(role: str, wants: str | None) -> str:
    if wants == ROLE_VIEWER:
        return ROLE_VIEWER
    if wants == ROLE_SPEAKER and not can_speak(role):
        raise Forbidden("You may view this session but not speak in it (role viewer).")
    return role


@dataclass(frozen=True, slots=True)
class ConnectAccess:
    """What a WebSocket may do, decided before it opens an engine stream (a viewer needs none).

    ``session_existed``: the role was decided for an existing session; if the session turns out to
    exist when the connection row is written although it did not here (created meanwhile by
    someone else), :func:`relay.store.services.connection_open` decides again.
    """

    role: str
    session_existed: bool

    @property
    def may_speak(self) -> bool:
        return can_speak(self.role)


def connect_access(
    *, user: Any, session_id: str | None, share: str | None = None, wants: str | None = None,
    previous: str | None = None, client_addr: str = "", now: datetime | None = None,
) -> ConnectAccess:
    """The role a WebSocket connection will be served with; raises when it may not join.

    A connection that creates its session owns it when signed in, and otherwise speaks in it.
    With ``RELAY_ANONYMOUS_READ_ONLY``, a client reconnecting to an anonymous session it spoke in
    (``previous_connection=`` naming its own speaking connection, from the same address) speaks
    again; everyone else views.
    """
    session = Session.objects.filter(pk=session_id).first() if session_id else None
    if session is None:
        if share:
            share_link_resolve(token=share, session_id=session_id, now=now)  # refused: nothing to share yet
        if wants == ROLE_VIEWER:
            return ConnectAccess(ROLE_VIEWER, False)
        return ConnectAccess(ROLE_OWNER if is_signed_in(user) else ROLE_SPEAKER, False)
    role = connection_role(user=user, session=session, share=share, now=now)
    if role == ROLE_VIEWER and wants != ROLE_VIEWER and session.owner_id is None and previous:
        if Connection.objects.filter(pk=previous, session=session, role__in=(ROLE_OWNER, ROLE_SPEAKER), client_addr=client_addr[:64]).exists():
            role = ROLE_SPEAKER
    return ConnectAccess(_as_wanted(role, wants), True)


_aconnect_access = db_async(connect_access)


async def aconnect_access(
    *, user: Any, session_id: str | None, share: str | None = None, wants: str | None = None,
    previous: str | None = None, client_addr: str = "", now: datetime | None = None,
) -> ConnectAccess:
    """:func:`connect_access` for the consumer; a connection that starts a fresh session (no
    ``session=``, no link) has nothing to read, so it costs no thread hop."""
    if session_id is None and not share:
        return ConnectAccess(ROLE_VIEWER if wants == ROLE_VIEWER else ROLE_OWNER if is_signed_in(user) else ROLE_SPEAKER, False)
    return await _aconnect_access(user=user, session_id=session_id, share=share, wants=wants, previous=previous, client_addr=client_addr, now=now)


# --- share links ---------------------------------------------------------------------------------
def share_link_token(link: ShareLink) -> str:
    """The signed value that stands for ``link`` (URL-safe); only the row's id is inside."""
    return signing.dumps({"l": link.pk, "s": link.session_id}, salt=SHARE_LINK_SALT, compress=True)


def share_link_resolve(*, token: str, session_id: str | None = None, now: datetime | None = None) -> ShareLink:
    """The link a signed value stands for, if it is still usable (for ``session_id`` when given).

    ``now`` is injectable so expiry is tested without waiting.
    """
    try:
        data = signing.loads(token, salt=SHARE_LINK_SALT)
        pk, signed_session = int(data["l"]), str(data["s"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise ShareLinkInvalid("This share link is not valid (it was altered or cut short).") from None
    if session_id is not None and signed_session != session_id:
        raise ShareLinkInvalid("This share link is for another session.")
    link = ShareLink.objects.filter(pk=pk, session_id=signed_session).first()
    if link is None or link.revoked_at is not None:
        raise ShareLinkInvalid("This share link was revoked.")
    if link.expires_at is not None and (now or timezone.now()) >= link.expires_at:
        raise ShareLinkInvalid("This share link has expired.")
    return link


# --- listing and search --------------------------------------------------------------------------
def _usable_memberships(user: Any, now: datetime) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).filter(
        Q(link__isnull=True) | (Q(link__revoked_at__isnull=True) & (Q(link__expires_at__isnull=True) | Q(link__expires_at__gt=now)))
    )


def transcript_matches(query: str) -> QuerySet[Turn]:
    """Turns whose transcript matches ``query``.

    PostgreSQL: full-text search (``websearch`` syntax: words, "quoted phrases", -excluded) over
    ``to_tsvector('simple', transcript)``, served by the GIN index migration 0005 creates.
    Other databases (SQLite): every word must appear in the turn, case-insensitively (a plain
    ``LIKE`` scan; fine for a personal history, documented in docs/accounts.md).
    """
    if db_connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery, SearchVector

        return Turn.objects.annotate(fts=SearchVector("transcript", config=SEARCH_CONFIG)).filter(
            fts=SearchQuery(query, config=SEARCH_CONFIG, search_type="websearch")
        )
    turns = Turn.objects.all()
    for word in query.split()[:12]:
        turns = turns.filter(transcript__icontains=word.strip('"'))
    return turns


def sessions_for_user(*, user: Any, query: str = "", include_empty: bool = True) -> QuerySet[Session]:
    """The sessions ``user`` owns or joined, newest first, matching ``query`` when given.

    A match is a title containing the query, or a turn whose transcript matches it
    (:func:`transcript_matches`). Each row is annotated with ``turn_count``, ``is_live`` and
    ``member_role`` (the user's role as a member; None for their own sessions, see
    :func:`role_of_listed`). ``include_empty=False`` leaves out sessions nobody said anything in,
    that are not live and have no title: the demo page opens a session on every visit.
    """
    if not is_signed_in(user):
        return Session.objects.none()
    now = timezone.now()
    memberships = _usable_memberships(user, now)
    sessions = Session.objects.filter(Q(owner=user) | Q(pk__in=memberships.values("session_id")))
    query = query.strip()
    if query:
        sessions = sessions.filter(Q(title__icontains=query) | Q(pk__in=transcript_matches(query).values("session_id")))
    turn_count = Turn.objects.filter(session=OuterRef("pk")).order_by().values("session").annotate(n=Count("pk")).values("n")
    member_role = memberships.filter(session=OuterRef("pk")).values("role")[:1]
    sessions = sessions.annotate(
        turn_count=Coalesce(Subquery(turn_count, output_field=IntegerField()), Value(0)),
        is_live=Exists(Connection.objects.live().filter(session=OuterRef("pk"))),
        member_role=Subquery(member_role),
    )
    if not include_empty:
        sessions = sessions.filter(Q(turn_count__gt=0) | Q(is_live=True) | ~Q(title=""))
    return sessions.order_by("-created_at")


def role_of_listed(session: Session, user: Any) -> str:
    """``my role`` for a row of :func:`sessions_for_user` (no extra query)."""
    if session.owner_id == user.pk:
        return ROLE_OWNER
    return getattr(session, "member_role", None) or ROLE_VIEWER


def session_participants(*, session_ids: list[str]) -> dict[str, list[str]]:
    """Per session, the names its connections were labelled with (users and guests), in order seen."""
    names: dict[str, list[str]] = defaultdict(list)
    rows = Connection.objects.filter(session_id__in=session_ids).exclude(speaker_name="").order_by("opened_at").values_list("session_id", "speaker_name")
    for session_id, name in rows:
        if name not in names[session_id]:
            names[session_id].append(name)
    return dict(names)


def session_members(*, session: Session) -> QuerySet[Membership]:
    """The session's members (invited or joined by link), with their users and links."""
    return Membership.objects.filter(session=session).select_related("user", "link").order_by("created_at")


def session_share_links(*, session: Session) -> QuerySet[ShareLink]:
    return ShareLink.objects.filter(session=session).order_by("-created_at")
