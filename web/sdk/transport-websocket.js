/**
 * WebSocket transport: JSON text frames on `/v1/realtime`, audio as base64 pcm16 in events; the
 * client plays agent audio itself (see player.js).
 *
 * Every transport has the same surface: `kind`, `ownsPlayback`, `open({onMessage, onClose, onError})`,
 * `send(event)`, `close()`, `bufferedAmount` and `getStats()`.
 */

import { realtimeWebSocketUrl, websocketProtocols } from "./urls.js";

export class WebSocketTransport {
  kind = "websocket";
  /** Agent audio arrives as events and the client plays it. */
  ownsPlayback = false;

  /**
   * @param {object} options
   * @param {string} options.url server URL (see urls.js)
   * @param {string} [options.apiKey] sent as the `openai-insecure-api-key.<key>` subprotocol
   * @param {string} [options.model] the `model` query parameter
   * @param {typeof WebSocket} [options.WebSocket] implementation (defaults to the global one)
   */
  constructor({ url, apiKey, model, WebSocket: impl = globalThis.WebSocket }) {
    if (!impl) throw new Error("no WebSocket implementation in this environment");
    this.url = realtimeWebSocketUrl(url, model);
    this.protocols = websocketProtocols(apiKey);
    this.impl = impl;
    this.ws = null;
  }

  /** Bytes queued in the socket and not yet sent (backpressure signal for audio). */
  get bufferedAmount() {
    return this.ws ? this.ws.bufferedAmount : 0;
  }

  /**
   * Connect. `onMessage(text)` gets every text frame, `onError(message)` reports a frame that
   * cannot be an event, and `onClose({code, reason, error})` fires once when the connection ends
   * after it opened. Rejects when the socket cannot open.
   */
  open({ onMessage, onClose, onError }) {
    return new Promise((resolve, reject) => {
      let opened = false;
      const ws = new this.impl(this.url, this.protocols);
      this.ws = ws;
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        opened = true;
        resolve();
      };
      ws.onmessage = (e) => {
        if (typeof e.data === "string") onMessage(e.data);
        else onError(`unexpected binary frame (${e.data.byteLength ?? "?"} bytes): the protocol uses JSON text frames`);
      };
      // Browsers hide the reason of a failed handshake; the close event that follows carries
      // the code, so the rejection waits for it.
      ws.onerror = () => {};
      ws.onclose = (e) => {
        this.ws = null;
        if (!opened) {
          const detail = e.code === 1006 ? "server unreachable or handshake refused" : e.reason || "closed";
          reject(new Error(`WebSocket connection to ${this.url} failed (code ${e.code}: ${detail})`));
          return;
        }
        onClose({ code: e.code, reason: e.reason, error: e.code === 1000 ? null : `connection closed (code ${e.code}${e.reason ? `: ${e.reason}` : ""})` });
      };
    });
  }

  /** Send one event as a JSON text frame. */
  send(event) {
    if (!this.ws || this.ws.readyState !== 1) throw new Error("WebSocket is not open");
    this.ws.send(JSON.stringify(event));
  }

  close(code = 1000, reason = "client closed") {
    const ws = this.ws;
    if (ws && ws.readyState <= 1) ws.close(code, reason);
  }

  async getStats() {
    return { transport: this.kind, bufferedAmount: this.bufferedAmount };
  }
}
