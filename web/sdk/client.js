/**
 * The transport-agnostic Realtime client: sends validated events, parses and dispatches server
 * events, plays agent audio (WebSocket) or lets the server play it (WebRTC), and implements the
 * client half of interruption.
 *
 * Media parts are small interfaces so the core runs anywhere (the browser wiring is in index.js):
 *   transport   WebSocketTransport | WebRTCTransport (see transport-websocket.js)
 *   player      see player.js (WebSocket only)
 *   microphone  {sampleRate, onBlock, close()}: onBlock({samples?, rms, peak, t}) per 20 ms block
 *   remoteAudio {onAudible, close()}: onAudible(t) when the agent's WebRTC track becomes audible
 *
 * Events: every server event is emitted under its own type. Local events have types starting with
 * `client.`: open, close, error, mic_level, commit, playback_started, playback_drained,
 * interrupted. `"*"` receives both.
 */

import { Emitter } from "./emitter.js";
import {
  ProtocolError,
  WIRE_SAMPLE_RATE,
  base64ToPcm16,
  floatToPcm16,
  inputAudioAppend,
  inputAudioClear,
  inputAudioCommit,
  itemTruncate,
  newId,
  outputAudioClear,
  parseServerEvent,
  pcm16ToFloat,
  responseCancel,
  responseCreate,
  sessionUpdate,
  userTextMessage,
  validateClientEvent,
} from "./protocol.js";
import { StreamingResampler } from "./resampler.js";

export const CLIENT_DEFAULTS = Object.freeze({
  openTimeoutMs: 15000,
  // Past this many bytes queued in the socket, microphone chunks are dropped instead of queued:
  // stale audio is worse than missing audio in a live conversation.
  maxBufferedBytes: 1 << 20,
  maxDiscardedResponses: 8,
});

/** Connection states. */
export const ClientState = Object.freeze({ NEW: "new", CONNECTING: "connecting", OPEN: "open", CLOSED: "closed" });

const now = () => globalThis.performance.now();

export class RealtimeClient extends Emitter {
  /** Server event types with a handler inside the client (all events are emitted regardless). */
  static HANDLED_EVENTS = Object.freeze([
    "session.created",
    "session.updated",
    "error",
    "response.created",
    "response.done",
    "response.output_audio.delta",
    "response.output_audio.done",
    "input_audio_buffer.speech_started",
    "output_audio_buffer.started",
    "output_audio_buffer.stopped",
    "output_audio_buffer.cleared",
  ]);

  #transport;
  #player;
  #microphone;
  #remoteAudio;
  #resampler = null;
  #audio = null; // the agent audio item being received/played: {itemId, responseId, samples, done}
  #discarded = []; // response ids whose late audio is dropped after an interruption
  #ready = null; // {resolve, reject} until session.created
  #handlers;

