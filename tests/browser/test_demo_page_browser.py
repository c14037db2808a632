"""The demo page in a real Chromium with a WAV as the microphone, against a real daphne.

Fake-engine scenarios (tone bursts -> "one two three" per 0.75 s burst) test sharing, reconnects
and history; the speech scenario runs the default offline engine on a spoken WAV.
"""
from __future__ import annotations

import difflib
import json
import re
import wave
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.audio import silence, tone, wav_bytes
from tests.browser.conftest import PHONE, new_page, page_errors, production_env, screenshot
from tests.support.proxy import CuttableProxy
from tests.support.live import ROOT, LiveServer, sqlite_env

SPEECH = ROOT / "tests" / "fixtures" / "speech"

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]

BURST = "one two three"  # what the fake engine makes of one 0.75 s tone burst


def bursts_wav(path: Path, count: int, *, gap: float = 1.5) -> Path:
    """1 s of lead-in silence (the page may miss the very start), then ``count`` tone bursts."""
    pcm = silence(1.0) + (tone(0.75) + silence(gap)) * count + silence(1.0)
    path.write_bytes(wav_bytes(pcm))
    return path


def finals(page: Page) -> list[dict]:
    return page.locator("#turns .turn").evaluate_all(
        """els => els.map(e => ({
            index: Number(e.dataset.index),
            text: e.querySelector('.turn-text').textContent,
            speaker: e.querySelector('.speaker').textContent,
            replayed: e.dataset.replayed === 'true',
            time: e.querySelector('time').textContent,
        }))"""
    )


def launch_without_fake_ui(launch):
    """A Chromium that asks before using the microphone; headless, the question is refused."""
    return launch(fake_ui=False)


def demo_url(base: str) -> str:
    return base + "/demo/ai-voice/"


def test_share_link_tab_sees_the_same_turns_live(fake_server, launch, tmp_path):
    browser = launch(bursts_wav(tmp_path / "bursts.wav", 3))
    speaker = new_page(browser)
    speaker.goto(demo_url(fake_server.http_url))
    expect(speaker.locator("body")).to_have_attribute("data-state", "open")
    link = speaker.locator("#share-link").input_value()
    assert re.fullmatch(re.escape(demo_url(fake_server.http_url)) + r"\?session=[a-z2-7]{26}", link)
    assert speaker.url == link  # the address bar is the share link too, so a reload keeps it

    listener = new_page(browser, viewport=PHONE, color_scheme="dark")
    listener.goto(link)
    expect(listener.locator("body")).to_have_attribute("data-state", "open")
    expect(speaker.locator("#presence")).to_have_text("You + 1 other")

    # Keyboard only: Tab past the skip link and the account links (Sign in, Sign up) to the
    # microphone button, press Space.
    for _ in range(4):
        speaker.keyboard.press("Tab")
    assert speaker.evaluate("document.activeElement.id") == "mic"
    speaker.keyboard.press("Space")
    expect(speaker.locator("#mic")).to_have_attribute("aria-pressed", "true")

    # The listening tab sees the speaker's provisional words while they are spoken...
    expect(listener.locator("#interims .turn")).to_have_count(1)
    expect(listener.locator("#interims .speaker")).to_have_text("Guest 1")  # the relay's label for an anonymous speaker
    screenshot(listener, "shared-listener-phone-dark-interim")
    # ...and every finished turn, live (not from history).
    expect(speaker.locator("#turns .turn")).to_have_count(3)
    expect(listener.locator("#turns .turn")).to_have_count(3)
    expect(listener.locator("#interims .turn")).to_have_count(0)
    screenshot(speaker, "shared-speaker-desktop")
    screenshot(listener, "shared-listener-phone-dark")

    mine, theirs = finals(speaker), finals(listener)
    assert [t["text"] for t in mine] == [BURST] * 3
    assert [(t["index"], t["text"]) for t in theirs] == [(t["index"], t["text"]) for t in mine]
    assert {t["speaker"] for t in mine} == {"You"}
    assert {t["speaker"] for t in theirs} == {"Guest 1"}
    assert not any(t["replayed"] for t in theirs)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", t["time"]) for t in theirs)
    assert page_errors(speaker) == [] and page_errors(listener) == []


