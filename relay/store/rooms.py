"""Writes for rooms: invitations, share links, renaming and deleting sessions.

Each function does the write only; whether the caller may do it is checked by the caller with
:mod:`relay.store.access` (``can_manage(session_role(...))``), the same way from the pages and
the REST API.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from relay.exceptions import InvalidParameter
from relay.models import MEMBER_ROLES, Connection, Membership, Session, ShareLink
from relay.store import access, services

_MEMBER_ROLES = {value for value, _ in MEMBER_ROLES}


def _check_role(role: str) -> str:
    if role not in _MEMBER_ROLES:
        raise InvalidParameter(f"role must be one of {', '.join(sorted(_MEMBER_ROLES))}; got {role[:32]!r}.")
    return role


def member_invite(*, session: Session, username: str, role: str, invited_by: Any) -> Membership:
    """Give the user called ``username`` ``role`` in ``session`` (again: the role is updated).

    An invitation replaces a membership that came from a share link, so it outlives the link.
    """
    _check_role(role)
    user = get_user_model().objects.filter(username__iexact=username.strip()).first()
    if user is None:
        raise InvalidParameter(f"There is no user called {username.strip()[:150]!r}.")
    if user.pk == session.owner_id:
        raise InvalidParameter("The owner already has every right in their session.")
    membership, _ = Membership.objects.update_or_create(
        session=session, user=user, defaults={"role": role, "link": None, "invited_by": invited_by}
    )
    return membership


def member_remove(*, session: Session, user_id: int) -> bool:
    """Take a member out of the session; False when they were not a member."""
    deleted, _ = Membership.objects.filter(session=session, user_id=user_id).delete()
    return bool(deleted)


def share_link_create(*, session: Session, role: str, created_by: Any, expires_at: datetime | None = None, label: str = "") -> tuple[ShareLink, str]:
    """A new share link; returns its row and its signed value (``?share=`` on the WebSocket)."""
    _check_role(role)
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidParameter("A share link's expiry must be in the future.")
    link = ShareLink.objects.create(session=session, role=role, created_by=created_by if access.is_signed_in(created_by) else None,
                                    expires_at=expires_at, label=label[:100])
    return link, access.share_link_token(link)


def share_link_revoke(*, link: ShareLink) -> None:
    """Revoke a link: it stops admitting at once, and memberships it granted stop counting."""
    if link.revoked_at is None:
        ShareLink.objects.filter(pk=link.pk).update(revoked_at=timezone.now())
        link.revoked_at = timezone.now()


def share_link_join(*, link: ShareLink, user: Any) -> Membership | None:
    """A signed-in user opened a share link: remember the session for their "My sessions".

    The membership lasts as long as the link (see :class:`relay.models.Membership`); a user who
    already has a role as strong keeps theirs, and nothing is written.
    """
    if not access.is_signed_in(user):
        return None
    current = access.session_role(user=user, session=link.session)
    if access.stronger(current, link.role) == current:
        return None
    if Membership.objects.filter(session=link.session, user=user, link__isnull=True).exists():
        return None  # an invitation outlives any link; the stronger link still applies while it is presented
    membership, _ = Membership.objects.update_or_create(session=link.session, user=user, defaults={"role": link.role, "link": link})
    return membership


def session_rename(*, session: Session, title: str) -> Session:
    session.title = title.strip()[:200]
    Session.objects.filter(pk=session.pk).update(title=session.title)
    return session


def session_delete(*, session: Session) -> None:
    """Delete the session with its turns, connections, members and links.

    Its live connections are ended first (``SESSION_ENDED``, on every process), so none keeps
    streaming into a session that is gone; a turn one of them finishes meanwhile is not kept.
    """
    if Connection.objects.live().filter(session_id=session.pk).exists():
        services.session_end(session_id=session.pk, reason="Deleted by its owner")
    with transaction.atomic():
        Session.objects.filter(pk=session.pk).delete()
