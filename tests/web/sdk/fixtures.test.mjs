// The SDK against the protocol's golden fixtures (tests/fixtures/realtime/, shared with the
// Python server's tests): what the SDK sends has the fixtures' shape, every server fixture parses
// and reaches its handler, and the SDK refuses the malformed client events it can judge locally.
import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { MemoryTransport, REPO_ROOT, SDK, settle } from "./helpers.mjs";

const p = await import(SDK("protocol.js"));
const { RealtimeClient } = await import(SDK("client.js"));
const { PullPlayer } = await import(SDK("player.js"));
const { buildSession } = await import(SDK("session.js"));

const FIXTURES = process.env.MIMO_REALTIME_FIXTURES ?? join(REPO_ROOT, "tests/fixtures/realtime");

function load(dir) {
  const path = join(FIXTURES, dir);
  assert.ok(
    existsSync(path),
    `golden fixtures missing: ${path} (written by the protocol module; set MIMO_REALTIME_FIXTURES to use another copy)`,
  );
  return readdirSync(path)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => ({ name: f, data: JSON.parse(readFileSync(join(path, f), "utf8")) }));
}

/** path -> set of JSON types, arrays as "[]". */
function flatten(value, path = "", out = new Map()) {
  const kind = value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
  if (!out.has(path)) out.set(path, new Set());
  out.get(path).add(kind);
  if (kind === "object") for (const [k, v] of Object.entries(value)) flatten(v, path ? `${path}.${k}` : k, out);
  if (kind === "array") for (const item of value) flatten(item, `${path}[]`, out);
  return out;
}

/** Fields of `event` that no fixture of its type has, or has with another JSON type. */
function shapeProblems(event, fixtures) {
  // Every GA client event may carry an optional event_id, whether or not its fixture shows one.
  const allowed = new Map([["event_id", new Set(["string"])]]);
  for (const f of fixtures) {
    for (const [path, kinds] of flatten(f)) {
      if (!allowed.has(path)) allowed.set(path, new Set());
      for (const k of kinds) allowed.get(path).add(k);
    }
  }
  const problems = [];
  for (const [path, kinds] of flatten(event)) {
    const ok = allowed.get(path);
    if (!ok) problems.push(`${path || "(root)"}: not in any fixture`);
    else for (const k of kinds) if (!ok.has(k) && !ok.has("null")) problems.push(`${path}: ${k}, fixtures have ${[...ok]}`);
  }
  return problems;
}

function openClient(kind = "websocket") {
  const transport = new MemoryTransport(kind);
  const player = kind === "websocket" ? new PullPlayer({ jitter: { prebufferMs: 0 } }) : null;
  let t = 0;
  const client = new RealtimeClient({ transport, player, clock: () => (t += 1) });
  const opened = client.open({ timeoutMs: 1000 });
  return { client, transport, player, opened };
}

async function connected(kind = "websocket") {
  const parts = openClient(kind);
  parts.transport.deliver(load("server").find((f) => f.name === "session.created.json").data);
  await parts.opened;
  return parts;
}

/** Fixture events grouped by event type (variants of a type side by side). */
const byType = (events) => {
  const map = new Map();
  for (const e of events) {
    if (!map.has(e.type)) map.set(e.type, []);
    map.get(e.type).push(e);
  }
  return map;
};

