"""The page's JavaScript modules, unit-tested inside Chromium (no Node on the machines).

The AudioWorklet is checked with OfflineAudioContexts: at 16 kHz (the page's usual context) it
passes every sample through as Int16, in chunks of 1280; at 48 kHz (the fallback) it resamples,
speech-band tones kept, tones above 8 kHz filtered out rather than aliased.
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
        s.setName('z', 'Alice Liddell');
        s.setName('me', 'Me Myself');
        const ids = new Set(Array.from({ length: 50 }, () => T.newSessionId()));
        return { labels: ['me', 'me-old', 'x', 'y', 'x', '', 'z'].map(id => s.label(id)),
                 ids: ids.size, sample: [...ids][0] };
        """,
    )
    assert result["labels"] == ["You", "You", "Speaker 2", "Speaker 3", "Speaker 2", "Speaker", "Alice Liddell"]
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
    assert speech["total"] == 16000  # one second at 48 kHz became one second at 16 kHz, all of it
    assert abs(speech["rms"] - 0.5 / 2**0.5) < 0.02  # gain 0.5 sine, amplitude kept
    assert abs(speech["hz"] - 1000) < 5
    assert high["rms"] < 0.01  # 12 kHz would alias to 4 kHz without the low-pass



def test_worklet_at_16khz_only_converts_and_batches(page):
    # The page's usual path: a 16 kHz context (the browser resamples), so the worklet's Int16
    # samples are the context's Float32 ones times 32768, every one, in 80 ms chunks.
    result = page.evaluate(
        """async () => {
            const config = JSON.parse(document.getElementById('relay-config').textContent);
            const ctx = new OfflineAudioContext(1, 16000, 16000);
            await ctx.audioWorklet.addModule(config.workletUrl);
            const node = new AudioWorkletNode(ctx, 'relay-pcm-capture', {
                numberOfInputs: 1, numberOfOutputs: 0, channelCountMode: 'explicit', channelCount: 1,
                processorOptions: { targetRate: 16000, chunkSamples: 1280 } });
            const chunks = [];
            const flushed = new Promise(resolve => node.port.onmessage = e => {
                if (e.data.type === 'chunk') chunks.push(new Int16Array(e.data.pcm));
                else resolve();
            });
            const buffer = ctx.createBuffer(1, 16000, 16000);
            const data = buffer.getChannelData(0);
            for (let i = 0; i < data.length; i++) data[i] = ((i * 7919) % 65536 - 32768) / 32768;
            const source = new AudioBufferSourceNode(ctx, { buffer });
            source.connect(node);
            source.start();
            await ctx.startRendering();
            node.port.postMessage('flush');
            await flushed;
            const all = chunks.flatMap(c => Array.from(c));
            const wrong = all.findIndex((x, i) => x !== Math.round(data[i] * 32768));
            return { sizes: chunks.map(c => c.length), total: all.length, wrong };
        }"""
    )
    assert result["sizes"][:12] == [1280] * 12 and result["total"] == 16000
    assert result["wrong"] == -1

