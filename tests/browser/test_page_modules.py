"""The page's JavaScript modules, unit-tested inside Chromium (no Node on the machines).

The AudioWorklet is checked with an OfflineAudioContext at 48 kHz: 16 kHz Int16 chunks of 1280
samples, speech-band tones kept, tones above 8 kHz filtered out rather than aliased.
"""
from __future__ import annotations

import pytest

from tests.browser.conftest import CHROMIUM, CHROMIUM_FLAGS, new_page

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def page(playwright_instance, fake_server):
    browser = playwright_instance.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
    page = new_page(browser)
    page.goto(fake_server.http_url + "/demo/ai-voice/?session=module-tests")
    yield page
    browser.close()


def run(page, body: str):
    """Evaluate an async function body with the page's modules imported as T, S, C."""
    return page.evaluate(
        f"""async () => {{
            const T = await import('/static/relay/transcript.js');
            const S = await import('/static/relay/subtitles.js');
            const C = await import('/static/relay/connection.js');
            {body}
        }}"""
    )


def test_transcript_dedupes_by_turn_index_and_computes_since(page):
    result = run(
        page,
        """
        const t = new T.Transcript({ now: () => 1000000 });
        const turn = (index, event, extra = {}) => ({ type: 'TurnInfo', turn_index: index, event,
            transcript: 'w' + index, audio_window_start: 0, audio_window_end: 1, speaker: 'a', ...extra });
        const kinds = [];
        kinds.push(t.apply(turn(0, 'EndOfTurn')).kind);
        kinds.push(t.apply(turn(1, 'StartOfTurn')).kind);
        kinds.push(t.apply(turn(2, 'Update', { speaker: 'b' })).kind);
        kinds.push(t.apply(turn(2, 'EndOfTurn', { speaker: 'b' })).kind);
        const sinceWhileOneIsOpen = t.since();           // 1 still open: replay from it
        kinds.push(t.apply(turn(0, 'EndOfTurn', { replayed: true })).kind);  // seen twice
        kinds.push(t.apply(turn(2, 'Update', { speaker: 'b' })).kind);      // stale
        kinds.push(t.apply(turn(1, 'EndOfTurn')).kind);
        const dropped = t.dropInterims(() => true).length;
        return { kinds, sinceWhileOneIsOpen, since: t.since(), dropped,
                 order: t.finishedTurns().map(x => x.index), empty: new T.Transcript().since() };
        """,
    )
    assert result["kinds"] == ["final", "interim", "interim", "final", "duplicate", "duplicate", "final"]
    assert result["sinceWhileOneIsOpen"] == 0
    assert result["since"] == 2
    assert result["order"] == [0, 1, 2]
    assert result["empty"] is None


def test_start_times_prefer_what_the_page_knows(page):
    result = run(
        page,
        """
        const times = new Map([[5, 111000]]);
        const t = new T.Transcript({ now: () => 500000, times });
        const msg = (i, extra) => ({ turn_index: i, event: 'EndOfTurn', transcript: 'x',
            audio_window_start: 1, audio_window_end: 3, ...extra });
        return [
            t.apply(msg(4, {}), { startedAt: 42000 }).turn.startedAt,               // own audio
            t.apply(msg(5, { replayed: true })).turn.startedAt,                       // remembered
            t.apply(msg(6, { replayed: true, created_at: '1970-01-01T00:01:40Z' })).turn.startedAt,
            t.apply(msg(7, { replayed: true })).turn.startedAt,                       // unknown
            t.apply(msg(8, {})).turn.startedAt,                                       // live: now - 2 s
        ];
        """,
    )
    assert result == [42000, 111000, 98000, None, 498000]


def test_speakers_and_session_ids(page):
    result = run(
        page,
        """
        const s = new T.Speakers(['me-old']);
        s.addOwn('me');
        const ids = new Set(Array.from({ length: 50 }, () => T.newSessionId()));
        return { labels: ['me', 'me-old', 'x', 'y', 'x', ''].map(id => s.label(id)),
                 ids: ids.size, sample: [...ids][0] };
        """,
    )
    assert result["labels"] == ["You", "You", "Speaker 2", "Speaker 3", "Speaker 2", "Speaker"]
    assert result["ids"] == 50
    assert len(result["sample"]) == 26 and result["sample"].isalnum()


