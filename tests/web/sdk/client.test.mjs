import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { MemoryTransport, SDK, settle } from "./helpers.mjs";

const p = await import(SDK("protocol.js"));
const { RealtimeClient, ClientState } = await import(SDK("client.js"));
const { PullPlayer } = await import(SDK("player.js"));
const { resample } = await import(SDK("resampler.js"));
const { Emitter } = await import(SDK("emitter.js"));

const SESSION = { type: "realtime", id: "sess_1", model: "mimo-audio-tiny", mimo: { interleave: null } };
const created = { type: "session.created", event_id: "event_1", session: SESSION };
const delta = (samples, { item = "item_a", response = "resp_1" } = {}) => ({
  type: "response.output_audio.delta",
  response_id: response,
  item_id: item,
  output_index: 0,
  content_index: 0,
  delta: p.pcm16ToBase64(p.floatToPcm16(samples)),
});
const ms = (n) => Math.round((n * 24000) / 1000); // samples in n ms at 24 kHz
const tone = (n, v = 0.25) => new Float32Array(n).fill(v);

async function make({ kind = "websocket", session = null, headphones = false, jitter = { prebufferMs: 0 } } = {}) {
  const transport = new MemoryTransport(kind);
  const player = kind === "websocket" ? new PullPlayer({ jitter }) : null;
  const client = new RealtimeClient({ transport, player, session, headphones });
  const opened = client.open({ timeoutMs: 2000 });
  transport.deliver(created);
  await opened;
  return { client, transport, player };
}

describe("Emitter", () => {
  test("on/off/once/'*' and waitFor", async () => {
    const em = new Emitter();
    const seen = [];
    const off = em.on("a", (e) => seen.push(`a${e.n}`));
    em.once("a", (e) => seen.push(`once${e.n}`));
    em.on("*", (e) => seen.push(`*${e.type}`));
    em.emit({ type: "a", n: 1 });
    off();
    em.emit({ type: "a", n: 2 });
    em.emit({ type: "b" });
    assert.deepEqual(seen, ["a1", "once1", "*a", "*a", "*b"]);
    const waiting = em.waitFor("c", { predicate: (e) => e.n === 2 });
    em.emit({ type: "c", n: 1 });
    em.emit({ type: "c", n: 2 });
    assert.equal((await waiting).n, 2);
    await assert.rejects(em.waitFor("never", { timeoutMs: 5 }), /timed out after 5 ms waiting for "never"/);
  });

  test("a throwing handler does not stop the others", () => {
    const em = new Emitter();
    const seen = [];
    const original = console.error;
    console.error = () => {};
    try {
      em.on("x", () => {
        throw new Error("boom");
      });
      em.on("x", () => seen.push(1));
      em.emit({ type: "x" });
    } finally {
      console.error = original;
    }
    assert.deepEqual(seen, [1]);
  });
});

describe("opening", () => {
  test("resolves on session.created, then sends the initial session (WebSocket)", async () => {
    const { client, transport } = await make({ session: { instructions: "hi" } });
    assert.equal(client.state, ClientState.OPEN);
    assert.deepEqual(client.session, SESSION);
    const [update] = transport.ofType("session.update");
    assert.deepEqual(update.session, { type: "realtime", instructions: "hi" });
  });

  test("over WebRTC the session went with the offer: no session.update", async () => {
    const { transport } = await make({ kind: "webrtc", session: { instructions: "hi" } });
    assert.equal(transport.ofType("session.update").length, 0);
  });

  test("an error before session.created rejects with the server's message and closes", async () => {
    const transport = new MemoryTransport();
    const client = new RealtimeClient({ transport });
    const opened = client.open({ timeoutMs: 2000 });
    transport.deliver({ type: "error", error: { type: "invalid_request_error", message: "bad key" } });
    await assert.rejects(opened, /server refused the session: bad key/);
    assert.equal(client.state, ClientState.CLOSED);
    assert.equal(transport.closed, true);
  });

  test("a connection that drops before session.created rejects", async () => {
    const transport = new MemoryTransport();
    const client = new RealtimeClient({ transport });
    const opened = client.open({ timeoutMs: 2000 });
    transport.dropConnection(1011);
    await assert.rejects(opened, /connection closed \(code 1011\)/);
  });

  test("no session.created within the timeout rejects", async () => {
    const client = new RealtimeClient({ transport: new MemoryTransport() });
    await assert.rejects(client.open({ timeoutMs: 10 }), /no session.created from the server within 10 ms/);
  });

  test("a drop after opening emits client.close with the error and releases the media parts", async () => {
    const { client, transport, player } = await make();
    const closes = [];
    client.on("client.close", (e) => closes.push(e));
    transport.deliver(delta(tone(100)));
    transport.dropConnection(1006);
    assert.equal(closes.length, 1);
    assert.match(closes[0].error, /code 1006/);
    assert.equal(player.buffer.bufferedSamples, 0);
    assert.throws(() => client.send(p.inputAudioCommit()), /client is closed/);
  });
});

