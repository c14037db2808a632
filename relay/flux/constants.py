"""Flux v2 facts the relay relies on, each defined once.

Flux's own defaults (what a stream gets when the client sets nothing), the message types each
side sends, and the alphabet of the relay's session ids.
"""
from __future__ import annotations

import re

#: The model a stream gets without ``model=``; the relay's engines are all English-first.
DEFAULT_MODEL = "flux-general-en"
#: Flux's multilingual model: detects each turn's language (reported in TurnInfo ``languages``)
#: and is the only model that takes ``language_hint``.
MULTILINGUAL_MODEL = "flux-general-multi"
#: Language hints a client may give (``language_hint=``, ``language=``, Configure
#: ``language_hints``): Whisper's language codes, a superset of Flux's ten. A locale subtag
#: (``pt-BR``) is accepted and means its base language, as Flux does.
LANGUAGE_CODES = frozenset(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he "
    "hi hr ht hu hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl "
    "nn no oc pa pl ps pt ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz "
    "vi yi yo zh yue".split()
)
MAX_LANGUAGE_HINTS = 10
#: Flux's default end-of-turn confidence threshold (allowed 0.5-0.9).
DEFAULT_EOT_THRESHOLD = 0.7
#: Flux's default cap on a turn's silence before it is ended regardless of confidence.
DEFAULT_EOT_TIMEOUT_MS = 5000

#: name -> (min, max, is_int): the thresholds a client may set at connect or with Configure.
THRESHOLDS: dict[str, tuple[float, float, bool]] = {
    "eot_threshold": (0.5, 0.9, False),
    "eager_eot_threshold": (0.3, 0.9, False),
    "eot_timeout_ms": (500, 60000, True),
}

#: Text frames a client may send. ``Finalize`` is the v1 name of ``ForceEndTurn``.
CLIENT_MESSAGE_TYPES = frozenset({"CloseStream", "ForceEndTurn", "Configure", "KeepAlive", "Finalize"})
#: TurnInfo events, in the order a turn can produce them.
TURN_EVENTS = ("StartOfTurn", "Update", "EagerEndOfTurn", "TurnResumed", "EndOfTurn")

#: The relay's own messages, beyond Flux, that a client asks for with ``relay_events=``. A plain
#: Flux client (an official SDK) gets none of them, so it never sees a message type it does not know.
RELAY_EVENTS = frozenset({"presence", "history"})

#: Every encoding Flux accepts, and the sample rates it allows for raw encodings.
FLUX_ENCODINGS = frozenset({"linear16", "linear32", "mulaw", "alaw", "opus", "ogg-opus"})
FLUX_SAMPLE_RATES = frozenset({8000, 16000, 24000, 44100, 48000})

#: Session ids: what a client may pass as ``?session=`` (URL- and log-safe, bounded).
SESSION_ID_PATTERN = r"[A-Za-z0-9_.:\-]{1,128}"
SESSION_ID_RE = re.compile(rf"^{SESSION_ID_PATTERN}$")