# -- resuming after a drop: the audio ledger and the decision, with fake WebSockets ---------------
# Frames are 10 ms (320 bytes of 16 kHz Int16), each filled with its own number, so what went out
# on which socket reads back as [number, bytes].
FAKE_SOCKETS = """
    const sockets = [];
    class FakeSocket {
        constructor(url) { this.url = url; this.readyState = 1; this.bufferedAmount = 0; this.sent = []; sockets.push(this); }
        send(data) { this.sent.push(data); }
        close() {}
    }
    const frame = n => new Int16Array(160).fill(n).buffer;
    const audio = ws => ws.sent.filter(d => typeof d !== 'string').map(d => [new Int16Array(d)[0], d.byteLength]);
    const texts = ws => ws.sent.filter(d => typeof d === 'string').map(d => JSON.parse(d).type);
    const emit = (ws, message) => ws.onmessage({ data: JSON.stringify(message) });
    const drop = (ws, code = 1006) => { ws.readyState = 3; ws.onclose({ code, reason: '' }); };
    const eot = (speaker, index, end, extra = {}) => ({ type: 'TurnInfo', event: 'EndOfTurn', turn_index: index,
        speaker, audio_window_start: 0, audio_window_end: end, transcript: 'x', words: [], trigger: 'model', ...extra });
    const statuses = [];
    let since = null;
    const make = (options = {}) => new C.RelayConnection({ endpoint: 'ws://relay.test/v2/listen',
        query: () => ({ session: 's1', since }), onMessage: () => {}, onStatus: s => statuses.push(s),
        socket: url => new FakeSocket(url), ...options });
    // Connect, speak frames 1..5 on connection A, have A's turn 3 end 25 ms in, then lose A.
    const speakAndDrop = (c, dropCode = 1006) => {
        c.open();
        const a = sockets[sockets.length - 1];
        emit(a, { type: 'Connected', connection_id: 'A', resumed: false, session_id: 's1' });
        for (let n = 1; n <= 5; n++) c.sendAudio(frame(n), 1000 + 10 * n);
        emit(a, eot('A', 3, 0.025));
        since = 3;                                            // what the page's transcript says now
        drop(a, dropCode);
        c.retryNow();
        return a;
    };
    const rejoin = (id, connections) => {
        const ws = sockets[sockets.length - 1];
        emit(ws, { type: 'Connected', connection_id: id, resumed: true, session_id: 's1' });
        emit(ws, { type: 'Presence', event: 'join', connection_id: id, connections, session_id: 's1' });
        return ws;
    };
"""


def run_resume(page, body: str):
    return run(page, FAKE_SOCKETS + body)


def test_audio_ledger_keeps_sent_audio_until_an_end_of_turn_covers_it(page):
    result = run(
        page,
        """
        const frame = n => new Int16Array(160).fill(n).buffer;   // 10 ms
        const L = new C.AudioLedger({ bytesPerSecond: 32000, maxBytes: 6 * 320 });
        for (let n = 1; n <= 4; n++) L.push(frame(n), 10 * n);
        [0, 1, 2].forEach(i => L.sent('A', i * 320));                    // 1..3 sent, 4 queued
        const starts = L.unacked.map(f => f.start);
        const ignored = L.ack('B', 1.0);                                  // another stream's turn
        const acked = L.ack('A', 0.015);                                  // frame 1 and half of 2
        const half = L.unacked[0];
        const afterAck = { unacked: L.unackedBytes, queued: L.queuedBytes, halfStart: half.start,
                           halfBytes: half.pcm.byteLength, halfAt: half.at, halfValue: new Int16Array(half.pcm)[0] };
        for (let n = 5; n <= 8; n++) L.push(frame(n), 10 * n);           // 160+320+5*320 > 6*320
        const bounded = { unacked: L.unacked.map(f => new Int16Array(f.pcm)[0]), queued: L.queue.map(f => new Int16Array(f.pcm)[0]),
                          trimmed: L.trimmedBytes, dropped: L.droppedBytes };
        const requeued = L.requeue();
        const order = L.queue.map(f => new Int16Array(f.pcm)[0]);
        const conn = L.conn;
        L.sent('B', 0);                                                    // a new stream, from 0
        let mixed = null;
        try { L.sent('C', 0); } catch (e) { mixed = e.message; }          // B's audio is not sorted out
        for (let n = 0; n < 20; n++) L.push(frame(10 + n), 0);
        return { starts, ignored, acked, afterAck, bounded, requeued, order, conn, mixed,
                 total: L.queuedBytes + L.unackedBytes };
        """,
    )
    assert result["starts"] == [0, 320, 640]
    assert result["ignored"] == 0
    assert result["acked"] == 480
    # Half a frame stays: the part after 15 ms, at its own offset and capture time.
    assert result["afterAck"] == {"unacked": 480, "queued": 320, "halfStart": 480, "halfBytes": 160, "halfAt": 25, "halfValue": 2}
    # The bound takes the oldest first: unacknowledged audio before queued audio.
    assert result["bounded"] == {"unacked": [3], "queued": [4, 5, 6, 7, 8], "trimmed": 160, "dropped": 0}
    assert result["requeued"] == 320 and result["order"] == [3, 4, 5, 6, 7, 8] and result["conn"] is None
    assert result["mixed"] and "unacknowledged audio of B" in result["mixed"]
    assert result["total"] <= 6 * 320