describe("sending", () => {
  test("send validates before anything leaves and adds an event_id", async () => {
    const { client, transport } = await make();
    const before = transport.sent.length;
    assert.throws(() => client.send({ type: "conversation.item.truncate", item_id: "x" }), /missing field "content_index"/);
    assert.equal(transport.sent.length, before);
    const sent = client.send({ type: "input_audio_buffer.clear", event_id: "mine" });
    assert.equal(sent.event_id, "mine");
  });

  test("sendAudio at 48 kHz sends the streaming-resampled 24 kHz signal; commit flushes the tail", async () => {
    const { client, transport } = await make();
    const x = Float32Array.from({ length: 4800 }, (_, i) => 0.5 * Math.sin((2 * Math.PI * 440 * i) / 48000));
    for (let at = 0; at < x.length; at += 960) client.sendAudio(x.subarray(at, at + 960), 48000);
    client.commit();
    const sent = transport.ofType("input_audio_buffer.append").map((e) => p.base64ToPcm16(e.audio));
    const joined = Int16Array.from(sent.flatMap((a) => [...a]));
    assert.deepEqual(joined, p.floatToPcm16(resample(x, 48000, 24000)));
    assert.equal(transport.sent.at(-1).type, "input_audio_buffer.commit");
  });

  test("Int16 input at 24 kHz goes out unchanged", async () => {
    const { client, transport } = await make();
    const pcm = new Int16Array([1, -2, 3, -4, 32767, -32768]);
    client.sendAudio(pcm, 24000);
    assert.deepEqual(p.base64ToPcm16(transport.ofType("input_audio_buffer.append")[0].audio), pcm);
  });

  test("a backed-up socket drops microphone chunks instead of queueing them", async () => {
    const { client, transport } = await make();
    transport.bufferedAmount = 2 << 20;
    assert.equal(client.sendAudio(tone(480), 24000), false);
    assert.equal(client.counters.audioChunksDroppedBacklog, 1);
    assert.equal(transport.ofType("input_audio_buffer.append").length, 0);
  });

  test("sendAudio is refused over WebRTC and for bad input", async () => {
    const rtc = await make({ kind: "webrtc" });
    assert.throws(() => rtc.client.sendAudio(tone(10), 24000), /microphone track carries the audio/);
    const ws = await make();
    assert.throws(() => ws.client.sendAudio([1, 2], 24000), /Float32Array or an Int16Array/);
    assert.throws(() => ws.client.sendAudio(tone(10), 44.1), /sampleRate must be an integer/);
  });

  test("sendText adds a user message and asks for a response", async () => {
    const { client, transport } = await make();
    client.sendText("hello");
    assert.deepEqual(
      transport.sent.slice(-2).map((e) => e.type),
      ["conversation.item.create", "response.create"],
    );
    assert.equal(transport.sent.at(-2).item.content[0].text, "hello");
  });
});

