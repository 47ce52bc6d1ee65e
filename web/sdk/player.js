/**
 * Agent-audio players for the WebSocket transport. Every player has the same surface, which the
 * client relies on:
 *
 *   push(pcm16: Int16Array, itemId)   queue 24 kHz audio of an item
 *   endOfStream()                     no more audio for now: play out what is queued
 *   clear(itemId?) -> Promise<{itemId, playedMs, receivedMs, discardedMs}>   stop now; how much of
 *                                     itemId (default: the playing item) was heard
 *   speaking                          true while audio is queued or playing
 *   stats                             {playedMs, droppedMs, bufferedMs, underruns}
 *   onEvent                           set by the client: {type: "started", itemId, t} |
 *                                     {type: "drained", t} | {type: "underrun"} | {type: "dropped", samples}
 *   close()
 *
 * `PullPlayer` is the host-driven one: its audio callback calls `pull(n)`. The browser player,
 * `WorkletPlayer` in audio.js, runs the same JitterBuffer inside an AudioWorklet.
 */

import { JitterBuffer, PlaybackState } from "./jitter-buffer.js";
import { WIRE_SAMPLE_RATE, pcm16ToFloat } from "./protocol.js";

const now = () => globalThis.performance.now();

/** Convert a JitterBuffer's sample counters into the player `stats` shape. */
export function playerStats(buffer) {
  const ms = (n) => (n * 1000) / buffer.sampleRate;
  return {
    receivedMs: ms(buffer.stats.pushedSamples),
    playedMs: ms(buffer.stats.playedSamples),
    droppedMs: ms(buffer.stats.droppedSamples),
    clearedMs: ms(buffer.stats.clearedSamples),
    bufferedMs: buffer.bufferedMs,
    underruns: buffer.stats.underruns,
    state: buffer.state,
  };
}

export class PullPlayer {
  /**
   * @param {object} [options]
   * @param {object} [options.jitter] JitterBuffer options (prebufferMs, maxBufferMs, ...)
   * @param {() => number} [options.clock] time source for event stamps (ms)
   */
  constructor({ jitter = {}, clock = now } = {}) {
    this.buffer = new JitterBuffer({ ...jitter, sampleRate: WIRE_SAMPLE_RATE });
    this.clock = clock;
    this.onEvent = null;
  }

  push(pcm16, itemId) {
    this.buffer.push(pcm16ToFloat(pcm16), itemId);
    this.#forward();
  }

  endOfStream() {
    this.buffer.endOfStream();
    this.#forward();
  }

  /** The next `n` samples to play (silence where none are queued). */
  pull(n) {
    const out = new Float32Array(n);
    this.buffer.pull(out);
    this.#forward();
    return out;
  }

  async clear(itemId) {
    return this.buffer.clear(itemId);
  }

  get speaking() {
    return this.buffer.state !== PlaybackState.IDLE;
  }

  get stats() {
    return playerStats(this.buffer);
  }

  close() {
    this.buffer.clear();
  }

  #forward() {
    const t = this.clock();
    for (const event of this.buffer.takeEvents()) this.onEvent?.({ ...event, t });
  }
}