  /**
   * @param {object} options
   * @param {object} options.transport a transport (see transport-websocket.js)
   * @param {object} [options.player] plays agent audio; required for audio over WebSocket
   * @param {object} [options.microphone] feeds `sendAudio` (WebSocket) and the level events
   * @param {object} [options.remoteAudio] reports when WebRTC agent audio becomes audible
   * @param {object} [options.session] session settings sent once connected (WebSocket; WebRTC
   *   sends them with the offer)
   * @param {boolean} [options.headphones=false] no echo path: keep the microphone open while the
   *   agent speaks (WebSocket; otherwise it is ducked, since the browser's echo canceller does
   *   not see Web Audio playback)
   * @param {number} [options.maxBufferedBytes] socket backlog beyond which mic audio is dropped
   * @param {() => number} [options.clock] time source (ms) for local event stamps
   */
  constructor({
    transport,
    player = null,
    microphone = null,
    remoteAudio = null,
    session = null,
    headphones = false,
    maxBufferedBytes = CLIENT_DEFAULTS.maxBufferedBytes,
    clock = now,
  }) {
    super();
    if (!transport) throw new Error("RealtimeClient needs a transport");
    this.#transport = transport;
    this.#player = player;
    this.#microphone = microphone;
    this.#remoteAudio = remoteAudio;
    this.initialSession = session;
    this.headphones = headphones;
    this.maxBufferedBytes = maxBufferedBytes;
    this.clock = clock;
    this.state = ClientState.NEW;
    /** The session as last reported by the server (`session.created` / `session.updated`). */
    this.session = null;
    /** The id of the response being generated, or null. */
    this.activeResponseId = null;
    /** True while the server's WebRTC playout buffer holds agent audio. */
    this.agentSpeaking = false;
    /** The last server `error` payload. */
    this.lastError = null;
    this.counters = {
      eventsSent: 0,
      eventsReceived: 0,
      audioChunksSent: 0,
      audioMsSent: 0,
      audioMsDucked: 0,
      audioChunksDroppedBacklog: 0,
      audioDeltasReceived: 0,
      audioMsReceived: 0,
      audioDeltasDiscarded: 0,
      protocolErrors: 0,
    };
    this.#handlers = {
      "session.created": (e) => this.#onSessionCreated(e),
      "session.updated": (e) => {
        this.session = e.session;
      },
      error: (e) => {
        this.lastError = e.error;
        // An error before session.created means the server refused the session.
        if (this.#ready) this.#settle(new Error(`server refused the session: ${e.error.message ?? JSON.stringify(e.error)}`));
      },
      "response.created": (e) => {
        this.activeResponseId = e.response.id ?? null;
      },
      "response.done": (e) => this.#onResponseDone(e),
      "response.output_audio.delta": (e) => this.#onAudioDelta(e),
      "response.output_audio.done": (e) => {
        if (this.#audio && this.#audio.itemId === e.item_id) this.#player?.endOfStream();
      },
      "input_audio_buffer.speech_started": () => {
        // Server VAD heard the user: stop local playback at once and tell the server what was
        // heard. With interrupt_response the server cancels the response itself.
        if (!this.#transport.ownsPlayback) {
          this.#stopPlayback("speech_started").catch((err) => this.#clientError("interrupt", err.message));
        }
      },
      "output_audio_buffer.started": () => {
        this.agentSpeaking = true;
      },
      "output_audio_buffer.stopped": () => {
        this.agentSpeaking = false;
      },
      "output_audio_buffer.cleared": () => {
        this.agentSpeaking = false;
      },
    };
    if (this.#player) {
      this.#player.onEvent = (ev) => this.#onPlayerEvent(ev);
    }
    if (this.#microphone) {
      this.#microphone.onBlock = (block) => this.#onMicBlock(block);
    }
    if (this.#remoteAudio) {
      this.#remoteAudio.onAudible = (t) => this.#local("client.playback_started", { item_id: null, t });
    }
  }

  /** "websocket" or "webrtc". */
  get transport() {
    return this.#transport.kind;
  }

  /** The WebRTC call id from the `Location` header (null over WebSocket). */
  get callId() {
    return this.#transport.callId ?? null;
  }

  /** True while microphone audio is replaced by silence because the agent is audible. */
  get ducked() {
    return !this.#transport.ownsPlayback && !this.headphones && Boolean(this.#player?.speaking);
  }

  /**
   * Open the transport and resolve once the server's `session.created` arrived (then send the
   * initial session settings, over WebSocket). Rejects with an Error naming the failure.
   */
  async open({ timeoutMs = CLIENT_DEFAULTS.openTimeoutMs } = {}) {
    if (this.state !== ClientState.NEW) throw new Error(`open() called twice (state ${this.state})`);
    this.state = ClientState.CONNECTING;
    const ready = new Promise((resolve, reject) => {
      this.#ready = { resolve, reject };
    });
    const timer = setTimeout(
      () => this.#settle(new Error(`no session.created from the server within ${timeoutMs} ms`)),
      timeoutMs,
    );
    try {
      await this.#transport.open({
        onMessage: (message) => this.handleServerMessage(message),
        onClose: (info) => this.#onTransportClose(info),
        onError: (message) => this.#clientError("transport", message),
      });
      await ready;
    } catch (err) {
      this.close();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    this.state = ClientState.OPEN;
    this.#local("client.open", { transport: this.transport, call_id: this.callId });
    if (this.initialSession && !this.#transport.ownsPlayback) this.updateSession(this.initialSession);
    return this;
  }

  #settle(error) {
    const ready = this.#ready;
    if (!ready) return;
    this.#ready = null;
    if (error) ready.reject(error);
    else ready.resolve();
  }

