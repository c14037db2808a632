"""The REST API: every endpoint, token and login auth, the role rules, errors with stable codes,
and the OpenAPI schema (validated with openapi-spec-validator)."""
from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
import yaml
from django.contrib.auth.models import User
from django.utils import timezone
from openapi_spec_validator import validate
from rest_framework.test import APIClient

from relay.api.models import UsageDaily, WebhookDelivery, WebhookEndpoint
from relay.live.auth import token_create
from relay.models import ApiToken, Membership, Session, ShareLink
from relay.store import access
from tests.support import histories

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return User.objects.create_user("olive", email="olive@example.com", password="pw-olive-123")


@pytest.fixture
def other():
    return User.objects.create_user("oscar", password="pw-oscar-123")


def token_client(user, name: str = "ci") -> tuple[APIClient, ApiToken, str]:
    token, key = token_create(name=name, user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client, token, key


def history(sid: str, owner=None, texts=("hello there", "second turn", "third one")) -> Session:
    s = histories.session(sid, owner=owner, created=timezone.now() - timedelta(minutes=5))
    c = histories.connection(s, opened=s.created_at, duration=30)
    histories.turns(s, c, list(texts))
    return s


def error(response) -> str:
    body = response.json()
    assert body["type"] == "Error" and body["description"], body
    return body["code"]


# --- authentication ---------------------------------------------------------------------------
def test_no_credentials_is_401_unauthorized_with_a_challenge():
    response = APIClient().get("/api/v1/sessions/")
    assert response.status_code == 401 and error(response) == "UNAUTHORIZED"
    assert response["WWW-Authenticate"].startswith("Token")


@pytest.mark.parametrize("scheme", ["Token", "Bearer", "bearer"])
def test_token_and_bearer_schemes_sign_in_as_the_tokens_user(owner, scheme):
    _, key = token_create(name="x", user=owner)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{scheme} {key}")
    history("mine", owner=owner)
    response = client.get("/api/v1/sessions/")
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["results"]] == ["mine"]
    assert ApiToken.objects.get(prefix=key[:12]).last_used_at is not None
    assert set(client.get("/api/v1/").json()) == {"sessions", "tokens", "webhooks", "usage"}


def test_unknown_revoked_and_userless_tokens_are_refused(owner):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer rly_not-a-key")
    assert client.get("/api/v1/sessions/").status_code == 401
    token, key = token_create(name="old", user=owner)
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    response = client.get("/api/v1/sessions/")
    assert response.status_code == 401 and "revoked" in response.json()["description"]
    _, key = token_create(name="service", user=None)
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert error(client.get("/api/v1/sessions/")) == "UNAUTHORIZED"


def test_login_session_works_and_needs_csrf_for_writes(owner):
    history("mine", owner=owner)
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="olive", password="pw-olive-123")
    assert client.get("/api/v1/sessions/mine/").status_code == 200
    response = client.patch("/api/v1/sessions/mine/", {"title": "x"}, format="json")
    assert response.status_code == 403 and error(response) == "FORBIDDEN" and "CSRF" in response.json()["description"]
    # A token needs no CSRF token (it is not sent by browsers on their own).
    client, _, _ = token_client(owner)
    assert client.patch("/api/v1/sessions/mine/", {"title": "x"}, format="json").status_code == 200


# --- sessions -----------------------------------------------------------------------------------
def test_list_is_owned_and_joined_newest_first_with_search_and_paging(owner, other, settings):
    settings.RELAY_API_PAGE_SIZE = 2
    history("a-old", owner=owner, texts=["apples and pears"])
    Session.objects.filter(pk="a-old").update(created_at=timezone.now() - timedelta(days=2))
    history("b-mid", owner=owner, texts=["bananas"])
    Session.objects.filter(pk="b-mid").update(created_at=timezone.now() - timedelta(days=1))
    joined = history("c-joined", owner=other, texts=["cherries"])
    Membership.objects.create(session=joined, user=owner, role="viewer")
    history("d-foreign", owner=other, texts=["apples too"])
    client, _, _ = token_client(owner)
    first = client.get("/api/v1/sessions/").json()
    assert first["count"] == 3 and [s["id"] for s in first["results"]] == ["c-joined", "b-mid"]
    assert first["results"][0]["role"] == "viewer" and first["results"][1]["role"] == "owner"
    assert first["results"][1]["turn_count"] == 1 and first["results"][1]["owner"] == "olive"
    second = client.get(first["next"]).json()
    assert [s["id"] for s in second["results"]] == ["a-old"] and second["next"] is None
    found = client.get("/api/v1/sessions/", {"q": "apples"}).json()
    assert [s["id"] for s in found["results"]] == ["a-old"]  # d-foreign matches but is not theirs