def test_process_alive_the_relay_finished_the_turn_so_only_uncovered_audio_goes_again(page):
    result = run_resume(
        page,
        """
        const c = make();
        const a = speakAndDrop(c);
        c.sendAudio(frame(6), 1060);                          // captured while down
        const b = rejoin('B', 2);
        const stateBeforeHistory = c.state;
        // The replay has A's open turn, finished by the relay when A dropped: 45 ms of A's stream.
        emit(b, eot('A', 4, 0.045, { trigger: 'end_of_stream', replayed: true }));
        const sentBeforeHistory = audio(b).length;
        emit(b, { type: 'History', turns: 1, last_turn_index: 4, since: 2 });
        c.close();
        return { onA: audio(a), onB: audio(b), url: b.url, stateBeforeHistory, sentBeforeHistory,
                 last: c.lastResume, state: c.state, resent: c.resentBytes, covered: c.coveredBytes };
        """,
    )
    assert result["onA"] == [[n, 320] for n in range(1, 6)]
    assert "since=3" in result["url"]  # A's last finished turn: its open turn is above it
    assert result["stateBeforeHistory"] == "resuming" and result["sentBeforeHistory"] == 0
    # Frames 1-2 and half of 3 were A's finished turn 3; the rest of 3 and 4 and half of 5 its
    # end_of_stream turn 4; only the last 5 ms of frame 5 (never transcribed) go again, then 6.
    assert result["onB"] == [[5, 160], [6, 320]]
    assert result["last"]["why"] == "finished"
    assert result["last"]["resentBytes"] == 160 and result["last"]["coveredBytes"] == 640
    assert result["resent"] == 160


def test_process_killed_nothing_finishes_the_turn_so_all_of_it_goes_again_first(page):
    result = run_resume(
        page,
        """
        const c = make({ resumeGraceMs: 3600000 });
        const a = speakAndDrop(c);
        const b = rejoin('B', 2);                              // the dead connection still counts as live
        emit(b, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        c.sendAudio(frame(6), 1060);
        const waiting = { state: c.state, sent: audio(b).length, grace: c.graceTimer !== null };
        c.resumeGraceMs = 0;                                    // the grace is over
        c.maybeResume();
        c.sendAudio(frame(7), 1070);
        c.close();
        return { waiting, onB: audio(b), last: c.lastResume, late: c.lateFinishes };
        """,
    )
    assert result["waiting"] == {"state": "resuming", "sent": 0, "grace": True}
    # Everything after A's last EndOfTurn (25 ms): half of frame 3, 4, 5; then live audio.
    assert result["onB"] == [[3, 160], [4, 320], [5, 320], [6, 320], [7, 320]]
    assert result["last"]["why"] == "grace" and result["last"]["coveredBytes"] == 0


def test_an_old_stream_still_flushing_ends_the_wait_and_a_late_one_is_counted(page):
    result = run_resume(
        page,
        """
        // The old process was still flushing when the page came back: A's turn arrives live.
        const c = make({ resumeGraceMs: 3600000 });
        speakAndDrop(c);
        const b = rejoin('B', 2);
        emit(b, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        const waited = audio(b).length;
        emit(b, eot('A', 4, 0.05, { trigger: 'end_of_stream' }));
        const flushed = { onB: audio(b), why: c.lastResume.why };
        c.close();

        // The same, but the grace ran out first: the late turn repeats words, and the page says so.
        const d = make({ resumeGraceMs: 0 });
        speakAndDrop(d);
        const e = rejoin('E', 2);
        emit(e, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        emit(e, eot('A', 4, 0.05, { trigger: 'end_of_stream' }));
        emit(e, eot('A', 4, 0.05, { trigger: 'end_of_stream', replayed: true }));
        const late = { onE: audio(e).length, why: d.lastResume.why, late: d.lateFinishes };
        d.close();

        // Alone in the session when it rejoined: the old connection is closed, so what it stored
        // was in the replay; nothing to wait for.
        const f = make({ resumeGraceMs: 3600000 });
        speakAndDrop(f);
        const g = rejoin('G', 1);
        emit(g, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        const alone = { onG: audio(g).length, why: f.lastResume.why };
        f.close();

        // A Presence leave of the old connection ends the wait too.
        const h = make({ resumeGraceMs: 3600000 });
        speakAndDrop(h);
        const i = rejoin('I', 3);
        emit(i, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        emit(i, { type: 'Presence', event: 'leave', connection_id: 'A', connections: 2, session_id: 's1' });
        const left = { onI: audio(i).length, why: h.lastResume.why };
        h.close();
        return { waited, flushed, late, alone, left };
        """,
    )
    assert result["waited"] == 0
    assert result["flushed"] == {"onB": [], "why": "finished"}  # 50 ms covers all five frames
    assert result["late"] == {"onE": 3, "why": "grace", "late": 1}
    assert result["alone"] == {"onG": 3, "why": "alone"}
    assert result["left"] == {"onI": 3, "why": "left"}