  #onSessionCreated(e) {
    this.session = e.session;
    this.#settle(null);
  }

  /**
   * Feed one raw server message (JSON text or object). Transports call this; it is public so a
   * host with its own transport can drive the client. Invalid messages become `client.error`.
   */
  handleServerMessage(message) {
    let event;
    try {
      event = parseServerEvent(message);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this.counters.protocolErrors += 1;
      this.#clientError("protocol", err.message);
      return;
    }
    this.counters.eventsReceived += 1;
    this.#handlers[event.type]?.(event);
    this.emit(event);
  }

  // ---- sending -------------------------------------------------------------------------------

  /** Validate and send one client event; an `event_id` is added when missing. Returns the event. */
  send(event) {
    if (this.state !== ClientState.OPEN && this.state !== ClientState.CONNECTING) {
      throw new Error(`cannot send "${event?.type}": the client is ${this.state}`);
    }
    const out = event.event_id ? event : { event_id: newId("event"), ...event };
    validateClientEvent(out);
    this.#transport.send(out);
    this.counters.eventsSent += 1;
    return out;
  }

  /** `session.update` with a partial session (GA shape; MiMo settings under `mimo`). */
  updateSession(partial) {
    return this.send(sessionUpdate(partial));
  }

  /**
   * Send microphone audio (WebSocket): Float32Array in [-1, 1] or Int16Array, at `sampleRate`;
   * resampled to 24 kHz pcm16. While the agent is audible and `headphones` is off, silence is sent
   * instead (the server's audio clock keeps running). Returns false when the chunk was dropped
   * because the socket is backed up.
   */
  sendAudio(samples, sampleRate) {
    if (this.#transport.ownsPlayback) {
      throw new Error("sendAudio is for the websocket transport: over webrtc the microphone track carries the audio");
    }
    if (!(samples instanceof Float32Array) && !(samples instanceof Int16Array)) {
      throw new TypeError("sendAudio expects a Float32Array or an Int16Array");
    }
    if (!Number.isInteger(sampleRate)) throw new TypeError(`sendAudio: sampleRate must be an integer, got ${sampleRate}`);
    const float = samples instanceof Int16Array ? pcm16ToFloat(samples) : samples;
    let wire;
    if (sampleRate === WIRE_SAMPLE_RATE && !this.#resampler) {
      wire = float;
    } else {
      if (!this.#resampler || this.#resampler.inRate !== sampleRate) {
        this.#resampler = new StreamingResampler(sampleRate, WIRE_SAMPLE_RATE);
      }
      wire = this.#resampler.process(float);
    }
    return this.#appendWire(wire);
  }

  #appendWire(wire) {
    if (wire.length === 0) return true;
    const ms = (wire.length * 1000) / WIRE_SAMPLE_RATE;
    if (this.#transport.bufferedAmount > this.maxBufferedBytes) {
      this.counters.audioChunksDroppedBacklog += 1;
      return false;
    }
    let pcm;
    if (this.ducked) {
      pcm = new Int16Array(wire.length);
      this.counters.audioMsDucked += ms;
    } else {
      pcm = floatToPcm16(wire);
    }
    this.send(inputAudioAppend(pcm));
    this.counters.audioChunksSent += 1;
    this.counters.audioMsSent += ms;
    return true;
  }

  /** Commit the input buffer (push-to-talk); sends the resampler's tail first. */
  commit() {
    if (this.#resampler) {
      this.#appendWire(this.#resampler.flush());
      this.#resampler = null;
    }
    const event = this.send(inputAudioCommit());
    this.#local("client.commit", {});
    return event;
  }

  /** Drop the audio not yet committed (`input_audio_buffer.clear`). */
  clearInput() {
    if (this.#resampler) this.#resampler.reset();
    return this.send(inputAudioClear());
  }

  /** `response.create` with GA response options (instructions, output_modalities, ...). */
  createResponse(options) {
    return this.send(responseCreate(options));
  }

  /** Add a user text message to the conversation, and ask for a response unless `respond` is false. */
  sendText(text, { respond = true } = {}) {
    this.send(userTextMessage(text));
    if (respond) this.createResponse();
  }

  /**
   * Stop the agent now: cancel the response being generated, stop playback and truncate the item
   * to what was heard (WebSocket), or have the server clear its playout buffer (WebRTC).
   * Resolves to `{item_id, audio_end_ms}` when an item was truncated, else null.
   */
  async interrupt() {
    if (this.activeResponseId) {
      this.send(responseCancel(this.activeResponseId));
    }
    if (this.#transport.ownsPlayback) {
      if (this.agentSpeaking || this.activeResponseId) this.send(outputAudioClear());
      return null;
    }
    return this.#stopPlayback("client");
  }

  // ---- agent audio (WebSocket) ---------------------------------------------------------------

  #onAudioDelta(e) {
    if (this.#discarded.includes(e.response_id)) {
      this.counters.audioDeltasDiscarded += 1;
      return;
    }
    const pcm = base64ToPcm16(e.delta);
    this.counters.audioDeltasReceived += 1;
    this.counters.audioMsReceived += (pcm.length * 1000) / WIRE_SAMPLE_RATE;
    if (!this.#audio || this.#audio.itemId !== e.item_id) {
      this.#audio = { itemId: e.item_id, responseId: e.response_id, samples: 0, done: false };
    }
    this.#audio.samples += pcm.length;
    this.#player?.push(pcm, e.item_id);
  }

  #onResponseDone(e) {
    const id = e.response.id ?? null;
    if (this.activeResponseId === id) this.activeResponseId = null;
    if (this.#audio && this.#audio.responseId === id) this.#audio.done = true;
    this.#player?.endOfStream();
  }

  async #stopPlayback(reason) {
    const audio = this.#audio;
    if (!audio || !this.#player) return null;
    this.#audio = null;
    // Late deltas of this response are still in flight: they must not restart playback.
    this.#discarded.push(audio.responseId);
    if (this.#discarded.length > CLIENT_DEFAULTS.maxDiscardedResponses) this.#discarded.shift();
    const heard = await this.#player.clear(audio.itemId);
    const receivedMs = (audio.samples * 1000) / WIRE_SAMPLE_RATE;
    const playedMs = heard.playedMs;
    // Nothing to truncate when everything was heard and the response is over.
    if (audio.done && playedMs >= receivedMs) return null;
    // Clamp: an audio_end_ms past the item's audio is an error on the server.
    const audioEndMs = Math.floor(Math.min(playedMs, receivedMs));
    if (this.state !== ClientState.OPEN) return null;
    this.send(itemTruncate(audio.itemId, audioEndMs));
    const result = { item_id: audio.itemId, audio_end_ms: audioEndMs };
    this.#local("client.interrupted", { ...result, reason });
    return result;
  }

  #onPlayerEvent(ev) {
    if (ev.type === "started") {
      this.#local("client.playback_started", { item_id: ev.itemId, t: ev.t });
    } else if (ev.type === "drained") {
      this.#local("client.playback_drained", { t: ev.t });
    }
  }

  // ---- microphone ----------------------------------------------------------------------------

  #onMicBlock(block) {
    const ducked = this.ducked;
    this.#local("client.mic_level", { rms: block.rms, peak: block.peak, ducked, t: block.t });
    if (block.samples && this.state === ClientState.OPEN && !this.#transport.ownsPlayback) {
      this.sendAudio(block.samples, this.#microphone.sampleRate);
    }
  }

  // ---- lifecycle -----------------------------------------------------------------------------

  /** Counters, plus the player's and the transport's statistics. */
  async getStats() {
    return {
      ...this.counters,
      player: this.#player ? this.#player.stats : null,
      transport: await this.#transport.getStats(),
    };
  }

  #local(type, fields) {
    this.emit({ type, t: this.clock(), ...fields });
  }

  #clientError(kind, message) {
    this.#local("client.error", { error: { type: kind, message } });
  }

  #onTransportClose(info) {
    this.#settle(new Error(info.error ?? `connection closed before the session started (${info.reason || info.code})`));
    this.#shutdown(info);
  }

  /** Close the connection and release the microphone and audio output. */
  close() {
    if (this.state === ClientState.CLOSED) return;
    this.#transport.close();
    this.#shutdown({ code: 1000, reason: "client closed", error: null });
  }

  #shutdown(info) {
    if (this.state === ClientState.CLOSED) return;
    const wasOpen = this.state === ClientState.OPEN;
    this.state = ClientState.CLOSED;
    this.#microphone?.close();
    this.#remoteAudio?.close();
    this.#player?.close();
    this.activeResponseId = null;
    this.agentSpeaking = false;
    if (wasOpen) this.#local("client.close", { code: info.code, reason: info.reason, error: info.error ?? null });
  }
}
