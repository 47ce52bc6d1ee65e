// Shared test helpers: paths and an in-memory transport (the seam where a socket would be).
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const SDK = (name) => join(REPO_ROOT, "web/sdk", name);

/**
 * A transport that keeps sent events in `sent` and lets the test deliver server messages; it
 * implements the same surface as WebSocketTransport / WebRTCTransport.
 */
export class MemoryTransport {
  constructor(kind = "websocket") {
    this.kind = kind;
    this.ownsPlayback = kind === "webrtc";
    this.sent = [];
    this.bufferedAmount = 0;
    this.callId = kind === "webrtc" ? "rtc_test" : null;
    this.closed = false;
    this.callbacks = null;
  }
  async open(callbacks) {
    this.callbacks = callbacks;
  }
  deliver(event) {
    this.callbacks.onMessage(typeof event === "string" ? event : JSON.stringify(event));
  }
  dropConnection(code = 1006) {
    this.callbacks.onClose({ code, reason: "", error: `connection closed (code ${code})` });
  }
  send(event) {
    // Round-trip through JSON like a real socket, so nothing unserialisable slips through.
    this.sent.push(JSON.parse(JSON.stringify(event)));
  }
  close() {
    this.closed = true;
  }
  async getStats() {
    return { transport: this.kind };
  }
  ofType(type) {
    return this.sent.filter((e) => e.type === type);
  }
}

/** Yield to pending promise callbacks. */
export const settle = () => new Promise((r) => setTimeout(r, 0));
