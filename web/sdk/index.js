/**
 * MiMo voice agent JavaScript SDK: `connect()` wires the browser's microphone and speakers to a
 * Realtime server over WebRTC or WebSocket and returns a RealtimeClient. See README.md.
 */

import { diagnose } from "./access.js";
import { Microphone, RemoteAudioMonitor, WorkletPlayer, getMicrophone } from "./audio.js";
import { RealtimeClient } from "./client.js";
import { WebRTCTransport } from "./transport-webrtc.js";
import { WebSocketTransport } from "./transport-websocket.js";

export { ConnectionError, diagnose, realtimeHttpUrl } from "./access.js";
export { Emitter } from "./emitter.js";
export { JitterBuffer } from "./jitter-buffer.js";
export { TurnLatencyTracker } from "./latency.js";
export { LevelMeter, measureLevel, toDbfs } from "./level.js";
export { PullPlayer } from "./player.js";
export * as protocol from "./protocol.js";
export { StreamingResampler, resample } from "./resampler.js";
export { buildSession, parseInterleave, serverOffers } from "./session.js";
export { ClientState, RealtimeClient } from "./client.js";
export { Microphone, RemoteAudioMonitor, WorkletPlayer, getMicrophone } from "./audio.js";
export { WebRTCTransport } from "./transport-webrtc.js";
export { WebSocketTransport } from "./transport-websocket.js";

export const TRANSPORTS = Object.freeze(["webrtc", "websocket"]);

/**
 * Connect to a Realtime server and resolve with an open RealtimeClient (after `session.created`).
 *
 * @param {object} [options]
 * @param {string} [options.url=location.origin] server URL (http(s) or ws(s); `/v1/realtime` optional)
 * @param {"webrtc"|"websocket"} [options.transport="webrtc"]
 * @param {string} [options.apiKey] WebSocket: `openai-insecure-api-key.<key>` subprotocol;
 *   WebRTC: `Authorization: Bearer` on the SDP POST
 * @param {string} [options.model] WebSocket: `?model=`; WebRTC: `session.model`
 * @param {object} [options.session] initial session settings (GA shape, MiMo extras in `mimo`)
 * @param {RTCIceServer[]} [options.iceServers=[]] STUN/TURN for WebRTC; none by default
 * @param {HTMLAudioElement} [options.audioElement] plays WebRTC agent audio (one is created if absent)
 * @param {boolean|MediaStream} [options.microphone=true] true: ask for the microphone; a stream: use
 *   it (the caller keeps ownership); false: no microphone (text, or `sendAudio` from elsewhere)
 * @param {boolean} [options.headphones=false] WebSocket: keep the microphone open while the agent
 *   speaks (otherwise ducked: Chrome's echo canceller ignores Web Audio playback)
 * @param {object} [options.jitter] WebSocket playback JitterBuffer options
 * @param {Record<string, Function>} [options.on] handlers registered before connecting, so no
 *   event (session.created included) is missed
 * @param {number} [options.timeoutMs=15000] connection timeout
 * @throws {ConnectionError} when the server refuses the key (`code` "invalid_api_key", `status`
 *   401) or nothing answers at `url` (`code` "server_unreachable"); otherwise the failure as it came
 */
export async function connect(options = {}) {
  const {
    url = globalThis.location?.origin,
    transport = "webrtc",
    apiKey,
    model,
    session,
    iceServers = [],
    audioElement,
    microphone = true,
    headphones = false,
    jitter = {},
    on = {},
    timeoutMs,
  } = options;
  if (!TRANSPORTS.includes(transport)) {
    throw new TypeError(`transport must be one of ${TRANSPORTS.join(", ")}, got ${JSON.stringify(transport)}`);
  }
  if (!url) throw new TypeError("connect: url is required outside a web page");

  const parts = [];
  try {
    let stream = null;
    if (microphone instanceof MediaStream) stream = microphone;
    else if (microphone) parts.push((stream = await getMicrophone()));
    const mic = stream
      ? await Microphone.open({ stream, ownsStream: !(microphone instanceof MediaStream), sendSamples: transport === "websocket" })
      : null;
    if (mic) parts.push(mic);

    let client;
    if (transport === "websocket") {
      const player = await WorkletPlayer.create({ jitter });
      parts.push(player);
      client = new RealtimeClient({
        transport: new WebSocketTransport({ url, apiKey, model }),
        player,
        microphone: mic,
        session,
        headphones,
      });
    } else {
      const element = audioElement ?? Object.assign(document.createElement("audio"), { autoplay: true });
      const remoteAudio = new RemoteAudioMonitor();
      const rtc = new WebRTCTransport({
        url,
        apiKey,
        model,
        session,
        iceServers,
        stream,
        audioElement: element,
        onRemoteStream: (remote) => remoteAudio.attach(remote).catch((err) => console.warn("agent level monitor:", err)),
      });
      client = new RealtimeClient({ transport: rtc, microphone: mic, remoteAudio, session, headphones });
    }
    parts.length = 0; // the client owns them now and releases them on close
    for (const [type, fn] of Object.entries(on)) client.on(type, fn);
    return await client.open({ timeoutMs });
  } catch (err) {
    for (const part of parts) {
      if (part instanceof MediaStream) part.getTracks().forEach((t) => t.stop());
      else part.close();
    }
    // The browser hides why a handshake failed, and a page whose server went away fails first on
    // loading an audio worklet: ask the server (a ConnectionError: the key refused, or nothing
    // answering), else the error as it came.
    throw (await diagnose(url, apiKey).catch(() => null)) ?? err;
  }
}
