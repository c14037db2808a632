"""My sessions, one session's page (read, export, rename, delete, members, share links), share links.

Every rule comes from :mod:`relay.store.access` (the same the WebSocket and the REST API use);
every write from :mod:`relay.store.rooms`.
"""
from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, re_path, reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from relay.exceptions import RelayError, ShareLinkInvalid
from relay.flux.constants import SESSION_ID_PATTERN
from relay.models import MEMBER_ROLES, Session, ShareLink
from relay.ops import exports
from relay.store import access, rooms, selectors

PAGE_SIZE = 25
#: Expiry choices for a new share link (label, seconds; None: never).
EXPIRIES = (("1h", "1 hour", 3600), ("1d", "1 day", 86400), ("7d", "7 days", 7 * 86400), ("30d", "30 days", 30 * 86400), ("never", "never", None))


class ShareLinkForm(forms.Form):
    role = forms.ChoiceField(choices=MEMBER_ROLES, initial="viewer")
    expires = forms.ChoiceField(choices=[(key, label) for key, label, _ in EXPIRIES], initial="1d")
    label = forms.CharField(max_length=100, required=False)


class InviteForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=MEMBER_ROLES, initial="viewer")


def _duration(session: Session) -> str:
    """Wall-clock span from the first connection to the last activity (or the end): "1:02:03", "4:05"."""
    end = session.ended_at or session.last_activity_at
    seconds = int(max(timedelta(0), end - session.created_at).total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@login_required
@require_GET
def my_sessions(request: HttpRequest) -> HttpResponse:
    """The user's sessions (owned and joined), newest first; ``?q=`` searches titles and transcripts."""
    query = request.GET.get("q", "")[:200]
    page = Paginator(access.sessions_for_user(user=request.user, query=query, include_empty=False), PAGE_SIZE).get_page(request.GET.get("page"))
    participants = access.session_participants(session_ids=[s.pk for s in page])
    rows = [
        {"session": s, "role": access.role_of_listed(s, request.user), "duration": _duration(s), "participants": participants.get(s.pk, [])}
        for s in page
    ]
    return render(request, "relay/sessions/list.html", {"rows": rows, "page": page, "query": query})


def _session_for(request: HttpRequest, session_id: str) -> tuple[Session, str]:
    """The session and the user's role in it; 404 when they may not read it (its existence stays private)."""
    session = get_object_or_404(Session, pk=session_id)
    role = access.session_role(user=request.user, session=session)
    if session.owner_id is None and not access.is_signed_in(request.user):
        role = None  # anonymous sessions are reached by their live link, not listed here
    if role is None:
        raise Http404("No such session, or it is not shared with you.")
    return session, role


@login_required
def session_detail(request: HttpRequest, session_id: str) -> HttpResponse:
    session, role = _session_for(request, session_id)
    manage = access.can_manage(role)
    new_link = None
    if request.method == "POST":
        if not manage:
            return HttpResponse("Only the session's owner may change it.\n", status=403, content_type="text/plain")
        response, new_link = _post(request, session)
        if response is not None:
            return response
    turns = selectors.turn_page(session_id=session.pk, after_index=-1, limit=settings.RELAY_EXPORT_PAGE_SIZE)
    context = {
        "session": session,
        "role": role,
        "manage": manage,
        "turns": turns,
        "more_turns": len(turns) >= settings.RELAY_EXPORT_PAGE_SIZE,
        "participants": access.session_participants(session_ids=[session.pk]).get(session.pk, []),
        "members": access.session_members(session=session) if manage else [],
        "links": [(link, _share_url(request, link)) for link in access.session_share_links(session=session)] if manage else [],
        "new_link": new_link,
        "now": timezone.now(),
        "formats": list(exports.FORMATS),
        "live_url": reverse("demo-ai-voice") + f"?session={session.pk}",
        "is_live": selectors.session_live_connection_count(session_id=session.pk) > 0,
        "invite_form": InviteForm(),
        "link_form": ShareLinkForm(),
    }
    response = render(request, "relay/sessions/detail.html", context)
    response["Cache-Control"] = "private, no-cache"
    return response


def _share_url(request: HttpRequest, link: ShareLink) -> str:
    return request.build_absolute_uri(reverse("share-link-open", args=[access.share_link_token(link)]))


def _post(request: HttpRequest, session: Session) -> tuple[HttpResponse | None, str | None]:
    """The owner's actions on the session page; returns a redirect, or the new link's URL to show."""
    action = request.POST.get("action")
    here = reverse("session-detail", args=[session.pk])
    try:
        if action == "rename":
            rooms.session_rename(session=session, title=request.POST.get("title", ""))
            messages.success(request, "Renamed.")
        elif action == "delete":
            rooms.session_delete(session=session)
            messages.success(request, f"Deleted “{session.title or session.pk}” with its transcript.")
            return redirect("my-sessions"), None
        elif action == "invite":
            form = InviteForm(request.POST)
            if form.is_valid():
                member = rooms.member_invite(session=session, username=form.cleaned_data["username"], role=form.cleaned_data["role"], invited_by=request.user)
                messages.success(request, f"{member.user.get_username()} can now {'speak in' if member.role == 'speaker' else 'view'} this session.")
            else:
                messages.error(request, "Give a username and a role.")
        elif action == "remove":
            if rooms.member_remove(session=session, user_id=int(request.POST.get("user", "0") or 0)):
                messages.success(request, "Removed.")
        elif action == "link":
            form = ShareLinkForm(request.POST)
            if form.is_valid():
                seconds = {key: s for key, _, s in EXPIRIES}[form.cleaned_data["expires"]]
                expires_at = timezone.now() + timedelta(seconds=seconds) if seconds else None
                link, _ = rooms.share_link_create(session=session, role=form.cleaned_data["role"], created_by=request.user,
                                                  expires_at=expires_at, label=form.cleaned_data["label"])
                return None, _share_url(request, link)
        elif action == "revoke":
            link = get_object_or_404(ShareLink, pk=int(request.POST.get("link", "0") or 0), session=session)
            rooms.share_link_revoke(link=link)
            messages.success(request, "Link revoked: it admits nobody from now on.")
    except RelayError as exc:
        messages.error(request, exc.description)
    return redirect(here), None


@require_GET
def share_link_open(request: HttpRequest, token: str) -> HttpResponse:
    """A share link: a signed-in user keeps the session in "My sessions"; then the live page."""
    try:
        link = access.share_link_resolve(token=token)
    except ShareLinkInvalid as exc:
        return render(request, "relay/sessions/link_invalid.html", {"reason": exc.description}, status=410)
    rooms.share_link_join(link=link, user=request.user)
    return redirect(reverse("demo-ai-voice") + f"?session={link.session_id}&share={token}")


urlpatterns = [
    path("sessions/", my_sessions, name="my-sessions"),
    re_path(rf"^sessions/(?P<session_id>{SESSION_ID_PATTERN})/$", session_detail, name="session-detail"),
    re_path(r"^s/(?P<token>[A-Za-z0-9_\-:.]{1,512})/$", share_link_open, name="share-link-open"),
]
