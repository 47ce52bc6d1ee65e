import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SDK } from "./helpers.mjs";

const { JitterBuffer, PlaybackState } = await import(SDK("jitter-buffer.js"));

// A 1 kHz "sample rate" makes one sample one millisecond, so the arithmetic reads directly.
const make = (options = {}) =>
  new JitterBuffer({ sampleRate: 1000, prebufferMs: 20, maxPrebufferMs: 50, underrunStepMs: 10, maxBufferMs: 100, ...options });
const ramp = (from, n) => Float32Array.from({ length: n }, (_, i) => from + i);
const pull = (jb, n) => {
  const out = new Float32Array(n);
  const written = jb.pull(out);
  return { out: [...out], written };
};

describe("JitterBuffer", () => {
  test("waits for the pre-buffer, then plays in order", () => {
    const jb = make();
    jb.push(ramp(1, 10), "a");
    assert.deepEqual(pull(jb, 5), { out: [0, 0, 0, 0, 0], written: 0 });
    assert.equal(jb.state, PlaybackState.BUFFERING);
    jb.push(ramp(11, 10), "a");
    assert.deepEqual(pull(jb, 5), { out: [1, 2, 3, 4, 5], written: 5 });
    assert.equal(jb.state, PlaybackState.PLAYING);
    assert.deepEqual(jb.takeEvents(), [{ type: "started", itemId: "a", offset: 0 }]);
  });

  test("a reply shorter than the pre-buffer plays once the stream ends", () => {
    const jb = make();
    jb.push(ramp(1, 5), "a");
    assert.equal(pull(jb, 5).written, 0);
    jb.endOfStream();
    assert.deepEqual(pull(jb, 8), { out: [1, 2, 3, 4, 5, 0, 0, 0], written: 5 });
    assert.equal(jb.state, PlaybackState.IDLE);
    assert.deepEqual(
      jb.takeEvents().map((e) => e.type),
      ["started", "drained"],
    );
    assert.equal(jb.stats.underruns, 0, "the end of a stream is not an underrun");
  });

  test("beyond the cap the oldest audio is dropped, and it never counts as played", () => {
    const jb = make();
    jb.push(ramp(0, 60), "a");
    jb.push(ramp(60, 60), "a"); // 120 ms > 100 ms cap: samples 0..19 go
    assert.equal(jb.bufferedSamples, 100);
    assert.equal(jb.stats.droppedSamples, 20);
    assert.deepEqual(jb.takeEvents(), [{ type: "dropped", itemId: "a", samples: 20 }]);
    const { out } = pull(jb, 3);
    assert.deepEqual(out, [20, 21, 22]);
    // The heard position is the item offset of the last played sample, past the dropped gap.
    assert.equal(jb.playedMs("a"), 23);
    assert.equal(jb.stats.playedSamples, 3);
  });

  test("a drop can cut through several chunks and items", () => {
    const jb = make();
    jb.push(ramp(0, 30), "a");
    jb.push(ramp(100, 30), "b");
    jb.push(ramp(200, 90), "c"); // 150 buffered: drop all of a and 20 of b
    assert.deepEqual(jb.takeEvents(), [
      { type: "dropped", itemId: "a", samples: 30 },
      { type: "dropped", itemId: "b", samples: 20 },
    ]);
    assert.deepEqual(pull(jb, 12).out, [120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 200, 201]);
    assert.equal(jb.playedMs("a"), 0);
    assert.equal(jb.playedMs("b"), 30);
    assert.equal(jb.playedMs("c"), 2);
  });

  test("played-ms accounting per item across pulls that span chunk boundaries", () => {
    const jb = make({ prebufferMs: 0 });
    jb.push(ramp(0, 7), "a");
    jb.push(ramp(7, 7), "a");
    jb.push(ramp(0, 5), "b");
    pull(jb, 10);
    assert.equal(jb.playedMs("a"), 10);
    pull(jb, 6);
    assert.equal(jb.playedMs("a"), 14);
    assert.equal(jb.playedMs("b"), 2);
    assert.equal(jb.receivedMs("b"), 5);
    const events = jb.takeEvents();
    assert.deepEqual(events, [
      { type: "started", itemId: "a", offset: 0 },
      { type: "started", itemId: "b", offset: 4 },
    ]);
  });

  test("an underrun rebuffers with a longer pre-buffer, capped", () => {
    const jb = make();
    const underrunOnce = () => {
      jb.push(ramp(1, 60), "a");
      pull(jb, 60);
      pull(jb, 5); // dry mid-stream
    };
    underrunOnce();
    assert.equal(jb.stats.underruns, 1);
    assert.equal(jb.prebufferSamples, 30);
    assert.equal(jb.state, PlaybackState.BUFFERING);
    jb.push(ramp(1, 25), "a");
    assert.equal(pull(jb, 5).written, 0, "25 ms < the new 30 ms pre-buffer");
    jb.clear(); // the learned pre-buffer survives a clear
    assert.equal(jb.prebufferSamples, 30);
    for (let i = 0; i < 5; i++) underrunOnce();
    assert.equal(jb.prebufferSamples, 50, "pre-buffer stops at maxPrebufferMs");
  });

  test("clear stops at once and reports what was heard of the playing item", () => {
    const jb = make();
    jb.push(ramp(0, 80), "a");
    pull(jb, 30);
    const heard = jb.clear();
    assert.deepEqual(heard, { itemId: "a", playedMs: 30, receivedMs: 80, discardedMs: 50 });
    assert.equal(jb.state, PlaybackState.IDLE);
    assert.equal(jb.bufferedSamples, 0);
    assert.equal(pull(jb, 10).written, 0);
    assert.equal(jb.stats.clearedSamples, 50);
  });

  test("clear before anything played names the queued item with 0 ms heard", () => {
    const jb = make();
    jb.push(ramp(0, 10), "x");
    assert.deepEqual(jb.clear(), { itemId: "x", playedMs: 0, receivedMs: 10, discardedMs: 10 });
    assert.deepEqual(make().clear(), { itemId: null, playedMs: 0, receivedMs: 0, discardedMs: 0 });
  });

  test("clear can report on a named item: one queued behind another was not heard", () => {
    const jb = make({ prebufferMs: 0 });
    jb.push(ramp(0, 30), "a");
    jb.push(ramp(0, 30), "b");
    pull(jb, 10);
    assert.deepEqual(jb.clear("b"), { itemId: "b", playedMs: 0, receivedMs: 30, discardedMs: 50 });
  });

  test("per-item accounting is bounded", () => {
    const jb = make({ maxItems: 3, prebufferMs: 0 });
    for (const id of ["a", "b", "c", "d"]) jb.push(ramp(0, 1), id);
    assert.equal(jb.items.size, 3);
    assert.equal(jb.items.has("a"), false);
  });

  test("bad options are named", () => {
    assert.throws(() => make({ maxBufferMs: 40 }), /maxBufferMs \(40\) must exceed maxPrebufferMs \(50\)/);
    assert.throws(() => make({ prebufferMs: 60 }), /prebufferMs \(60\) must not exceed maxPrebufferMs/);
    assert.throws(() => make({ underrunStepMs: -1 }), /underrunStepMs must be a number >= 0/);
    assert.throws(() => make().push([1, 2]), /Float32Array/);
  });
});