@pytest.mark.django_db(transaction=True)  # the transcript streams from an async generator whose reads run on other threads
def test_detail_turns_and_transcript_by_token(owner):
    """An API token fetches its own session's transcript (the issue's "Done when")."""
    history("mine", owner=owner)
    client, _, _ = token_client(owner)
    detail = client.get("/api/v1/sessions/mine/").json()
    assert detail["role"] == "owner" and detail["turn_count"] == 3 and detail["is_live"] is False
    assert detail["urls"]["turns"].endswith("/api/v1/sessions/mine/turns/")
    turns = client.get("/api/v1/sessions/mine/turns/").json()
    assert [t["transcript"] for t in turns["results"]] == ["hello there", "second turn", "third one"]
    assert turns["results"][0]["words"][0]["word"] == "hello" and turns["last_index"] == 2
    response = client.get("/api/v1/sessions/mine/transcript/", {"fmt": "txt"})
    assert response.status_code == 200
    assert b"".join(response).decode() == "hello there\nsecond turn\nthird one\n"
    response = client.get("/api/v1/sessions/mine/transcript/", {"fmt": "json"})
    assert [t["transcript"] for t in json.loads(b"".join(response))["turns"]] == ["hello there", "second turn", "third one"]
    assert error(client.get("/api/v1/sessions/mine/transcript/", {"fmt": "doc"})) == "INVALID_PARAMETER"


def test_turns_are_keyset_paged_with_since(owner):
    history("mine", owner=owner, texts=[f"turn {i}" for i in range(5)])
    client, _, _ = token_client(owner)
    page = client.get("/api/v1/sessions/mine/turns/", {"limit": 2}).json()
    assert [t["index"] for t in page["results"]] == [0, 1] and "since=1" in page["next"]
    page = client.get(page["next"]).json()
    assert [t["index"] for t in page["results"]] == [2, 3]
    page = client.get("/api/v1/sessions/mine/turns/", {"since": 3}).json()
    assert [t["index"] for t in page["results"]] == [4] and page["next"] is None
    response = client.get("/api/v1/sessions/mine/turns/", {"since": "x"})
    assert response.status_code == 400 and error(response) == "INVALID_PARAMETER"
    assert client.get("/api/v1/sessions/mine/turns/", {"limit": 0}).status_code == 400


def test_role_rules_read_write_and_strangers(owner, other):
    s = history("room", owner=owner)
    stranger, _, _ = token_client(other)
    response = stranger.get("/api/v1/sessions/room/turns/")
    assert response.status_code == 403 and error(response) == "FORBIDDEN"
    assert error(stranger.get("/api/v1/sessions/nope/")) == "NOT_FOUND"
    Membership.objects.create(session=s, user=other, role="viewer")
    assert stranger.get("/api/v1/sessions/room/turns/").status_code == 200
    assert stranger.get("/api/v1/sessions/room/members/").status_code == 200
    for method, path, body in [
        ("patch", "/api/v1/sessions/room/", {"title": "mine now"}),
        ("post", "/api/v1/sessions/room/end/", {}),
        ("delete", "/api/v1/sessions/room/", None),
        ("post", "/api/v1/sessions/room/members/", {"username": "olive", "role": "viewer"}),
        ("get", "/api/v1/sessions/room/share-links/", None),
        ("post", "/api/v1/sessions/room/share-links/", {"role": "viewer"}),
    ]:
        response = getattr(stranger, method)(path, body, format="json")
        assert response.status_code == 403 and error(response) == "FORBIDDEN", (method, path)
    Membership.objects.filter(session=s, user=other).update(role="speaker")
    assert stranger.patch("/api/v1/sessions/room/", {"title": "x"}, format="json").status_code == 403
    assert Session.objects.get(pk="room").title == ""