def wait_for_queued_audio(page: Page, ms: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.queuedMs || 0) >= {ms}")


def word_count_at_least(page: Page, n: int) -> None:
    """Wait until the finished turns hold ``n`` words and nothing is provisional."""
    page.wait_for_function(
        f"""() => {{
            const words = [...document.querySelectorAll('#turns .turn-text')]
                .reduce((n, e) => n + e.textContent.split(' ').length, 0);
            return words >= {n} && !document.querySelector('#interims .turn');
        }}"""
    )


def test_connection_dropped_mid_speech_reconnects_without_losing_or_repeating_words(fake_server, launch, tmp_path):
    bursts = 5
    browser = launch(bursts_wav(tmp_path / "bursts.wav", bursts, gap=2.0))
    with CuttableProxy(fake_server.port) as proxy:
        page = new_page(browser)
        page.goto(demo_url(proxy.url))
        expect(page.locator("body")).to_have_attribute("data-state", "open")
        page.locator("#mic").click()
        expect(page.locator("#turns .turn")).to_have_count(1)

        # Drop 1, between turns: the network stays down while the whole second burst is spoken.
        proxy.hold()
        assert proxy.cut() >= 1
        expect(page.locator("body")).to_have_attribute("data-state", re.compile("retrying|reconnecting"))
        wait_for_queued_audio(page, 2500)  # burst 2 (and the silence that ends it) is buffered
        screenshot(page, "reconnect-while-down")
        proxy.release()
        page.evaluate("window.dispatchEvent(new Event('online'))")  # what a returning network fires
        expect(page.locator("body")).to_have_attribute("data-reconnects", "1")

        # Drop 2, inside a turn of live speech (burst 3, once burst 2's catch-up is done): cut as
        # soon as its first word shows, reconnect at once.
        page.wait_for_function(
            """() => document.querySelectorAll('#turns .turn').length >= 2
                && /^one$/.test(document.querySelector('#interims .turn-text')?.textContent || '')""",
            polling="raf",
        )
        proxy.cut()
        expect(page.locator("body")).to_have_attribute("data-reconnects", "2")
        # The process lived and finished the open turn itself (end_of_stream): the page drops the
        # audio that turn covers and sends only what the relay never took.
        expect(page.locator("body")).to_have_attribute("data-resume", "finished")
        assert int(page.locator("body").get_attribute("data-covered-ms")) >= 250
        # Wait for the end of the recording: every burst's words are in and nothing is provisional.
        word_count_at_least(page, 3 * bursts - 1)
        page.locator("#mic").click()  # deliberate stop: CloseStream, then the page listens on
        expect(page.locator("body")).to_have_attribute("data-recording", "false")
        expect(page.locator("#mic")).to_be_enabled()  # finished, and listening again
        expect(page.locator("body")).to_have_attribute("data-state", "open")
        screenshot(page, "reconnect-final")

        turns = finals(page)
        indexes = [t["index"] for t in turns]
        assert indexes == sorted(set(indexes)), turns  # no turn twice, in order
        texts = [t["text"] for t in turns]
        # Every burst is whole, burst 2 included (spoken entirely while disconnected), except the
        # one cut mid-turn: the relay finished its open part (end_of_stream), and the page sent
        # only the audio after the end of that turn, then the rest as a new turn; nothing twice.
        # The fake engine counts one word per full 250 ms of each part, so that split may cost one
        # word; real speech engines see the same audio either way.
        split = [i for i, t in enumerate(texts) if t != BURST]
        if split:
            assert texts.count(BURST) == bursts - 1, texts
            assert split == list(range(split[0], split[0] + len(split))) and len(split) <= 2, texts
            assert all(re.fullmatch(r"one( two)?", texts[i]) for i in split), texts
            assert 2 <= sum(len(texts[i].split()) for i in split) <= 3, texts
        else:  # the cut landed (a slow machine) after the burst's last word
            assert texts == [BURST] * bursts, texts

        # The relay kept the same turns: a fresh page on the share link replays exactly them.
        fresh = new_page(launch())
        fresh.goto(page.locator("#share-link").input_value())
        expect(fresh.locator("#turns .turn")).to_have_count(len(turns))
        assert [(t["index"], t["text"]) for t in finals(fresh)] == [(t["index"], t["text"]) for t in turns]
        assert page_errors(page) == []