describe("agent audio and interruption (WebSocket)", () => {
  test("speech_started stops playback and truncates to the milliseconds actually played", async () => {
    const { client, transport, player } = await make();
    const events = [];
    client.on("client.interrupted", (e) => events.push(e));
    transport.deliver({ type: "response.created", response: { id: "resp_1" } });
    transport.deliver(delta(tone(ms(500))));
    player.pull(ms(120));
    transport.deliver({ type: "input_audio_buffer.speech_started", audio_start_ms: 0, item_id: "user_2" });
    await settle();
    const truncates = transport.ofType("conversation.item.truncate");
    assert.equal(truncates.length, 1);
    assert.deepEqual([truncates[0].item_id, truncates[0].audio_end_ms], ["item_a", 120]);
    assert.equal(transport.ofType("response.cancel").length, 0, "the server cancels on its own VAD");
    assert.equal(player.buffer.bufferedSamples, 0, "playback stopped");
    assert.deepEqual(events.map((e) => [e.reason, e.audio_end_ms]), [["speech_started", 120]]);
    // Audio of the interrupted response still in flight is dropped, not played.
    transport.deliver(delta(tone(ms(100))));
    assert.equal(player.buffer.bufferedSamples, 0);
    assert.equal(client.counters.audioDeltasDiscarded, 1);
    // The next response plays.
    transport.deliver(delta(tone(ms(100)), { item: "item_b", response: "resp_2" }));
    assert.equal(player.buffer.bufferedSamples, ms(100));
  });

  test("no truncate when the reply was heard to the end", async () => {
    const { transport, player } = await make();
    transport.deliver({ type: "response.created", response: { id: "resp_1" } });
    transport.deliver(delta(tone(ms(100))));
    transport.deliver({ type: "response.done", response: { id: "resp_1", status: "completed" } });
    player.pull(ms(150));
    transport.deliver({ type: "input_audio_buffer.speech_started", audio_start_ms: 0, item_id: "u" });
    await settle();
    assert.equal(transport.ofType("conversation.item.truncate").length, 0);
  });

  test("interrupt() cancels the active response and truncates", async () => {
    const { client, transport, player } = await make();
    transport.deliver({ type: "response.created", response: { id: "resp_1" } });
    transport.deliver(delta(tone(ms(300))));
    player.pull(ms(40));
    const result = await client.interrupt();
    assert.deepEqual(result, { item_id: "item_a", audio_end_ms: 40 });
    assert.deepEqual(
      transport.sent.slice(-2).map((e) => e.type),
      ["response.cancel", "conversation.item.truncate"],
    );
    assert.equal(transport.ofType("response.cancel")[0].response_id, "resp_1");
    assert.equal(await client.interrupt(), null, "nothing left to interrupt");
  });

  test("playback_started is emitted when an item's first sample plays", async () => {
    const { client, transport, player } = await make({ jitter: { prebufferMs: 40 } });
    const started = [];
    client.on("client.playback_started", (e) => started.push(e.item_id));
    transport.deliver(delta(tone(ms(20))));
    player.pull(ms(10));
    assert.deepEqual(started, []);
    transport.deliver(delta(tone(ms(30))));
    player.pull(ms(10));
    assert.deepEqual(started, ["item_a"]);
  });

  test("the microphone is ducked while the agent is audible, unless headphones", async () => {
    for (const headphones of [false, true]) {
      const { client, transport, player } = await make({ headphones });
      transport.deliver(delta(tone(ms(40))));
      client.sendAudio(tone(480, 0.5), 24000);
      const during = p.base64ToPcm16(transport.ofType("input_audio_buffer.append").at(-1).audio);
      assert.equal(during.some((v) => v !== 0), headphones, `headphones=${headphones}`);
      assert.equal(client.ducked, !headphones);
      player.pull(ms(40));
      player.endOfStream();
      player.pull(ms(10));
      client.sendAudio(tone(480, 0.5), 24000);
      const after = p.base64ToPcm16(transport.ofType("input_audio_buffer.append").at(-1).audio);
      assert.equal(after.some((v) => v !== 0), true, "open again once the audio drained");
    }
  });

  test("microphone blocks become level events and audio (WebSocket)", async () => {
    const transport = new MemoryTransport();
    const mic = { sampleRate: 24000, onBlock: null, closed: false, close() { this.closed = true; } };
    const client = new RealtimeClient({ transport, player: new PullPlayer(), microphone: mic });
    const opened = client.open({ timeoutMs: 1000 });
    transport.deliver(created);
    await opened;
    const levels = [];
    client.on("client.mic_level", (e) => levels.push(e));
    mic.onBlock({ samples: tone(480, 0.1), rms: 0.1, peak: 0.1, t: 123 });
    assert.deepEqual(levels.map((e) => [e.rms, e.ducked, e.t]), [[0.1, false, 123]]);
    assert.equal(transport.ofType("input_audio_buffer.append").length, 1);
    client.close();
    assert.equal(mic.closed, true);
  });
});

describe("WebRTC interruption", () => {
  test("interrupt() cancels and clears the server's playout buffer; no truncate", async () => {
    const { client, transport } = await make({ kind: "webrtc" });
    transport.deliver({ type: "response.created", response: { id: "resp_1" } });
    transport.deliver({ type: "output_audio_buffer.started", response_id: "resp_1" });
    assert.equal(await client.interrupt(), null);
    assert.deepEqual(
      transport.sent.map((e) => e.type),
      ["response.cancel", "output_audio_buffer.clear"],
    );
  });

  test("the remote track becoming audible is the played anchor", async () => {
    const transport = new MemoryTransport("webrtc");
    const remoteAudio = { onAudible: null, close() {} };
    const client = new RealtimeClient({ transport, remoteAudio });
    const opened = client.open({ timeoutMs: 1000 });
    transport.deliver(created);
    await opened;
    const seen = [];
    client.on("client.playback_started", (e) => seen.push(e.t));
    remoteAudio.onAudible(42);
    assert.deepEqual(seen, [42]);
  });
});

describe("robustness", () => {
  test("malformed server messages become client.error and the session goes on", async () => {
    const { client, transport } = await make();
    const errors = [];
    client.on("client.error", (e) => errors.push(e.error.message));
    transport.deliver("{nope");
    transport.deliver({ type: "response.output_audio.delta", response_id: "r" });
    transport.deliver({ type: "session.updated", session: SESSION });
    assert.equal(errors.length, 2);
    assert.match(errors[0], /not valid JSON/);
    assert.match(errors[1], /missing field "item_id"/);
    assert.equal(client.counters.protocolErrors, 2);
    assert.equal(client.state, ClientState.OPEN);
  });

  test("getStats merges counters, player and transport", async () => {
    const { client, transport, player } = await make();
    transport.deliver(delta(tone(ms(50))));
    player.pull(ms(20));
    const stats = await client.getStats();
    assert.equal(stats.audioDeltasReceived, 1);
    assert.equal(stats.audioMsReceived, 50);
    assert.equal(stats.player.playedMs, 20);
    assert.equal(stats.transport.transport, "websocket");
  });
});
