"""Accounts for people: sign up, sign in and out, password reset by e-mail, the account page.

Django's own auth views do the work; this module adds the sign-up view (off with
``RELAY_SIGNUP_ENABLED=0``), templates in the demo page's style, and the account page where a
user names their label and creates and revokes their own API tokens (the key is shown once, as
in the admin; only its digest is stored, see :mod:`relay.live.auth`).
"""
from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, reverse_lazy
from django.utils import timezone
from django.views.decorators.http import require_POST

from relay.live import auth
from relay.models import ApiToken
from relay.store import access

#: The page helper B's usage analytics lives at (linked from the account page).
USAGE_PATH = "/account/usage/"


class SignUpForm(UserCreationForm):
    """Username and password, plus an optional e-mail address: without one, no password reset."""

    email = forms.EmailField(required=False, help_text="Optional; needed to reset a forgotten password.")

    class Meta(UserCreationForm.Meta):
        model = get_user_model()
        fields = ("username", "email")


class ProfileForm(forms.ModelForm):
    """The name other people see on your turns (your username when empty)."""

    class Meta:
        model = get_user_model()
        fields = ("first_name", "last_name", "email")


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Say where it is used, e.g. “meeting-bot on the build server”.")


def signup(request: HttpRequest) -> HttpResponse:
    if not settings.RELAY_SIGNUP_ENABLED:
        raise Http404("Sign-up is turned off on this relay; ask its operator for an account.")
    if request.user.is_authenticated:
        return redirect("my-sessions")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome, {user.get_username()}. Start a session from the demo page; it appears here.")
        return redirect("my-sessions")
    return render(request, "relay/accounts/signup.html", {"form": form})


@login_required
def account(request: HttpRequest) -> HttpResponse:
    """Profile and API tokens. A new token's key is in the response once (never stored)."""
    user = request.user
    profile = ProfileForm(instance=user)
    token_form = TokenForm()
    new_key = None
    if request.method == "POST" and request.POST.get("action") == "profile":
        profile = ProfileForm(request.POST, instance=user)
        if profile.is_valid():
            profile.save()
            messages.success(request, f"Saved. Your turns are labelled “{access.display_name(user)}” from your next connection on.")
            return redirect("account")
    elif request.method == "POST" and request.POST.get("action") == "token":
        token_form = TokenForm(request.POST)
        if token_form.is_valid():
            token, new_key = auth.token_create(name=token_form.cleaned_data["name"], user=user)
            token_form = TokenForm()
    tokens = ApiToken.objects.filter(user=user).order_by("-created_at")
    context = {"profile": profile, "token_form": token_form, "tokens": tokens, "new_key": new_key,
               "usage_path": USAGE_PATH, "display_name": access.display_name(user)}
    response = render(request, "relay/accounts/account.html", context)
    if new_key:
        response["Cache-Control"] = "no-store"  # the key must not sit in a cache
    return response


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    if token.revoked_at is None:
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
        messages.success(request, f"Token “{token.name}” revoked: clients using it are refused from now on.")
    return redirect("account")


def _page(template: str) -> dict:
    return {"template_name": f"relay/accounts/{template}.html"}


urlpatterns = [
    path("account/signup/", signup, name="signup"),
    path("account/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True, **_page("login")), name="login"),
    path("account/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("account/password/", auth_views.PasswordChangeView.as_view(success_url=reverse_lazy("account"), **_page("password_change")), name="password_change"),
    path(
        "account/password/reset/",
        auth_views.PasswordResetView.as_view(
            email_template_name="relay/accounts/password_reset_email.txt", subject_template_name="relay/accounts/password_reset_subject.txt",
            **_page("password_reset_form"),
        ),
        name="password_reset",
    ),
    path("account/password/reset/sent/", auth_views.PasswordResetDoneView.as_view(**_page("password_reset_done")), name="password_reset_done"),
    path("account/password/reset/<uidb64>/<token>/", auth_views.PasswordResetConfirmView.as_view(**_page("password_reset_confirm")),
         name="password_reset_confirm"),
    path("account/password/reset/done/", auth_views.PasswordResetCompleteView.as_view(**_page("password_reset_complete")),
         name="password_reset_complete"),
    path("account/", account, name="account"),
    path("account/tokens/<int:token_id>/revoke/", token_revoke, name="token-revoke"),
]