def test_anonymous_sessions_are_readable_by_id_as_on_the_websocket(owner):
    history("anon", owner=None)
    client, _, _ = token_client(owner)
    body = client.get("/api/v1/sessions/anon/").json()
    assert body["owner"] is None and body["role"] == access.session_role(user=owner, session=Session.objects.get(pk="anon"))
    assert client.get("/api/v1/sessions/anon/turns/").status_code == 200
    assert client.get("/api/v1/sessions/").json()["count"] == 0  # not listed: not theirs


def test_rename_end_and_delete(owner):
    history("mine", owner=owner)
    client, _, _ = token_client(owner)
    assert client.patch("/api/v1/sessions/mine/", {"title": "Weekly call"}, format="json").json()["title"] == "Weekly call"
    assert error(client.patch("/api/v1/sessions/mine/", {"title": "x" * 201}, format="json")) == "INVALID_PARAMETER"
    ended = client.post("/api/v1/sessions/mine/end/", {"reason": "done"}, format="json").json()
    assert ended["ended_at"] is not None and ended["end_reason"] == "done"
    assert client.delete("/api/v1/sessions/mine/").status_code == 204
    assert not Session.objects.filter(pk="mine").exists()
    assert client.put("/api/v1/sessions/x/", {}, format="json").status_code == 405


def test_members_invite_list_remove(owner, other):
    history("room", owner=owner)
    client, _, _ = token_client(owner)
    response = client.post("/api/v1/sessions/room/members/", {"username": "oscar", "role": "viewer"}, format="json")
    assert response.status_code == 201 and response.json()["username"] == "oscar" and response.json()["role"] == "viewer"
    assert access.session_role(user=other, session=Session.objects.get(pk="room")) == "viewer"
    assert [m["username"] for m in client.get("/api/v1/sessions/room/members/").json()] == ["oscar"]
    assert error(client.post("/api/v1/sessions/room/members/", {"username": "nobody", "role": "viewer"}, format="json")) == "INVALID_PARAMETER"
    assert error(client.post("/api/v1/sessions/room/members/", {"username": "oscar", "role": "owner"}, format="json")) == "INVALID_PARAMETER"
    assert client.delete(f"/api/v1/sessions/room/members/{other.pk}/").status_code == 204
    assert client.delete(f"/api/v1/sessions/room/members/{other.pk}/").status_code == 404
    assert access.session_role(user=other, session=Session.objects.get(pk="room")) is None


def test_share_links_create_list_revoke(owner):
    history("room", owner=owner)
    client, _, _ = token_client(owner)
    expires = (timezone.now() + timedelta(hours=1)).isoformat()
    made = client.post("/api/v1/sessions/room/share-links/", {"role": "viewer", "expires_at": expires, "label": "team"}, format="json").json()
    assert made["usable"] and made["role"] == "viewer" and made["url"].endswith(f"/s/{made['share']}/")
    assert access.share_link_resolve(token=made["share"], session_id="room").pk == made["id"]
    listed = client.get("/api/v1/sessions/room/share-links/").json()
    assert [link["id"] for link in listed] == [made["id"]] and "share" not in listed[0]
    past = (timezone.now() - timedelta(hours=1)).isoformat()
    assert error(client.post("/api/v1/sessions/room/share-links/", {"role": "viewer", "expires_at": past}, format="json")) == "INVALID_PARAMETER"
    assert client.delete(f"/api/v1/sessions/room/share-links/{made['id']}/").status_code == 204
    assert ShareLink.objects.get(pk=made["id"]).revoked_at is not None
    assert client.get("/api/v1/sessions/room/share-links/").json()[0]["usable"] is False