def record_into_burst_two(launch, tmp_path: Path, base: str, bursts: int) -> Page:
    """The demo page recording ``bursts`` tone bursts 2 s apart, returned once burst 1 is a
    finished turn and burst 2's first word is on screen (its turn open in the relay)."""
    page = new_page(launch(bursts_wav(tmp_path / "bursts.wav", bursts, gap=2.0)))
    page.goto(demo_url(base))
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    page.locator("#mic").click()
    expect(page.locator("#turns .turn")).to_have_count(1)
    page.wait_for_function(
        "() => /^one/.test(document.querySelector('#interims .turn-text')?.textContent || '')",
        polling="raf",
    )
    return page


def test_relay_process_killed_mid_turn_the_page_sends_the_open_turn_again(static_root, launch, tmp_path, tmp_path_factory):
    # A daphne of its own (the shared one must live): killed with SIGKILL inside a turn, then a
    # new process on the same port and the same database, as a supervisor would restart it.
    env = {**sqlite_env(tmp_path_factory.mktemp("db-kill")), **production_env(static_root), "RELAY_ENGINE": "fake"}
    first = LiveServer(env, log_name="daphne-killed").start()
    second = None
    bursts = 4
    try:
        # Burst 2's first word is on screen: its audio reached the relay, whose open turn now
        # lives only in the process. Kill it.
        page = record_into_burst_two(launch, tmp_path, first.http_url, bursts)
        first.kill()
        expect(page.locator("body")).to_have_attribute("data-state", re.compile("retrying|reconnecting"))
        second = LiveServer(env, port=first.port, log_name="daphne-restarted").start()
        page.evaluate("window.dispatchEvent(new Event('online'))")
        expect(page.locator("body")).to_have_attribute("data-reconnects", "1")

        # The dead connection still counts as live (its process's heartbeat is fresh), so the page
        # cannot tell a crash from a slow flush: it waits out the grace, then sends the audio the
        # dead process never finished, before the audio captured meanwhile.
        expect(page.locator("body")).to_have_attribute("data-state", "resuming")
        expect(page.locator("#status-text")).to_contain_text("checking what the relay kept")
        screenshot(page, "killed-resuming")
        expect(page.locator("body")).to_have_attribute("data-resume", "grace")
        assert int(page.locator("body").get_attribute("data-resent-ms")) >= 250  # at least burst 2's first word
        assert page.locator("body").get_attribute("data-covered-ms") == "0"
        expect(page.locator("#notice")).to_contain_text("Reconnected: sending again the")

        word_count_at_least(page, 3 * bursts)
        page.locator("#mic").click()  # deliberate stop
        expect(page.locator("body")).to_have_attribute("data-recording", "false")
        expect(page.locator("#mic")).to_be_enabled()
        expect(page.locator("body")).to_have_attribute("data-state", "open")
        screenshot(page, "killed-final")

        # Every word once: burst 2 is whole (its start re-sent, its rest live), nothing twice.
        turns = finals(page)
        indexes = [t["index"] for t in turns]
        assert indexes == sorted(set(indexes)), turns
        assert [t["text"] for t in turns] == [BURST] * bursts, turns
        assert {t["speaker"] for t in turns} == {"You"}

        # The new process stored exactly these turns: a fresh page replays them.
        fresh = new_page(launch())
        fresh.goto(page.locator("#share-link").input_value())
        expect(fresh.locator("body")).to_have_attribute("data-history", str(len(turns)))
        assert [(t["index"], t["text"]) for t in finals(fresh)] == [(t["index"], t["text"]) for t in turns]
        assert all(t["replayed"] and re.fullmatch(r"\d\d:\d\d:\d\d", t["time"]) for t in finals(fresh))
        screenshot(fresh, "killed-replayed-elsewhere")
        assert page_errors(page) == [] and page_errors(fresh) == []
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_a_stop_whose_flush_the_relay_cuts_short_sends_the_open_turn_again(static_root, launch, tmp_path, tmp_path_factory):
    # The engine (stalling-flush) never finishes the first open turn it is asked to flush: the
    # relay gives up after RELAY_FLUSH_TIMEOUT_SECONDS with Error FLUSH_INCOMPLETE. The page,
    # stopping, still holds that turn's audio (no EndOfTurn covered it): it reconnects, sends it
    # again, and stops again.
    env = {**sqlite_env(tmp_path_factory.mktemp("db-flush")), **production_env(static_root),
           "DJANGO_SETTINGS_MODULE": "tests.support.fault_settings", "RELAY_ENGINE": "stalling-flush",
           "RELAY_FLUSH_TIMEOUT_SECONDS": "1"}
    with LiveServer(env, log_name="daphne-stalling-flush") as server:
        page = record_into_burst_two(launch, tmp_path, server.http_url, 3)
        page.locator("#mic").click()  # deliberate stop inside burst 2
        expect(page.locator("body")).to_have_attribute("data-reconnects", "1")
        expect(page.locator("body")).to_have_attribute("data-recording", "false")
        expect(page.locator("#turns .turn")).to_have_count(2)
        expect(page.locator("#mic")).to_be_enabled()
        screenshot(page, "flush-cut-resent")
        turns = finals(page)
        assert turns[0]["text"] == BURST and BURST.startswith(turns[1]["text"]) and turns[1]["text"].startswith("one"), turns
        # The cut turn's index was taken at its StartOfTurn and stays unused: a gap, as documented.
        assert turns[0]["index"] < turns[1]["index"], turns
        assert page_errors(page) == []
        log = server.output()
    assert log.count("code=FLUSH_INCOMPLETE") >= 1, log[-3000:]
    assert re.search(rf"event=turn_finished .*turn_index={turns[1]['index']} trigger=end_of_stream", log), log[-3000:]


