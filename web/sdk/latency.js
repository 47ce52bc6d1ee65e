/**
 * Per-turn first-audio latency, measured in the browser from events the client already emits.
 *
 * Two anchors for "the user stopped speaking":
 *   - vad:  arrival of `input_audio_buffer.speech_stopped` (or the local `client.commit` in
 *           push-to-talk mode). Server VAD only decides after its silence window, so this anchor
 *           excludes the hang-over.
 *   - mic:  the end of the last microphone block whose RMS reached `thresholdDb`, before the VAD
 *           anchor (20 ms blocks, so within 20 ms). Includes the VAD hang-over: what a user feels.
 * Two anchors for "the agent answered":
 *   - received: the first agent audio that reached the browser (WebSocket: the first
 *           `response.output_audio.delta`; WebRTC: `output_audio_buffer.started`, the server
 *           starting to send on the media track).
 *   - played:   the first agent audio rendered (`client.playback_started`: the playback worklet
 *           reaching the item's first sample, or the WebRTC remote track becoming audible).
 * A turn that the user interrupts before any agent audio (a new `speech_started`) gets none.
 */

import { toDbfs } from "./level.js";

export const LATENCY_DEFAULTS = Object.freeze({ thresholdDb: -40, maxTurns: 100 });

const now = () => globalThis.performance.now();

export class TurnLatencyTracker {
  /**
   * @param {object} [options]
   * @param {number} [options.thresholdDb=-40] mic RMS (dBFS) that counts as speech
   * @param {number} [options.maxTurns=100] turns kept (oldest dropped)
   * @param {(turn: object) => void} [options.onUpdate] called whenever a turn changes
   */
  constructor({ thresholdDb = LATENCY_DEFAULTS.thresholdDb, maxTurns = LATENCY_DEFAULTS.maxTurns, onUpdate } = {}) {
    this.thresholdDb = thresholdDb;
    this.maxTurns = maxTurns;
    this.onUpdate = onUpdate ?? (() => {});
    this.turns = [];
    this.current = null; // the turn waiting for agent audio
    this.lastLoudAt = null;
    this.count = 0;
  }

  /** Listen to every event of `client`; returns a function that stops listening. */
  attach(client) {
    return client.on("*", (event) => this.handle(event));
  }

  /**
   * Feed one event. Local (`client.*`) events carry their own time `t`; server events are timed
   * on arrival (`t` defaults to now, so call this from the event handler).
   */
  handle(event, t = event.t ?? now()) {
    switch (event.type) {
      case "client.mic_level":
        // Ducked blocks were not sent; they hold the agent's echo, not the user.
        if (!event.ducked && toDbfs(event.rms) >= this.thresholdDb) this.lastLoudAt = t;
        break;
      case "input_audio_buffer.speech_stopped":
        this.#open("vad", t, event.item_id ?? null);
        break;
      case "client.commit":
        this.#open("commit", t, null);
        break;
      case "input_audio_buffer.speech_started":
        this.current = null; // the user kept talking: this turn gets no answer of its own
        break;
      case "response.output_audio.delta":
      case "output_audio_buffer.started":
        this.#mark("receivedAt", t, event.response_id ?? null);
        break;
      case "client.playback_started":
        this.#mark("playedAt", t, null);
        break;
      default:
        break;
    }
  }

  #open(anchor, t, itemId) {
    this.count += 1;
    const micAt = this.lastLoudAt !== null && this.lastLoudAt <= t ? this.lastLoudAt : null;
    const turn = {
      index: this.count,
      anchor, // "vad" | "commit"
      itemId,
      speechEndVadAt: t,
      speechEndMicAt: micAt,
      receivedAt: null,
      playedAt: null,
      responseId: null,
      vadToReceivedMs: null,
      vadToPlayedMs: null,
      micToReceivedMs: null,
      micToPlayedMs: null,
    };
    this.turns.push(turn);
    if (this.turns.length > this.maxTurns) this.turns.shift();
    this.current = turn;
    this.onUpdate(turn);
  }

  #mark(field, t, responseId) {
    const turn = this.current;
    if (!turn || turn[field] !== null || t < turn.speechEndVadAt) return;
    turn[field] = t;
    if (responseId && !turn.responseId) turn.responseId = responseId;
    const which = field === "receivedAt" ? "Received" : "Played";
    turn[`vadTo${which}Ms`] = t - turn.speechEndVadAt;
    if (turn.speechEndMicAt !== null) turn[`micTo${which}Ms`] = t - turn.speechEndMicAt;
    if (turn.receivedAt !== null && turn.playedAt !== null) this.current = null;
    this.onUpdate(turn);
  }
}