# --- tokens -------------------------------------------------------------------------------------
def test_tokens_create_list_revoke(owner, other):
    client, own, _ = token_client(owner)
    made = client.post("/api/v1/tokens/", {"name": "backend"}, format="json")
    assert made.status_code == 201 and made.json()["key"].startswith("rly_") and made.json()["prefix"] == made.json()["key"][:12]
    listed = client.get("/api/v1/tokens/").json()["results"]
    assert {t["name"] for t in listed} == {"ci", "backend"} and all("key" not in t for t in listed)
    token_create(name="theirs", user=other)
    assert client.get(f"/api/v1/tokens/{ApiToken.objects.get(name='theirs').pk}/").status_code == 404
    assert client.delete(f"/api/v1/tokens/{made.json()['id']}/").status_code == 204
    new = APIClient()
    new.credentials(HTTP_AUTHORIZATION=f"Token {made.json()['key']}")
    assert new.get("/api/v1/tokens/").status_code == 401
    assert error(client.post("/api/v1/tokens/", {}, format="json")) == "INVALID_PARAMETER"


# --- webhooks -----------------------------------------------------------------------------------
def test_webhooks_crud_secret_shown_once_and_token_scope(owner, other):
    client, own, _ = token_client(owner)
    made = client.post("/api/v1/webhooks/", {"url": "https://example.com/hook", "events": ["session.ended"], "token": own.pk}, format="json")
    assert made.status_code == 201, made.json()
    body = made.json()
    assert body["secret"].startswith("whsec_") and body["token"] == own.pk and body["is_active"]
    detail = client.get(f"/api/v1/webhooks/{body['id']}/").json()
    assert "secret" not in detail and detail["events"] == ["session.ended"]
    theirs, _ = token_create(name="theirs", user=other)
    assert error(client.post("/api/v1/webhooks/", {"url": "https://e.com/", "events": ["session.ended"], "token": theirs.pk}, format="json")) == "INVALID_PARAMETER"
    assert error(client.post("/api/v1/webhooks/", {"url": "not a url", "events": ["session.ended"]}, format="json")) == "INVALID_PARAMETER"
    assert error(client.post("/api/v1/webhooks/", {"url": "https://e.com/", "events": ["session.started"]}, format="json")) == "INVALID_PARAMETER"
    patched = client.patch(f"/api/v1/webhooks/{body['id']}/", {"events": ["turn.finished", "session.ended"]}, format="json").json()
    assert patched["events"] == ["session.ended", "turn.finished"]
    replaced = client.put(f"/api/v1/webhooks/{body['id']}/", {"url": "https://example.com/other", "events": ["session.ended"], "token": None,
                                                              "description": "backend", "is_active": True}, format="json").json()
    assert replaced["url"] == "https://example.com/other" and replaced["token"] is None and replaced["description"] == "backend"
    assert WebhookEndpoint.objects.get(pk=body["id"]).secret == body["secret"]  # kept unless one is sent
    stranger, _, _ = token_client(other)
    assert stranger.get(f"/api/v1/webhooks/{body['id']}/").status_code == 404
    assert client.delete(f"/api/v1/webhooks/{body['id']}/").status_code == 204


def test_disabled_endpoint_shows_the_flag_and_comes_back_on(owner):
    client, _, _ = token_client(owner)
    endpoint = WebhookEndpoint.objects.create(user=owner, url="https://e.com/", secret="s" * 20, events=["session.ended"], is_active=False,
                                              disabled_at=timezone.now(), disabled_reason="Disabled after 20 failed attempts", consecutive_failures=20)
    body = client.get(f"/api/v1/webhooks/{endpoint.pk}/").json()
    assert body["is_active"] is False and body["disabled_at"] and "20 failed" in body["disabled_reason"]
    body = client.patch(f"/api/v1/webhooks/{endpoint.pk}/", {"is_active": True}, format="json").json()
    endpoint.refresh_from_db()
    assert endpoint.is_active and endpoint.disabled_at is None and endpoint.consecutive_failures == 0