def test_relay_closes_since_floor_repeated_drops_and_a_stop_after_a_crash(page):
    result = run_resume(
        page,
        """
        // A relay that closed on purpose (4012 SERVER_RESTARTING) had flushed and stored first.
        const c = make({ resumeGraceMs: 3600000 });
        speakAndDrop(c, 4012);
        const b = rejoin('B', 2);
        emit(b, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        const restart = { onB: audio(b).length, why: c.lastResume.why };
        c.close();

        // since= never passes a turn the resumed stream may still finish: A connected with
        // since=3, another speaker's turn 7 finished since, A's own open turn may be 4..6.
        since = 3;
        const d = make({ resumeGraceMs: 3600000 });
        d.open();
        const a = sockets[sockets.length - 1];
        emit(a, { type: 'Connected', connection_id: 'A', resumed: true, session_id: 's1' });
        emit(a, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        d.sendAudio(frame(1), 0);
        emit(a, eot('X', 7, 1.0));
        since = 7;
        drop(a); d.retryNow();
        // A drop before the old stream is sorted out keeps sorting out that one (A), not the new one.
        const e = rejoin('E', 2);
        drop(e); d.retryNow();
        const f = rejoin('F', 2);
        emit(f, { type: 'History', turns: 0, last_turn_index: null, since: 3 });
        const pending = d.resume && d.resume.conn;
        emit(f, eot('A', 8, 0.0, { trigger: 'end_of_stream' }));
        const repeated = { urls: [e.url, f.url].map(u => new URL(u).searchParams.get('since')), pending,
                           onE: audio(e), onF: audio(f), why: d.lastResume.why };
        // Once A's turn 8 is in, the next drop of F may ask from 8 (its floor) up.
        emit(f, eot('F', 9, 0.01));
        since = 9;
        drop(f); d.retryNow();
        repeated.after = new URL(sockets[sockets.length - 1].url).searchParams.get('since');
        d.close();
        since = null;

        // Stop (CloseStream), then the process dies before it answers: the page reconnects,
        // re-sends what is not covered and sends CloseStream again; done when the relay closes 1000.
        const g = make({ resumeGraceMs: 0 });
        g.open();
        const ga = sockets[sockets.length - 1];
        emit(ga, { type: 'Connected', connection_id: 'GA', resumed: false, session_id: 's1' });
        g.sendAudio(frame(1), 0); g.sendAudio(frame(2), 10);
        let done = false;
        g.finish().then(() => { done = true; });
        const first = texts(ga);
        drop(ga);
        g.retryNow();
        const gb = rejoin('GB', 2);
        emit(gb, { type: 'History', turns: 0, last_turn_index: null, since: null });
        const again = { audio: audio(gb), texts: texts(gb), state: g.state };
        drop(gb, 1000);
        await Promise.resolve();
        const stop = { first, again, done, state: g.state, unacked: g.ledger.unackedBytes };
        g.close();
        return { restart, repeated, stop };
        """,
    )
    assert result["restart"] == {"onB": 3, "why": "finished"}
    assert result["repeated"] == {"urls": ["3", "3"], "pending": "A", "onE": [], "onF": [[1, 320]], "why": "finished", "after": "9"}
    assert result["stop"]["first"] == ["CloseStream"]
    assert result["stop"]["again"] == {"audio": [[1, 320], [2, 320]], "texts": ["CloseStream"], "state": "finishing"}
    assert result["stop"]["done"] is True and result["stop"]["state"] == "closed" and result["stop"]["unacked"] == 0