def test_text_srt_and_vtt_downloads(page):
    result = run(
        page,
        """
        const turns = [
            { index: 0, speaker: 'a', transcript: 'hello there', duration: 1.5, startedAt: 1700000000000 },
            { index: 1, speaker: 'b', transcript: 'a <b> & c', duration: 0.2, startedAt: 1700000003250 },
            { index: 2, speaker: 'a', transcript: 'from history', duration: 2, startedAt: null },
        ];
        const label = id => id === 'a' ? 'You' : 'Speaker 2';
        return {
            srt: S.toSrt(turns, { label }),
            vtt: S.toVtt(turns, { label }),
            txt: S.toText(turns, { label, sessionId: 's1', exportedAt: new Date(0) }),
            long: S.timestamp(3723.5, ','),
        };
        """,
    )
    assert result["srt"] == (
        "1\n00:00:00,000 --> 00:00:01,500\nYou: hello there\n\n"
        "2\n00:00:03,250 --> 00:00:04,050\nSpeaker 2: a <b> & c\n\n"
        "3\n00:00:04,250 --> 00:00:06,250\nYou: from history\n"
    )
    assert result["vtt"].startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n<v You>hello there\n")
    assert "<v Speaker 2>a &lt;b&gt; &amp; c" in result["vtt"]
    lines = result["txt"].splitlines()
    assert lines[0] == "Relay transcript, session s1, exported 1970-01-01T00:00:00.000Z"
    assert lines[2].endswith("] You: hello there") and lines[4] == "You: from history"
    assert result["long"] == "01:02:03,500"


def test_backoff_grows_with_jitter_to_five_seconds_and_fatal_codes(page):
    result = run(
        page,
        """
        const at = (n, r) => C.backoffDelay(n, () => r);
        return {
            low: [0, 1, 2, 3, 4, 5, 9].map(n => at(n, 0)),
            high: [0, 1, 2, 3, 4, 5, 9].map(n => at(n, 0.9999)),
            fatal: [[4003, null], [4008, null], [4010, null], [4008, 'BACKLOG_EXCEEDED'], [4013, null],
                    [1006, null], [4011, 'ENGINE_ERROR'], [4001, 'UNAUTHORIZED'], [1000, null]]
                .map(([code, err]) => C.isFatal(code, err)),
        };
        """,
    )
    assert result["low"] == [125, 250, 500, 1000, 2000, 2500, 2500]
    assert result["high"] == [375, 750, 1500, 3000, 5000, 5000, 5000]
    assert result["fatal"] == [True, True, True, False, False, False, False, True, False]


def test_worklet_makes_16khz_int16_chunks_of_80ms_and_filters_above_8khz(page):
    result = page.evaluate(
        """async () => {
            const config = JSON.parse(document.getElementById('relay-config').textContent);
            async function capture(freq, channels) {
                const ctx = new OfflineAudioContext(channels, 48000, 48000);
                await ctx.audioWorklet.addModule(config.workletUrl);
                const node = new AudioWorkletNode(ctx, 'relay-pcm-capture', {
                    numberOfInputs: 1, numberOfOutputs: 0, channelCountMode: 'explicit', channelCount: 1,
                    processorOptions: { targetRate: 16000, chunkSamples: 1280 } });
                const chunks = [];
                const flushed = new Promise(resolve => node.port.onmessage = e => {
                    if (e.data.type === 'chunk') chunks.push(new Int16Array(e.data.pcm));
                    else resolve();
                });
                const osc = new OscillatorNode(ctx, { frequency: freq });
                const gain = new GainNode(ctx, { gain: 0.5 });
                osc.connect(gain).connect(node);
                osc.start();
                await ctx.startRendering();
                node.port.postMessage('flush');
                await flushed;
                const all = chunks.flatMap(c => Array.from(c));
                const steady = all.slice(1600, 14400);
                const rms = Math.sqrt(steady.reduce((n, x) => n + x * x, 0) / steady.length) / 32767;
                let crossings = 0;
                for (let i = 1; i < steady.length; i++) if ((steady[i - 1] < 0) !== (steady[i] < 0)) crossings++;
                return { sizes: chunks.map(c => c.length), total: all.length, rms,
                         hz: crossings / 2 / (steady.length / 16000) };
            }
            return { speech: await capture(1000, 1), high: await capture(12000, 1) };
        }"""
    )
    speech, high = result["speech"], result["high"]
    assert all(size == 1280 for size in speech["sizes"][:-1])  # 80 ms each; the last is the flush
    assert 15900 <= speech["total"] <= 16000  # one second at 48 kHz became one second at 16 kHz
    assert abs(speech["rms"] - 0.5 / 2**0.5) < 0.02  # gain 0.5 sine, amplitude kept
    assert abs(speech["hz"] - 1000) < 5
    assert high["rms"] < 0.01  # 12 kHz would alias to 4 kHz without the low-pass
