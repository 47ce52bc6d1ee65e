import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SDK } from "./helpers.mjs";

const { realtimeCallsUrl, realtimeWebSocketUrl, websocketProtocols } = await import(SDK("urls.js"));

describe("endpoint urls", () => {
  const forms = [
    "http://localhost:8000",
    "http://localhost:8000/",
    "http://localhost:8000/v1",
    "ws://localhost:8000/v1/realtime",
    "http://localhost:8000/v1/realtime/calls",
  ];
  for (const url of forms) {
    test(url, () => {
      assert.equal(realtimeWebSocketUrl(url, "mimo-audio"), "ws://localhost:8000/v1/realtime?model=mimo-audio");
      assert.equal(realtimeCallsUrl(url), "http://localhost:8000/v1/realtime/calls");
    });
  }

  test("https maps to wss, a path prefix is kept, no model means no query", () => {
    assert.equal(realtimeWebSocketUrl("https://example.com/agent/"), "wss://example.com/agent/v1/realtime");
    assert.equal(realtimeCallsUrl("wss://example.com/agent/v1/realtime"), "https://example.com/agent/v1/realtime/calls");
  });

  test("bad urls are named", () => {
    assert.throws(() => realtimeCallsUrl("localhost:8000"), /must be http\(s\) or ws\(s\)/);
    assert.throws(() => realtimeCallsUrl("not a url"), /invalid server url "not a url"/);
  });
});

describe("websocket subprotocols", () => {
  test("the key travels as openai-insecure-api-key.<key>", () => {
    assert.deepEqual(websocketProtocols("sk-abc_123"), ["realtime", "openai-insecure-api-key.sk-abc_123"]);
    assert.deepEqual(websocketProtocols(undefined), ["realtime"]);
  });
  test("a key that cannot be a subprotocol token is refused", () => {
    assert.throws(() => websocketProtocols("has space"), /visible ASCII/);
    assert.throws(() => websocketProtocols("a,b"), /visible ASCII/);
  });
});
