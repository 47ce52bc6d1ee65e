import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SDK } from "./helpers.mjs";

const { TurnLatencyTracker } = await import(SDK("latency.js"));

const loud = (t, ducked = false) => ({ type: "client.mic_level", rms: 0.1, peak: 0.3, ducked, t });
const quiet = (t) => ({ type: "client.mic_level", rms: 0.0005, peak: 0.001, ducked: false, t });
const delta = { type: "response.output_audio.delta", response_id: "r1", item_id: "i1" };

describe("TurnLatencyTracker", () => {
  test("both anchors for speech end, both for first audio (WebSocket order)", () => {
    const tr = new TurnLatencyTracker();
    tr.handle(loud(1000));
    tr.handle(loud(1020));
    tr.handle(quiet(1040));
    tr.handle(quiet(1060));
    tr.handle({ type: "input_audio_buffer.speech_stopped", item_id: "u1", audio_end_ms: 900 }, 1560);
    tr.handle(delta, 1800);
    tr.handle(delta, 1820); // later deltas do not move the mark
    tr.handle({ type: "client.playback_started", item_id: "i1", t: 1900 });
    assert.equal(tr.turns.length, 1);
    const turn = tr.turns[0];
    assert.equal(turn.speechEndMicAt, 1020);
    assert.equal(turn.vadToReceivedMs, 240);
    assert.equal(turn.vadToPlayedMs, 340);
    assert.equal(turn.micToReceivedMs, 780);
    assert.equal(turn.micToPlayedMs, 880);
    assert.equal(turn.responseId, "r1");
    assert.equal(tr.current, null);
  });

  test("WebRTC: output_audio_buffer.started is the 'received' anchor; played may come first", () => {
    const tr = new TurnLatencyTracker();
    tr.handle(loud(10));
    tr.handle({ type: "input_audio_buffer.speech_stopped", item_id: "u1", audio_end_ms: 10 }, 500);
    tr.handle({ type: "client.playback_started", item_id: null, t: 640 });
    tr.handle({ type: "output_audio_buffer.started", response_id: "r9" }, 650);
    const [turn] = tr.turns;
    assert.equal(turn.vadToPlayedMs, 140);
    assert.equal(turn.vadToReceivedMs, 150);
    assert.equal(turn.responseId, "r9");
  });

  test("ducked mic blocks (agent echo) are not the user's speech", () => {
    const tr = new TurnLatencyTracker();
    tr.handle(loud(100));
    tr.handle(loud(300, true));
    tr.handle({ type: "input_audio_buffer.speech_stopped", item_id: "u", audio_end_ms: 0 }, 800);
    assert.equal(tr.turns[0].speechEndMicAt, 100);
  });

  test("the threshold is in dBFS", () => {
    const tr = new TurnLatencyTracker({ thresholdDb: -20 });
    tr.handle(loud(100)); // 0.1 rms = -20 dBFS: counts
    tr.handle({ type: "client.mic_level", rms: 0.05, ducked: false, t: 200 }); // -26 dBFS: does not
    tr.handle({ type: "client.commit", t: 300 });
    assert.equal(tr.turns[0].speechEndMicAt, 100);
    assert.equal(tr.turns[0].anchor, "commit");
  });

  test("a turn interrupted by more user speech before any audio gets no latency", () => {
    const tr = new TurnLatencyTracker();
    tr.handle({ type: "input_audio_buffer.speech_stopped", item_id: "u1", audio_end_ms: 0 }, 100);
    tr.handle({ type: "input_audio_buffer.speech_started", item_id: "u2", audio_start_ms: 0 }, 300);
    tr.handle(delta, 350); // audio of the cancelled response
    tr.handle({ type: "input_audio_buffer.speech_stopped", item_id: "u2", audio_end_ms: 0 }, 900);
    tr.handle(delta, 1000);
    assert.equal(tr.turns[0].receivedAt, null);
    assert.equal(tr.turns[1].vadToReceivedMs, 100);
    assert.equal(tr.turns[1].speechEndMicAt, null, "no loud mic block seen");
  });

  test("turns are bounded and onUpdate fires on every change", () => {
    const seen = [];
    const tr = new TurnLatencyTracker({ maxTurns: 2, onUpdate: (t) => seen.push(t.index) });
    for (let i = 0; i < 3; i++) {
      tr.handle({ type: "client.commit", t: i * 1000 });
      tr.handle(delta, i * 1000 + 5);
    }
    assert.deepEqual(tr.turns.map((t) => t.index), [2, 3]);
    assert.deepEqual(seen, [1, 1, 2, 2, 3, 3]);
  });
});
