"""The REST API (``/api/v1/``). Access follows :mod:`relay.store.access`, the rules the WebSocket
uses: reading a session needs a role in it, changing it (rename, end, delete, members, share
links) needs ``owner``. Writes go through the same services as the pages and the admin."""
from __future__ import annotations

from datetime import date
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, pagination, serializers as drf_serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from relay.api import serializers, usage, webhooks
from relay.api.models import WebhookDelivery, WebhookEndpoint
from relay.exceptions import Forbidden, InvalidParameter
from relay.flux.constants import SESSION_ID_PATTERN
from relay.models import ApiToken, Connection, Session, ShareLink
from relay.ops import exports
from relay.store import access, rooms, selectors, services


class Pages(pagination.PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 200

    def get_page_size(self, request: Request) -> int:
        self.page_size = settings.RELAY_API_PAGE_SIZE
        return super().get_page_size(request)


ERRORS = {
    401: OpenApiResponse(description="UNAUTHORIZED: no valid API token or login."),
    403: OpenApiResponse(description="FORBIDDEN: no role in the session, or one too weak for this."),
    404: OpenApiResponse(description="NOT_FOUND."),
}


def turns_as_dicts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn records (``relay.store.turns.turn_record``) as the API and webhooks show them, with
    each speaker's display name (one query per page)."""
    ids = {r["connection_id"] for r in records if r["connection_id"]}
    names = dict(Connection.objects.filter(pk__in=ids).exclude(speaker_name="").values_list("pk", "speaker_name")) if ids else {}
    out = []
    for r in records:
        event = r["event"]
        out.append({
            "index": r["index"],
            "transcript": event.transcript,
            "words": [w.as_dict() for w in event.words],
            "audio_window_start": event.audio_window_start,
            "audio_window_end": event.audio_window_end,
            "end_of_turn_confidence": event.end_of_turn_confidence,
            "trigger": event.trigger,
            "languages": list(event.languages or ()),
            "speaker": names.get(r["connection_id"]) or r["speaker"],
            "connection_id": str(r["connection_id"]) if r["connection_id"] else None,
            "created_at": r["created_at"],
        })
    return out


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be an integer; got {raw[:32]!r}.") from None
    if not low <= value <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}; got {value}.")
    return value