describe("client fixtures", () => {
  test("every client fixture passes the SDK's validation", () => {
    const fixtures = load("client");
    assert.ok(fixtures.length > 0);
    for (const { name, data } of fixtures) {
      assert.doesNotThrow(() => p.validateClientEvent(data), `${name}`);
      assert.ok(p.CLIENT_EVENT_TYPES.includes(data.type), `${name}: type unknown to the SDK`);
    }
  });

  test("every event the SDK sends has the shape of the fixtures of its type, and every fixture type is covered", async () => {
    const fixtures = byType(load("client").map((f) => f.data));
    const ws = await connected("websocket");
    const c = ws.client;
    c.updateSession(
      buildSession({
        instructions: "Be brief.",
        outputModalities: ["audio"],
        voice: "alloy",
        turnDetection: "server_vad",
        vad: { threshold: 0.6, silence_duration_ms: 400 },
        interleave: "5:5",
        text: { temperature: 0.6, top_p: 0.95 },
        speech: { temperature: 0.9, top_k: 50, top_p: 0.95 },
        task: "spoken_dialogue",
      }),
    );
    c.sendAudio(new Float32Array(480).fill(0.1), 24000);
    c.commit();
    c.clearInput();
    c.createResponse();
    c.createResponse({ instructions: "One sentence.", output_modalities: ["audio"], max_output_tokens: 100 });
    c.sendText("What is the capital of France?");
    c.send(p.itemDelete("item_1"));
    c.send(p.itemRetrieve("item_1"));
    // An interruption with audio in flight: response.cancel with the id, then the truncate.
    const server = byType(load("server").map((f) => f.data));
    ws.transport.deliver(server.get("response.created")[0]);
    ws.transport.deliver(server.get("response.output_audio.delta")[0]);
    ws.player.pull(4);
    await c.interrupt();
    const rtc = await connected("webrtc");
    rtc.transport.deliver(server.get("output_audio_buffer.started")[0]);
    await rtc.client.interrupt();
    rtc.client.send(p.responseCancel());

    const sent = [...ws.transport.sent, ...rtc.transport.sent];
    for (const event of sent) {
      assert.ok(fixtures.has(event.type), `no fixture for sent type ${event.type}`);
      assert.deepEqual(shapeProblems(event, fixtures.get(event.type)), [], `${event.type}: ${JSON.stringify(event)}`);
      assert.match(event.event_id, /^event_[0-9A-Za-z]{20}$/);
    }
    assert.deepEqual(new Set(sent.map((e) => e.type)), new Set(fixtures.keys()), "the SDK builds every client event type");
  });
});

describe("server fixtures", () => {
  test("every server fixture parses, is known, and is emitted once without a client error", async () => {
    const { client, transport } = await connected("websocket");
    const errors = [];
    client.on("client.error", (e) => errors.push(e.error.message));
    for (const { name, data } of load("server")) {
      assert.doesNotThrow(() => p.parseServerEvent(JSON.stringify(data)), name);
      assert.ok(p.isKnownServerEvent(data.type), `${name}: type unknown to the SDK`);
      const typed = [];
      const any = [];
      const offTyped = client.on(data.type, (e) => typed.push(e));
      const offAny = client.on("*", (e) => e.type.startsWith("client.") || any.push(e));
      transport.deliver(data);
      offTyped();
      offAny();
      assert.deepEqual(typed, [data], `${name} reaches its "${data.type}" handlers`);
      assert.deepEqual(any, [data], `${name} reaches "*"`);
    }
    await settle();
    assert.deepEqual(errors, []);
  });

  test("every event the client handles internally has a fixture", () => {
    const types = new Set(load("server").map((f) => f.data.type));
    for (const type of RealtimeClient.HANDLED_EVENTS) assert.ok(types.has(type), `no server fixture for handled ${type}`);
  });

  test("each handled fixture has its effect on the client", async () => {
    const server = byType(load("server").map((f) => f.data));
    const one = (type, suffix = "") => server.get(type).find((e) => !suffix || e.response?.status === suffix) ?? server.get(type)[0];

    const { client, transport, player } = await connected("websocket");
    assert.deepEqual(client.session, one("session.created").session);
    transport.deliver(one("session.updated"));
    assert.deepEqual(client.session, one("session.updated").session);

    transport.deliver(one("error"));
    assert.deepEqual(client.lastError, one("error").error);

    transport.deliver(one("response.created"));
    assert.equal(client.activeResponseId, one("response.created").response.id);

    const delta = one("response.output_audio.delta");
    transport.deliver(delta);
    const expected = p.pcm16ToFloat(p.base64ToPcm16(delta.delta));
    assert.deepEqual(player.pull(expected.length), expected, "the delta's samples reach the player");
    assert.equal(client.counters.audioDeltasReceived, 1);

    transport.deliver(delta);
    transport.deliver(one("input_audio_buffer.speech_started"));
    await settle();
    const [truncate] = transport.ofType("conversation.item.truncate");
    assert.equal(truncate.item_id, delta.item_id);
    assert.equal(truncate.audio_end_ms, Math.floor((expected.length * 1000) / 24000));

    transport.deliver(one("response.done", "cancelled"));
    assert.equal(client.activeResponseId, null);

    const rtc = await connected("webrtc");
    rtc.transport.deliver(one("output_audio_buffer.started"));
    assert.equal(rtc.client.agentSpeaking, true);
    rtc.transport.deliver(one("output_audio_buffer.stopped"));
    assert.equal(rtc.client.agentSpeaking, false);
    rtc.transport.deliver(one("output_audio_buffer.started"));
    rtc.transport.deliver(one("output_audio_buffer.cleared"));
    assert.equal(rtc.client.agentSpeaking, false);
  });

  test("response.output_audio.done lets a short reply play without waiting for the pre-buffer", async () => {
    const server = byType(load("server").map((f) => f.data));
    const transport = new MemoryTransport("websocket");
    const player = new PullPlayer({ jitter: { prebufferMs: 100 } });
    const client = new RealtimeClient({ transport, player });
    const opened = client.open({ timeoutMs: 1000 });
    transport.deliver(server.get("session.created")[0]);
    await opened;
    const delta = server.get("response.output_audio.delta")[0];
    transport.deliver(delta);
    assert.equal(player.pull(4).some((x) => x !== 0), false, "below the pre-buffer: silence");
    transport.deliver(server.get("response.output_audio.done")[0]);
    assert.equal(player.pull(4).some((x) => x !== 0), true);
  });
});

