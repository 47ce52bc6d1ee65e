/**
 * WebRTC transport (OpenAI Realtime GA flow): the microphone goes up as an Opus track, agent
 * audio comes back on the remote track and plays through an <audio> element (so Chrome's echo
 * canceller sees it), and events travel as JSON on the `oai-events` data channel. The server owns
 * the playout buffer and reports it with `output_audio_buffer.started/stopped/cleared`.
 *
 * Signalling: `POST /v1/realtime/calls` with the SDP offer, as `application/sdp`, or as a
 * multipart form with `sdp` and `session` (JSON) parts when there are session settings; the reply
 * is `201 Created` with the SDP answer and a `Location` header naming the call.
 * No trickle ICE: the offer carries every candidate gathered within `iceGatheringTimeoutMs`.
 */

import { replyDetail } from "./access.js";
import { realtimeCallsUrl } from "./urls.js";

export const WEBRTC_DEFAULTS = Object.freeze({ iceGatheringTimeoutMs: 2000, openTimeoutMs: 10000 });

function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(message)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    // Slow STUN servers must not stall the call: go with the candidates gathered so far.
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

export class WebRTCTransport {
  kind = "webrtc";
  /** The server paces and plays agent audio on the media track. */
  ownsPlayback = true;

  /**
   * @param {object} options
   * @param {string} options.url server URL (see urls.js)
   * @param {string} [options.apiKey] sent as `Authorization: Bearer <key>` on the SDP POST
   * @param {string} [options.model] goes into the session part
   * @param {object} [options.session] GA session settings for the call
   * @param {RTCIceServer[]} [options.iceServers=[]] STUN/TURN servers; none by default
   *   (host candidates: localhost and LAN)
   * @param {MediaStream|null} [options.stream] microphone; null receives only
   * @param {HTMLAudioElement|null} [options.audioElement] plays the agent's audio
   * @param {(stream: MediaStream) => void} [options.onRemoteStream] called with the agent's stream
   */
  constructor({
    url,
    apiKey,
    model,
    session,
    iceServers = [],
    stream = null,
    audioElement = null,
    onRemoteStream = null,
    iceGatheringTimeoutMs = WEBRTC_DEFAULTS.iceGatheringTimeoutMs,
    openTimeoutMs = WEBRTC_DEFAULTS.openTimeoutMs,
    RTCPeerConnection: impl = globalThis.RTCPeerConnection,
    fetch: fetchImpl = globalThis.fetch?.bind(globalThis),
  }) {
    if (!impl) throw new Error("no RTCPeerConnection in this environment: use the websocket transport");
    this.callsUrl = realtimeCallsUrl(url);
    this.apiKey = apiKey;
    this.sessionPart = session || model ? { type: "realtime", ...(model ? { model } : {}), ...(session ?? {}) } : null;
    this.iceServers = iceServers;
    this.stream = stream;
    this.audioElement = audioElement;
    this.onRemoteStream = onRemoteStream;
    this.iceGatheringTimeoutMs = iceGatheringTimeoutMs;
    this.openTimeoutMs = openTimeoutMs;
    this.impl = impl;
    this.fetch = fetchImpl;
    this.pc = null;
    this.dc = null;
    this.callId = null;
    this.closed = false;
  }

  get bufferedAmount() {
    return this.dc ? this.dc.bufferedAmount : 0;
  }

  /** Offer, exchange SDP, wait for the data channel. See WebSocketTransport.open for callbacks. */
  async open({ onMessage, onClose, onError }) {
    const pc = new this.impl({ iceServers: this.iceServers });
    this.pc = pc;
    let opened = false;
    let failOpen;
    const failed = new Promise((_, reject) => {
      failOpen = reject;
    });
    failed.catch(() => {}); // observed through the race below; never an unhandled rejection
    const finish = (info) => {
      if (this.closed) return;
      this.closed = true;
      if (opened) onClose(info);
      else failOpen(new Error(info.error ?? "WebRTC connection closed while connecting"));
    };

    const track = this.stream?.getAudioTracks()[0];
    if (track) pc.addTrack(track, this.stream);
    else pc.addTransceiver("audio", { direction: "recvonly" });
    pc.ontrack = (e) => {
      const remote = e.streams[0] ?? new MediaStream([e.track]);
      if (this.audioElement) {
        this.audioElement.srcObject = remote;
        this.audioElement.play().catch((err) => onError(`agent audio cannot start playing: ${err.message}`));
      }
      this.onRemoteStream?.(remote);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") {
        finish({ code: 1006, reason: "", error: "WebRTC connection failed (ICE: no route between browser and server; a TURN server may be needed)" });
      }
    };