# --- sessions -------------------------------------------------------------------------------------
@extend_schema_view(
    list=extend_schema(summary="Your sessions (owned and joined), newest first", parameters=[
        OpenApiParameter("q", str, description="Words from the title or the transcript (PostgreSQL: full-text, websearch syntax)."),
    ]),
    retrieve=extend_schema(summary="One session", responses={200: serializers.SessionSerializer, **ERRORS}),
    partial_update=extend_schema(summary="Rename (owner)", request=serializers.SessionUpdateSerializer, responses={200: serializers.SessionSerializer, **ERRORS}),
    destroy=extend_schema(summary="Delete with its history (owner); live connections are ended first", responses={204: None, **ERRORS}),
)
class SessionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.SessionSerializer
    pagination_class = Pages
    lookup_value_regex = SESSION_ID_PATTERN
    queryset = Session.objects.none()
    http_method_names = ["get", "patch", "delete", "post", "head", "options"]

    def get_queryset(self) -> QuerySet[Session]:
        return access.sessions_for_user(user=self.request.user, query=self.request.query_params.get("q", "")).select_related("owner")

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "user": self.request.user}

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        context = {**self.get_serializer_context(), "participants": access.session_participants(session_ids=[s.pk for s in page])}
        return self.get_paginated_response(serializers.SessionSerializer(page, many=True, context=context).data)

    def _session(self, *, manage: bool = False) -> tuple[Session, str]:
        session = get_object_or_404(Session.objects.select_related("owner"), pk=self.kwargs["pk"])
        role = access.session_role(user=self.request.user, session=session)
        if not access.can_read(role):
            raise Forbidden("You have no role in this session.")
        if manage and not access.can_manage(role):
            raise Forbidden(f"Only the session's owner may do this (your role: {role}).")
        return session, role

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        session, role = self._session()
        return Response(serializers.SessionSerializer(session, context={**self.get_serializer_context(), "roles": {session.pk: role}}).data)

    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        session, role = self._session(manage=True)
        data = serializers.SessionUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        rooms.session_rename(session=session, title=data.validated_data["title"])
        return Response(serializers.SessionSerializer(session, context={**self.get_serializer_context(), "roles": {session.pk: role}}).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        session, _ = self._session(manage=True)
        services.session_end(session_id=session.pk, reason="Deleted by its owner")
        rooms.session_delete(session=session)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="End: close every live connection and refuse new ones (owner)", request=serializers.SessionEndSerializer,
                   responses={200: serializers.SessionSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def end(self, request: Request, pk: str) -> Response:
        session, role = self._session(manage=True)
        data = serializers.SessionEndSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.session_end(session_id=session.pk, reason=data.validated_data["reason"])
        session.refresh_from_db()
        return Response(serializers.SessionSerializer(session, context={**self.get_serializer_context(), "roles": {session.pk: role}}).data)

    @extend_schema(summary="Finished turns, oldest first (keyset paging)", parameters=[
        OpenApiParameter("since", int, description="Only turns with a larger index (as since= on the WebSocket); default: from the start."),
        OpenApiParameter("limit", int, description=f"Page size, 1-1000 (default RELAY_API_PAGE_SIZE)."),
    ], responses={200: serializers.TurnPageSerializer, **ERRORS})
    @action(detail=True, methods=["get"])
    def turns(self, request: Request, pk: str) -> Response:
        session, _ = self._session()
        since = _int_param(request, "since", -1, -1, 2**31 - 1)
        limit = _int_param(request, "limit", settings.RELAY_API_PAGE_SIZE, 1, 1000)
        records = selectors.turn_page(session_id=session.pk, after_index=since, limit=limit)
        last = records[-1]["index"] if records else None
        next_url = None
        if len(records) == limit:
            next_url = request.build_absolute_uri(reverse("relay_api:session-turns", args=[session.pk]) + "?" + urlencode({"since": last, "limit": limit}))
        return Response({"results": turns_as_dicts(records), "last_index": last, "next": next_url})

    @extend_schema(summary="The transcript as a file (txt, json, srt, vtt), as the page's downloads", parameters=[
        OpenApiParameter("fmt", str, enum=[*exports.FORMATS], description="Default txt."),
    ], responses={(200, "text/plain"): OpenApiTypes.STR, (200, "application/json"): OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True, methods=["get"])
    def transcript(self, request: Request, pk: str) -> StreamingHttpResponse:
        session, _ = self._session()
        fmt = request.query_params.get("fmt", "txt")
        if fmt not in exports.FORMATS:
            raise InvalidParameter(f"fmt must be one of {', '.join(exports.FORMATS)}.")
        # The async generator: under daphne the file streams page by page, as the export view's does.
        response = StreamingHttpResponse(exports.aexport_chunks(session=session, fmt=fmt), content_type=exports.FORMATS[fmt])
        response["Content-Disposition"] = f'inline; filename="{exports.export_filename(session.pk, fmt)}"'
        return response

    # -- members and share links (owner manages; members may list members) -----------------------
    @extend_schema(methods=["get"], summary="Members and their roles", responses={200: serializers.MemberSerializer(many=True), **ERRORS})
    @extend_schema(methods=["post"], summary="Invite a user by username, or change their role (owner)",
                   request=serializers.MemberInviteSerializer, responses={201: serializers.MemberSerializer, **ERRORS})
    @action(detail=True, methods=["get", "post"], pagination_class=None)
    def members(self, request: Request, pk: str) -> Response:
        if request.method == "GET":
            session, _ = self._session()
            return Response(serializers.MemberSerializer(access.session_members(session=session), many=True).data)
        session, _ = self._session(manage=True)
        data = serializers.MemberInviteSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = rooms.member_invite(session=session, invited_by=request.user, **data.validated_data)
        return Response(serializers.MemberSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Remove a member (owner)", responses={204: None, **ERRORS})
    @action(detail=True, methods=["delete"], url_path=r"members/(?P<user_id>[0-9]+)", url_name="member")
    def member(self, request: Request, pk: str, user_id: str) -> Response:
        session, _ = self._session(manage=True)
        if not rooms.member_remove(session=session, user_id=int(user_id)):
            return Response(status=status.HTTP_404_NOT_FOUND, data={"type": "Error", "code": "NOT_FOUND", "description": "No such member."})
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(methods=["get"], summary="Share links (owner)", responses={200: serializers.ShareLinkSerializer(many=True), **ERRORS})
    @extend_schema(methods=["post"], summary="Make a share link with a role and an optional expiry (owner); the link is shown once",
                   request=serializers.ShareLinkCreateSerializer, responses={201: serializers.ShareLinkCreatedSerializer, **ERRORS})
    @action(detail=True, methods=["get", "post"], url_path="share-links", url_name="share-links", pagination_class=None)
    def share_links(self, request: Request, pk: str) -> Response:
        session, _ = self._session(manage=True)
        if request.method == "GET":
            return Response(serializers.ShareLinkSerializer(access.session_share_links(session=session), many=True).data)
        data = serializers.ShareLinkCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        link, share = rooms.share_link_create(session=session, created_by=request.user, **data.validated_data)
        body = dict(serializers.ShareLinkSerializer(link).data)
        body["share"] = share
        body["url"] = request.build_absolute_uri(reverse("share-link-open", args=[share]))
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Revoke a share link (owner); members who joined by it lose their role", responses={204: None, **ERRORS})
    @action(detail=True, methods=["delete"], url_path=r"share-links/(?P<link_id>[0-9]+)", url_name="share-link")
    def share_link(self, request: Request, pk: str, link_id: str) -> Response:
        session, _ = self._session(manage=True)
        link = get_object_or_404(ShareLink, pk=int(link_id), session=session)
        rooms.share_link_revoke(link=link)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- API tokens -----------------------------------------------------------------------------------
@extend_schema_view(
    list=extend_schema(summary="Your API tokens (keys are never shown again)"),
    retrieve=extend_schema(summary="One of your API tokens"),
    create=extend_schema(summary="Create a token; the response has its key, shown once", responses={201: serializers.TokenCreatedSerializer}),
    destroy=extend_schema(summary="Revoke a token: it stops working at once (WebSocket and API)", responses={204: None}),
)
class TokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.TokenSerializer
    pagination_class = Pages
    queryset = ApiToken.objects.none()
    lookup_value_regex = "[0-9]+"

    def get_queryset(self) -> QuerySet[ApiToken]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return ApiToken.objects.none()
        return ApiToken.objects.filter(user=self.request.user).order_by("-created_at")

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        from relay.live.auth import token_create

        data = serializers.TokenSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        token, key = token_create(name=data.validated_data["name"], user=request.user)
        body = dict(serializers.TokenSerializer(token).data)
        body["key"] = key
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: ApiToken) -> None:
        ApiToken.objects.filter(pk=instance.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


# --- webhooks -------------------------------------------------------------------------------------
@extend_schema_view(
    list=extend_schema(summary="Your webhook endpoints"),
    retrieve=extend_schema(summary="One webhook endpoint"),
    create=extend_schema(summary="Add an endpoint; the response has its signing secret, shown once",
                         responses={201: serializers.WebhookEndpointCreatedSerializer}),
    partial_update=extend_schema(summary='Change it; {"is_active": true} turns a disabled endpoint back on'),
    update=extend_schema(summary="Replace it"),
    destroy=extend_schema(summary="Delete it with its deliveries"),
)
class WebhookViewSet(viewsets.ModelViewSet):
    serializer_class = serializers.WebhookEndpointSerializer
    pagination_class = Pages
    queryset = WebhookEndpoint.objects.none()
    lookup_value_regex = "[0-9]+"

    def get_queryset(self) -> QuerySet[WebhookEndpoint]:
        if getattr(self, "swagger_fake_view", False):
            return WebhookEndpoint.objects.none()
        return WebhookEndpoint.objects.filter(user=self.request.user).order_by("-created_at")

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "user": self.request.user}

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.get_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        endpoint = webhooks.endpoint_create(user=request.user, **data.validated_data)
        body = dict(serializers.WebhookEndpointSerializer(endpoint, context=self.get_serializer_context()).data)
        body["secret"] = endpoint.secret
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: drf_serializers.BaseSerializer) -> None:
        was_active = serializer.instance.is_active
        endpoint = serializer.save()
        if endpoint.is_active and not was_active:
            webhooks.endpoint_enable(endpoint=endpoint)

    @extend_schema(summary="Send a ping event now, to test the receiver", request=None, responses={202: serializers.WebhookDeliverySerializer})
    @action(detail=True, methods=["post"])
    def ping(self, request: Request, pk: str) -> Response:
        delivery = webhooks.ping_enqueue(endpoint=self.get_object())
        return Response(serializers.WebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)


@extend_schema_view(
    list=extend_schema(summary="An endpoint's deliveries, newest first", parameters=[
        OpenApiParameter("status", str, enum=[s for s, _ in WebhookDelivery.STATUSES]),
        OpenApiParameter("event", str),
    ]),
    retrieve=extend_schema(summary="One delivery, with its body"),
)
class DeliveryViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = serializers.WebhookDeliverySerializer
    pagination_class = Pages
    queryset = WebhookDelivery.objects.none()
    lookup_value_regex = "[0-9a-f-]{36}"

    def get_queryset(self) -> QuerySet[WebhookDelivery]:
        if getattr(self, "swagger_fake_view", False):
            return WebhookDelivery.objects.none()
        endpoint = get_object_or_404(WebhookEndpoint, pk=self.kwargs["webhook_pk"], user=self.request.user)
        rows = WebhookDelivery.objects.filter(endpoint=endpoint).order_by("-created_at")
        for field in ("status", "event"):
            if self.request.query_params.get(field):
                rows = rows.filter(**{field: self.request.query_params[field]})
        return rows

    @extend_schema(summary="Send it again now (same body, fresh signature), with a new round of retries", request=None,
                   responses={202: serializers.WebhookDeliverySerializer})
    @action(detail=True, methods=["post"])
    def redeliver(self, request: Request, webhook_pk: str, pk: str) -> Response:
        delivery = webhooks.delivery_redeliver(delivery=self.get_object())
        return Response(serializers.WebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)


# --- usage ----------------------------------------------------------------------------------------
def _date_param(request: Request, name: str, default: date) -> date:
    raw = request.query_params.get(name)
    if not raw:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be a date like 2026-01-31; got {raw[:32]!r}.") from None


@extend_schema(summary="Your usage: audio minutes, sessions, connections, turns, errors; per day and per API token", parameters=[
    OpenApiParameter("start", OpenApiTypes.DATE, description="First day (default: 29 days before end)."),
    OpenApiParameter("end", OpenApiTypes.DATE, description="Last day (default: today, UTC)."),
    OpenApiParameter("token", int, description="Only this API token (one of yours)."),
], responses={200: serializers.UsageSerializer, **ERRORS})
class UsageView(viewsets.ViewSet):
    def list(self, request: Request) -> Response:
        default = usage.Period.last_days(30)
        end = _date_param(request, "end", default.end)
        start = _date_param(request, "start", end - (default.end - default.start))
        if start > end:
            raise InvalidParameter("start must not be after end.")
        token_id = None
        if request.query_params.get("token"):
            token_id = _int_param(request, "token", 0, 1, 2**62)
            get_object_or_404(ApiToken, pk=token_id, user=request.user)
        data = usage.usage_for_user(user=request.user, period=usage.Period(start=start, end=end), token_id=token_id)
        return Response(serializers.UsageSerializer(data).data)