def test_language_choice_sets_model_and_hint_and_is_remembered(fake_server, launch):
    browser = launch()
    page = new_page(browser)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))

    def last_socket(*needles: str, absent: str | None = None) -> str:
        for _ in range(100):  # the page reconnects with the new query; wait for that socket
            if sockets and all(n in sockets[-1] for n in needles) and (absent is None or absent not in sockets[-1]):
                return sockets[-1]
            page.wait_for_timeout(50)
        raise AssertionError(sockets)

    page.goto(demo_url(fake_server.http_url))
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    assert page.locator("#language").input_value() == "en"
    last_socket("model=flux-general-en", absent="language_hint")
    page.locator("#language").select_option("de")
    last_socket("model=flux-general-multi", "language_hint=de")
    expect(page.locator("#language")).to_be_enabled()
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    assert page.locator("#language").input_value() == "de"  # remembered by this browser
    page.locator("#language").select_option("auto")
    last_socket("model=flux-general-multi", absent="language_hint")


def test_reload_and_share_link_show_the_history(fake_server, launch, tmp_path):
    browser = launch(bursts_wav(tmp_path / "bursts.wav", 2))
    page = new_page(browser)
    page.goto(demo_url(fake_server.http_url))
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    page.get_by_role("button", name="Start microphone").click()
    expect(page.locator("#turns .turn")).to_have_count(2)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("body")).to_have_attribute("data-recording", "false")
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    before = finals(page)

    with page.expect_download() as download:
        page.get_by_role("button", name="SRT").click()
    srt = Path(download.value.path()).read_text()
    assert re.search(r"^1\n00:00:00,000 --> 00:00:0\d,\d{3}\nYou: one two three\n", srt), srt
    with page.expect_download() as download:
        page.get_by_role("button", name="WebVTT").click()
    assert Path(download.value.path()).read_text().startswith("WEBVTT\n\n00:00:00.000 --> ")

    page.reload()
    expect(page.locator("#turns .turn")).to_have_count(2)
    after = finals(page)
    assert [(t["index"], t["text"], t["speaker"], t["time"]) for t in after] == [
        (t["index"], t["text"], t["speaker"], t["time"]) for t in before
    ]
    assert all(t["replayed"] for t in after)
    screenshot(page, "history-after-reload")

    # Another browser has no local memory of this session: same turns, from another speaker, by the relay's label.
    other = new_page(launch(), viewport=PHONE)
    other.goto(page.url)
    expect(other.locator("#turns .turn")).to_have_count(2)
    assert [(t["index"], t["text"], t["speaker"]) for t in finals(other)] == [
        (t["index"], t["text"], "Guest 1") for t in before
    ]
    screenshot(other, "history-other-browser-phone")
    assert page_errors(page) == [] and page_errors(other) == []


