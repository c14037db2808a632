"""Write a session with a long finished history straight into the database (for the replay
benchmark): ``python -m bench.history SESSION_ID TURNS`` with ``DATABASE_URL`` set."""
from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
    import django

    django.setup()
    from relay.models import Session, Turn

    session_id, turns = sys.argv[1], int(sys.argv[2])
    session = Session.objects.create(pk=session_id, engine="fake", next_turn_index=turns)
    words = [{"word": w, "confidence": 0.99, "start": i * 0.25, "end": (i + 1) * 0.25} for i, w in enumerate("one two three four five six seven eight".split())]
    Turn.objects.bulk_create(
        [
            Turn(session=session, index=i, transcript=" ".join(w["word"] for w in words), words=words,
                 audio_window_start=i * 2.0, audio_window_end=i * 2.0 + 2.0, end_of_turn_confidence=1.0, trigger="manual")
            for i in range(turns)
        ],
        batch_size=500,
    )


if __name__ == "__main__":
    main()