describe("invalid fixtures", () => {
  // Judged by the server only: they need session state (items, buffers, responses) or the
  // contents of the session/item/response objects, which the SDK passes through as given.
  const SERVER_JUDGED = new Set([
    "bad_beta_format.json",
    "bad_interleave.json", // buildSession checks "N:M" itself; a hand-made session.update goes through
    "bad_modality.json",
    "cancel_not_active.json",
    "commit_empty.json",
    "delete_unknown_item.json",
    "empty_content.json",
    "function_call_item.json",
    "image_content.json",
    "item_audio_invalid_base64.json",
    "previous_item_unknown.json",
    "response_input.json",
    "retrieve_unknown_item.json",
    "role_content_mismatch.json",
    "threshold_out_of_range.json",
    "tools.json",
    "transcription_session.json",
    "truncate_unknown_item.json",
    "unknown_parameter.json",
    "unsupported_format.json",
    "unsupported_output_rate.json",
    "unsupported_pcm_rate.json",
    "wrong_type_bool.json",
  ]);

  test("the SDK refuses, naming the field, every malformed event it can judge alone", () => {
    const fixtures = load("invalid");
    for (const { name, data } of fixtures) {
      if (SERVER_JUDGED.has(name)) continue;
      let event;
      if ("raw" in data) {
        try {
          event = JSON.parse(data.raw);
        } catch {
          continue; // not JSON: the SDK only ever sends JSON.stringify output
        }
      } else {
        event = data.send;
      }
      assert.throws(
        () => p.validateClientEvent(event),
        (err) => err instanceof p.ProtocolError && (!data.expect.param || err.message.includes(`"${data.expect.param}"`)),
        `${name}: ${data.description}`,
      );
    }
  });

  test("server-judged fixtures pass the SDK so the server can answer with its error", () => {
    const names = new Set(load("invalid").map((f) => f.name));
    for (const name of SERVER_JUDGED) assert.ok(names.has(name), `${name} is no longer a fixture`);
    for (const { name, data } of load("invalid")) {
      if (SERVER_JUDGED.has(name)) assert.doesNotThrow(() => p.validateClientEvent(data.send), name);
    }
  });

  test("buildSession refuses the interleave value the server refuses", () => {
    const bad = load("invalid").find((f) => f.name === "bad_interleave.json").data.send.session.mimo.interleave;
    assert.throws(() => buildSession({ interleave: bad }), /interleave must look like "N:M"/);
  });
});