def test_errors_are_said_in_plain_words(fake_server, launch):
    # A link with an impossible session id: the relay refuses it (4008) and retrying cannot help.
    browser = launch()
    page = new_page(browser)
    page.goto(demo_url(fake_server.http_url) + "?session=" + "x" * 129)
    expect(page.locator("body")).to_have_attribute("data-state", "failed")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_have_text(re.compile("The session id in this link is not valid"))
    expect(page.locator("#status-text")).to_have_text("Stopped by an error")
    assert page.locator("body").get_attribute("data-reconnects") == "0"
    screenshot(page, "error-invalid-session")

    # No microphone permission: the browser's own refusal, explained.
    blocked = launch_without_fake_ui(launch)
    page = new_page(blocked)
    page.goto(demo_url(fake_server.http_url))
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    page.locator("#mic").click()
    expect(page.locator("#error-text")).to_have_text(re.compile("Microphone access was blocked"))
    expect(page.locator("#mic")).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#mic")).to_be_enabled()
    screenshot(page, "error-microphone-blocked")
    page.get_by_role("button", name="Dismiss").click()
    expect(page.locator("#error")).to_be_hidden()


def speech_wav(path: Path, clips: list[str]) -> tuple[Path, list[str]]:
    """Spoken clips from the espeak-ng test set, 1.5 s apart, after 1 s of silence; and their texts."""
    texts = {c["file"]: c["text"] for c in json.loads((SPEECH / "manifest.json").read_text())["clips"]}
    pcm = silence(1.0)
    for name in clips:
        with wave.open(str(SPEECH / name)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            pcm += w.readframes(w.getnframes()) + silence(1.5)
    path.write_bytes(wav_bytes(pcm))
    return path, [texts[name] for name in clips]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def test_speech_through_the_default_engine_shows_the_spoken_words(whisper_server, launch, tmp_path):
    wav, expected = speech_wav(tmp_path / "speech.wav", ["s01.wav", "s02.wav"])
    page = new_page(launch(wav))
    page.goto(demo_url(whisper_server.http_url))
    expect(page.locator("body")).to_have_attribute("data-state", "open")
    expect(page.locator("#stats")).to_contain_text("Engine whisper")
    page.get_by_role("button", name="Start microphone").click()
    expect(page.locator("#interims .turn")).to_have_count(1)  # provisional words while speaking
    expect(page.locator("#turns .turn")).to_have_count(2, timeout=60_000)  # one turn per sentence
    expect(page.locator("#interims .turn")).to_have_count(0)
    screenshot(page, "speech-whisper")

    turns = finals(page)
    for turn, text in zip(turns, expected):
        # Whisper on espeak-ng's voices slips now and then ("riverbank", "fire and steam" for
        # "finance team"): compare letters, so a slip costs a little and a wrong sentence a lot.
        heard, said = "".join(words(turn["text"])), "".join(words(text))
        assert difflib.SequenceMatcher(None, said, heard).ratio() >= 0.85, (text, turn["text"])
    # Key words, allowing one slip per sentence (after Chromium's and the worklet's resampling,
    # Whisper base sometimes hears "round" for "brown").
    assert len({"quick", "brown", "fox", "lazy", "dog"} & set(words(turns[0]["text"]))) >= 4, turns[0]["text"]
    assert len({"quarterly", "report", "friday", "afternoon"} & set(words(turns[1]["text"]))) >= 3, turns[1]["text"]
    assert all(t["speaker"] == "You" and not t["replayed"] for t in turns)
    assert page_errors(page) == []