    // The data channel must exist before the offer so that the SDP carries it.
    const dc = pc.createDataChannel("oai-events");
    this.dc = dc;
    const dcOpen = new Promise((resolve) => {
      dc.onopen = resolve;
    });
    dc.onmessage = (e) => {
      if (typeof e.data === "string") onMessage(e.data);
      else onError("unexpected binary data-channel message: events are JSON text");
    };
    dc.onclose = () => finish({ code: 1000, reason: "data channel closed", error: null });

    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, this.iceGatheringTimeoutMs);
      const answer = await this.#exchange(pc.localDescription.sdp);
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
      await withTimeout(
        Promise.race([dcOpen, failed]),
        this.openTimeoutMs,
        `the oai-events data channel did not open within ${this.openTimeoutMs} ms (ICE could not connect)`,
      );
      opened = true;
    } catch (err) {
      this.closed = true;
      pc.close();
      throw err;
    }
  }

  async #exchange(sdp) {
    const headers = {};
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    let body = sdp;
    if (this.sessionPart) {
      body = new FormData();
      body.set("sdp", sdp);
      body.set("session", JSON.stringify(this.sessionPart));
    } else {
      headers["Content-Type"] = "application/sdp";
    }
    let res;
    try {
      res = await this.fetch(this.callsUrl, { method: "POST", headers, body });
    } catch (err) {
      throw new Error(`cannot reach ${this.callsUrl}: ${err.message}`);
    }
    const text = await res.text();
    if (!res.ok) throw new Error(`SDP offer rejected by ${this.callsUrl}: HTTP ${res.status} ${replyDetail(res, text)}`.trim());
    if (!text.startsWith("v=")) throw new Error(`${this.callsUrl} answered HTTP ${res.status} without an SDP answer`);
    const location = res.headers.get("Location");
    this.callId = location ? location.replace(/\/+$/, "").split("/").pop() : null;
    return text;
  }

  /** Send one event on the data channel. */
  send(event) {
    if (!this.dc || this.dc.readyState !== "open") throw new Error("the oai-events data channel is not open");
    this.dc.send(JSON.stringify(event));
  }

  close() {
    this.closed = true;
    this.dc?.close();
    this.pc?.close();
    if (this.audioElement) this.audioElement.srcObject = null;
  }

  /** Selected RTP/ICE statistics, flattened. */
  async getStats() {
    const out = { transport: this.kind, callId: this.callId };
    if (!this.pc) return out;
    const report = await this.pc.getStats();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        out.inbound = {
          packetsReceived: s.packetsReceived,
          packetsLost: s.packetsLost,
          jitterMs: s.jitter !== undefined ? s.jitter * 1000 : undefined,
          totalSamplesReceived: s.totalSamplesReceived,
          concealedSamples: s.concealedSamples,
          jitterBufferDelayMs:
            s.jitterBufferEmittedCount > 0 ? (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount : undefined,
          audioMsReceived: s.totalSamplesDuration !== undefined ? s.totalSamplesDuration * 1000 : undefined,
        };
      } else if (s.type === "outbound-rtp" && s.kind === "audio") {
        out.outbound = { packetsSent: s.packetsSent, bytesSent: s.bytesSent };
      } else if (s.type === "media-playout") {
        out.playout = {
          msPlayed: s.totalSamplesDuration !== undefined ? s.totalSamplesDuration * 1000 : undefined,
          synthesizedMs: s.synthesizedSamplesDuration !== undefined ? s.synthesizedSamplesDuration * 1000 : undefined,
          totalSamplesCount: s.totalSamplesCount,
        };
      } else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
        out.rttMs = s.currentRoundTripTime !== undefined ? s.currentRoundTripTime * 1000 : undefined;
      }
    });
    return out;
  }
}