def test_deliveries_list_filter_detail_redeliver_and_ping(owner, other):
    client, _, _ = token_client(owner)
    endpoint = WebhookEndpoint.objects.create(user=owner, url="https://e.com/", secret="s" * 20, events=["session.ended"])
    failed = WebhookDelivery.objects.create(endpoint=endpoint, event="session.ended", event_key="k1", session_id="x", payload={"a": 1},
                                            status="failed", attempts=8, last_error="HTTP 500")
    WebhookDelivery.objects.create(endpoint=endpoint, event="session.ended", event_key="k2", session_id="y", payload={}, status="delivered")
    base = f"/api/v1/webhooks/{endpoint.pk}/deliveries/"
    assert client.get(base).json()["count"] == 2
    only = client.get(base, {"status": "failed"}).json()["results"]
    assert [d["id"] for d in only] == [str(failed.pk)] and only[0]["last_error"] == "HTTP 500"
    assert client.get(f"{base}{failed.pk}/").json()["payload"] == {"a": 1}
    again = client.post(f"{base}{failed.pk}/redeliver/")
    assert again.status_code == 202 and again.json()["status"] == "pending" and again.json()["attempts"] == 0
    ping = client.post(f"/api/v1/webhooks/{endpoint.pk}/ping/")
    assert ping.status_code == 202 and ping.json()["event"] == "ping"
    stranger, _, _ = token_client(other)
    assert stranger.get(base).status_code == 404
    assert stranger.post(f"{base}{failed.pk}/redeliver/").status_code == 404


# --- usage --------------------------------------------------------------------------------------
def test_usage_totals_per_day_and_per_token(owner, other):
    client, token, _ = token_client(owner)
    today = timezone.localdate()
    UsageDaily.objects.create(day=today, kind="user", user=owner, audio_seconds=120, sessions=2, connections=3, turns=10, errors=1)
    UsageDaily.objects.create(day=today - timedelta(days=1), kind="user", user=owner, audio_seconds=60, sessions=1, connections=1, turns=4)
    UsageDaily.objects.create(day=today, kind="token", token=token, audio_seconds=60, sessions=1, connections=1, turns=5)
    UsageDaily.objects.create(day=today, kind="user", user=other, audio_seconds=999, sessions=9, connections=9, turns=99)
    body = client.get("/api/v1/usage/").json()
    assert body["totals"] == {"audio_minutes": 3.0, "sessions": 3, "connections": 4, "turns": 14, "errors": 1}
    assert [d["day"] for d in body["days"]] == [today.isoformat(), (today - timedelta(days=1)).isoformat()]
    assert body["tokens"] == [{"token_id": token.pk, "token_name": "ci", "audio_minutes": 1.0, "sessions": 1, "connections": 1, "turns": 5, "errors": 0}]
    only_token = client.get("/api/v1/usage/", {"token": token.pk}).json()
    assert only_token["totals"]["turns"] == 5
    yesterday = client.get("/api/v1/usage/", {"start": (today - timedelta(days=1)).isoformat(), "end": (today - timedelta(days=1)).isoformat()}).json()
    assert yesterday["totals"]["turns"] == 4
    assert error(client.get("/api/v1/usage/", {"start": "yesterday"})) == "INVALID_PARAMETER"
    theirs, _ = token_create(name="theirs", user=other)
    assert client.get("/api/v1/usage/", {"token": theirs.pk}).status_code == 404


# --- schema and docs ----------------------------------------------------------------------------
def test_openapi_schema_validates_and_lists_every_endpoint():
    response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    validate(schema)  # openapi-spec-validator: raises on an invalid OpenAPI 3 document
    assert schema["openapi"].startswith("3.")
    paths = set(schema["paths"])
    for path in ["/api/v1/sessions/", "/api/v1/sessions/{id}/", "/api/v1/sessions/{id}/end/", "/api/v1/sessions/{id}/turns/",
                 "/api/v1/sessions/{id}/transcript/", "/api/v1/sessions/{id}/members/", "/api/v1/sessions/{id}/share-links/",
                 "/api/v1/tokens/", "/api/v1/webhooks/", "/api/v1/webhooks/{webhook_pk}/deliveries/{id}/redeliver/", "/api/v1/usage/"]:
        assert path in paths, path
    assert schema["components"]["securitySchemes"]["relayToken"]["scheme"] == "bearer"


def test_docs_pages_use_local_assets():
    for path in ("/api/docs/",):
        response = APIClient().get(path)
        assert response.status_code == 200
        html = response.content.decode()
        assert "/static/drf_spectacular_sidecar/" in html and "cdn.jsdelivr" not in html and "unpkg" not in html
        assets = re.findall(r'(/static/drf_spectacular_sidecar/[^"\']+\.js)', html)
        assert assets
        for asset in assets:
            served = APIClient().get(asset)
            assert served.status_code == 200 and len(b"".join(served.streaming_content if served.streaming else [served.content])) > 10_000, asset
