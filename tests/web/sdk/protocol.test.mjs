import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SDK } from "./helpers.mjs";

const p = await import(SDK("protocol.js"));

describe("pcm16 and base64 codecs", () => {
  test("int16 -> base64 -> int16 is exact, including the extremes", () => {
    const pcm = new Int16Array([0, 1, -1, 32767, -32768, 12345, -23456, 256, -256]);
    const b64 = p.pcm16ToBase64(pcm);
    assert.deepEqual(p.base64ToPcm16(b64), pcm);
  });

  test("wire bytes are little-endian", () => {
    const b64 = p.pcm16ToBase64(new Int16Array([0x0102, -2]));
    assert.deepEqual([...p.base64ToBytes(b64)], [0x02, 0x01, 0xfe, 0xff]);
  });

  test("a long buffer round-trips (chunked base64 path)", () => {
    const pcm = new Int16Array(100_003);
    for (let i = 0; i < pcm.length; i++) pcm[i] = ((i * 7919) % 65536) - 32768;
    assert.deepEqual(p.base64ToPcm16(p.pcm16ToBase64(pcm)), pcm);
  });

  test("pcm16 -> float -> pcm16 is exact for every value", () => {
    const all = Int16Array.from({ length: 65536 }, (_, i) => i - 32768);
    assert.deepEqual(p.floatToPcm16(p.pcm16ToFloat(all)), all);
  });

  test("float -> pcm16 -> float stays within half a step, and clips", () => {
    const x = new Float32Array([0, 0.5, -0.5, 0.999, -1, 1, 1.7, -3, 1e-6]);
    const back = p.pcm16ToFloat(p.floatToPcm16(x));
    const clipped = x.map((v) => Math.max(-1, Math.min(1, v)));
    for (let i = 0; i < x.length; i++) {
      // Half a step of rounding; +1.0 clips to 32767, one step below.
      const tol = clipped[i] === 1 ? 1 / 32768 : 0.5 / 32768 + 1e-9;
      assert.ok(Math.abs(back[i] - clipped[i]) <= tol, `sample ${i}`);
    }
    assert.deepEqual([...p.floatToPcm16(new Float32Array([1, -1]))], [32767, -32768]);
  });

  test("odd byte counts and bad base64 are protocol errors", () => {
    assert.throws(() => p.bytesToPcm16(new Uint8Array(3)), /even number of bytes, got 3/);
    assert.throws(() => p.base64ToBytes("%%%"), p.ProtocolError);
  });
});

describe("ids", () => {
  test("event ids are prefixed, base-62 and distinct", () => {
    const ids = new Set(Array.from({ length: 1000 }, () => p.newId("event")));
    assert.equal(ids.size, 1000);
    for (const id of ids) assert.match(id, /^event_[0-9A-Za-z]{20}$/);
  });
});

describe("client event builders", () => {
  const built = [
    p.sessionUpdate({ instructions: "hi" }),
    p.inputAudioAppend(new Int16Array([1, 2, 3])),
    p.inputAudioCommit(),
    p.inputAudioClear(),
    p.outputAudioClear(),
    p.responseCreate(),
    p.responseCreate({ instructions: "x", output_modalities: ["audio"] }),
    p.responseCancel(),
    p.responseCancel("resp_1"),
    p.itemTruncate("item_1", 1234.9),
    p.userTextMessage("hello"),
    p.itemDelete("item_1"),
    p.itemRetrieve("item_1"),
  ];

  test("every builder output validates", () => {
    for (const event of built) assert.equal(p.validateClientEvent(event), event);
  });

  test("the builders cover every client event type", () => {
    assert.deepEqual(new Set(built.map((e) => e.type)), new Set(p.CLIENT_EVENT_TYPES));
  });

  test("session.update fills in the GA session type", () => {
    assert.deepEqual(p.sessionUpdate({ instructions: "a" }).session, { type: "realtime", instructions: "a" });
    assert.throws(() => p.sessionUpdate("nope"), /session must be an object/);
  });

  test("truncate floors to whole milliseconds and never goes negative", () => {
    assert.equal(p.itemTruncate("i", 1234.9).audio_end_ms, 1234);
    assert.equal(p.itemTruncate("i", -5).audio_end_ms, 0);
    assert.equal(p.itemTruncate("i", 10).content_index, 0);
  });

  test("append encodes the samples it was given", () => {
    const pcm = new Int16Array([5, -5, 300]);
    assert.deepEqual(p.base64ToPcm16(p.inputAudioAppend(pcm).audio), pcm);
    assert.throws(() => p.inputAudioAppend(new Float32Array(3)), /Int16Array/);
  });
});

describe("client event validation names the problem", () => {
  const cases = [
    [{ type: "nope" }, /field "type" has unknown value "nope"/],
    [{}, /missing string field "type"/],
    [[], /must be a JSON object/],
    [{ type: "conversation.item.truncate", item_id: "a", content_index: 0 }, /missing field "audio_end_ms"/],
    [{ type: "conversation.item.truncate", item_id: "a", content_index: 0, audio_end_ms: -1 }, /"audio_end_ms" must be uint/],
    [{ type: "conversation.item.truncate", item_id: "a", content_index: 0, audio_end_ms: 1.5 }, /"audio_end_ms" must be uint/],
    [{ type: "input_audio_buffer.append", audio: "abc" }, /"audio" must be pcm16/],
    [{ type: "input_audio_buffer.append", audio: "AQID" }, /"audio" must be pcm16/], // 3 bytes
    [{ type: "input_audio_buffer.commit", extra: 1 }, /unknown field "extra"/],
    [{ type: "session.update", session: [] }, /"session" must be object, got an array/],
    [{ type: "response.cancel", event_id: 5 }, /"event_id" must be a string/],
  ];
  for (const [event, message] of cases) {
    test(JSON.stringify(event), () => {
      assert.throws(() => p.validateClientEvent(event), (err) => err instanceof p.ProtocolError && message.test(err.message));
    });
  }
});

describe("server event parsing", () => {
  test("parses JSON text and checks the fields clients rely on", () => {
    const e = p.parseServerEvent('{"type":"input_audio_buffer.speech_started","audio_start_ms":10,"item_id":"i"}');
    assert.equal(e.audio_start_ms, 10);
    assert.throws(
      () => p.parseServerEvent({ type: "response.output_audio.delta", response_id: "r", item_id: "i", output_index: 0, content_index: 0 }),
      /server event "response.output_audio.delta": missing field "delta"/,
    );
  });

  test("unknown types pass through untouched (forward compatibility)", () => {
    const e = p.parseServerEvent({ type: "mimo.something_new", x: 1 });
    assert.deepEqual(e, { type: "mimo.something_new", x: 1 });
    assert.equal(p.isKnownServerEvent("mimo.something_new"), false);
  });

  test("non-JSON and non-objects are protocol errors", () => {
    assert.throws(() => p.parseServerEvent("{not json"), /not valid JSON/);
    assert.throws(() => p.parseServerEvent("[1]"), /must be a JSON object/);
    assert.throws(() => p.parseServerEvent('{"type": 3}'), /missing string field "type"/);
  });
});
