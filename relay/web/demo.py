"""The demo page (``/demo/ai-voice/``): talk, see turns appear, share the session, reconnect.

The page is plain ES modules and CSS served as static files, with no build step. Modules import
each other by relative URL; an import map maps those plain URLs to whatever names the static
storage produced (hashed ones after ``collectstatic`` in production), so cache-busting works
without a bundler.
"""
from __future__ import annotations

import json

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.templatetags.static import PrefixNode, static
from django.urls import reverse
from django.views.decorators.http import require_GET
from django.views.generic import RedirectView

#: Every module the page imports (the entry module, app.js, is loaded by the template).
MODULES = ("app.js", "capture.js", "connection.js", "subtitles.js", "transcript.js")
WS_PATH = "/v2/listen"
AUDIO_BUFFER_SECONDS = 30


def import_map() -> str:
    base = PrefixNode.handle_simple("STATIC_URL")
    imports = {f"{base}relay/{name}": static(f"relay/{name}") for name in MODULES}
    # The map sits inside <script>; no module path contains "<", but never let one end the tag.
    return json.dumps({"imports": imports}, indent=1).replace("<", "\\u003c")


@require_GET
def ai_voice(request: HttpRequest) -> HttpResponse:
    config = {
        "wsPath": WS_PATH,
        "workletUrl": static("relay/pcm-worklet.js"),
        "engine": settings.RELAY_ENGINE,
        "bufferSeconds": AUDIO_BUFFER_SECONDS,
        "signedIn": request.user.is_authenticated,
        "sessionsPath": reverse("my-sessions"),
    }
    context = {
        "config": config,
        "import_map": import_map(),
        "ws_path": WS_PATH,
        "page_path": reverse("demo-ai-voice"),
    }
    return render(request, "relay/demo.html", context)


#: ``/`` -> the demo page, keeping ``?session=`` so old links still open their session.
root = RedirectView.as_view(pattern_name="demo-ai-voice", permanent=False, query_string=True)
