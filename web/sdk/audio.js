/**
 * Browser audio helpers: the microphone (capture worklet), the WebSocket-mode player (playback
 * worklet with the jitter buffer) and a level monitor for the agent's WebRTC track. They plug
 * into RealtimeClient through the small interfaces described in client.js and player.js.
 */

import { WIRE_SAMPLE_RATE } from "./protocol.js";
import { StreamingResampler } from "./resampler.js";

const CAPTURE_URL = new URL("./capture-worklet.js", import.meta.url);
const PLAYBACK_URL = new URL("./playback-worklet.js", import.meta.url);

/** Microphone constraints: the browser's echo canceller, noise suppression and gain control on. */
export const MIC_CONSTRAINTS = Object.freeze({
  channelCount: 1,
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
});

/** Ask for the microphone, with an error that says what to do when it is refused. */
export async function getMicrophone(constraints = MIC_CONSTRAINTS) {
  if (!globalThis.navigator?.mediaDevices?.getUserMedia) {
    throw new Error("microphone unavailable: getUserMedia needs a secure context (https or http://localhost)");
  }
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: constraints });
  } catch (err) {
    const why = err.name === "NotAllowedError" ? "permission denied" : err.name === "NotFoundError" ? "no microphone found" : err.message;
    throw new Error(`microphone unavailable: ${why}`);
  }
}

/**
 * Performance time (ms) at which context time `t` reaches the speakers; for input blocks, an
 * estimate of when they were captured. Falls back to now where the browser lacks the timestamp.
 */
export function contextTimeToPerformance(context, t, { input = false } = {}) {
  const ts = context.getOutputTimestamp?.();
  if (!ts || !(ts.performanceTime > 0)) return performance.now();
  let perf = ts.performanceTime + (t - ts.contextTime) * 1000;
  // An input quantum is processed ahead of its playout by the output path's latency.
  if (input) perf -= ((context.baseLatency ?? 0) + (context.outputLatency ?? 0)) * 1000;
  return perf;
}

async function captureNode(context, stream, { blockMs = 20, sendSamples = true } = {}) {
  await context.audioWorklet.addModule(CAPTURE_URL);
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "mimo-capture", {
    numberOfInputs: 1,
    numberOfOutputs: 1,
    outputChannelCount: [1],
    processorOptions: { blockMs, sendSamples },
  });
  // A muted path to the destination keeps the node pulled by the rendering graph everywhere.
  const mute = context.createGain();
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(context.destination);
  return { source, node, mute };
}

/** The microphone: blocks of audio and levels from a MediaStream, at the device's rate. */
export class Microphone {
  /**
   * @param {object} options
   * @param {MediaStream} options.stream the microphone stream
   * @param {boolean} [options.ownsStream] stop its tracks on close
   * @param {boolean} [options.sendSamples=true] post samples (WebSocket) or levels only (WebRTC)
   * @param {number} [options.blockMs=20]
   */
  static async open({ stream, ownsStream = false, sendSamples = true, blockMs = 20 }) {
    const context = new AudioContext({ latencyHint: "interactive" });
    try {
      const graph = await captureNode(context, stream, { blockMs, sendSamples });
      if (context.state === "suspended") await context.resume();
      return new Microphone(context, stream, ownsStream, graph);
    } catch (err) {
      context.close();
      throw err;
    }
  }

  constructor(context, stream, ownsStream, graph) {
    this.context = context;
    this.stream = stream;
    this.ownsStream = ownsStream;
    this.graph = graph;
    this.sampleRate = context.sampleRate;
    /** Set by the client: ({samples?, rms, peak, t}) per block. */
    this.onBlock = null;
    graph.node.port.onmessage = ({ data }) => {
      const t = contextTimeToPerformance(context, data.time, { input: true });
      this.onBlock?.({ samples: data.samples, rms: data.rms, peak: data.peak, t });
    };
  }

  /** Mute or unmute the microphone track (the meter then reads silence). */
  set enabled(on) {
    for (const track of this.stream.getAudioTracks()) track.enabled = on;
  }

  close() {
    this.graph.node.port.postMessage("stop");
    this.graph.source.disconnect();
    this.context.close();
    if (this.ownsStream) for (const track of this.stream.getTracks()) track.stop();
  }
}

/**
 * Plays 24 kHz agent audio through the playback worklet (see player.js for the interface). The
 * context runs at 24 kHz so the worklet counts wire samples; where a browser refuses that rate
 * the audio is resampled per item.
 */
export class WorkletPlayer {
  /**
   * @param {object} [options]
   * @param {object} [options.jitter] JitterBuffer options (prebufferMs, maxBufferMs, ...)
   * @param {number} [options.echoTailMs=250] `speaking` stays true this long after the audio
   *   drained (room echo), which is how long the microphone stays ducked
   */
  static async create({ jitter = {}, echoTailMs = 250 } = {}) {
    let context;
    try {
      context = new AudioContext({ sampleRate: WIRE_SAMPLE_RATE, latencyHint: "interactive" });
    } catch {
      context = new AudioContext({ latencyHint: "interactive" });
    }
    try {
      await context.audioWorklet.addModule(PLAYBACK_URL);
      const node = new AudioWorkletNode(context, "mimo-playback", {
        numberOfInputs: 0,
        numberOfOutputs: 1,
        outputChannelCount: [1],
        processorOptions: { jitter },
      });
      node.connect(context.destination);
      if (context.state === "suspended") await context.resume();
      return new WorkletPlayer(context, node, echoTailMs);
    } catch (err) {
      context.close();
      throw err;
    }
  }

  #pending = new Map(); // clear request id -> resolve
  #nextId = 1;
  #resampler = null;
  #resampledItem = undefined;
  #lastPushAt = -Infinity;
  #drainedAt = -Infinity;

  constructor(context, node, echoTailMs) {
    this.context = context;
    this.node = node;
    this.echoTailMs = echoTailMs;
    this.onEvent = null;
    this.stats = { receivedMs: 0, playedMs: 0, droppedMs: 0, clearedMs: 0, bufferedMs: 0, underruns: 0, state: "idle" };
    node.port.onmessage = ({ data }) => this.#onMessage(data);
  }

  #onMessage(data) {
    switch (data.type) {
      case "stats":
        this.stats = data.stats;
        break;
      case "cleared": {
        this.stats.state = "idle";
        const resolve = this.#pending.get(data.id);
        this.#pending.delete(data.id);
        const { type: _t, id: _i, ...heard } = data;
        resolve?.(heard);
        break;
      }
      case "started":
        this.onEvent?.({ type: "started", itemId: data.itemId, t: contextTimeToPerformance(this.context, data.time) });
        break;
      case "drained":
        this.#drainedAt = performance.now();
        this.stats.state = "idle";
        this.onEvent?.({ type: "drained", t: contextTimeToPerformance(this.context, data.time) });
        break;
      default:
        this.onEvent?.(data);
    }
  }

  push(pcm16, itemId) {
    let samples = new Float32Array(pcm16.length);
    for (let i = 0; i < pcm16.length; i++) samples[i] = pcm16[i] / 32768;
    if (this.context.sampleRate !== WIRE_SAMPLE_RATE) {
      if (!this.#resampler || this.#resampledItem !== itemId) {
        this.#resampler = new StreamingResampler(WIRE_SAMPLE_RATE, this.context.sampleRate);
        this.#resampledItem = itemId;
      }
      samples = this.#resampler.process(samples);
    }
    this.#lastPushAt = performance.now();
    this.stats.state = this.stats.state === "idle" ? "buffering" : this.stats.state;
    this.node.port.postMessage({ type: "push", samples, itemId }, [samples.buffer]);
  }

  endOfStream() {
    if (this.#resampler) {
      const tail = this.#resampler.flush();
      if (tail.length) this.node.port.postMessage({ type: "push", samples: tail, itemId: this.#resampledItem }, [tail.buffer]);
    }
    this.node.port.postMessage({ type: "end" });
  }

  clear(itemId) {
    const id = this.#nextId++;
    this.#resampler = null;
    this.#drainedAt = -Infinity;
    return new Promise((resolve) => {
      this.#pending.set(id, resolve);
      this.node.port.postMessage({ type: "clear", id, itemId });
    });
  }

  /** Agent audio queued, playing, or within the echo tail after it drained. */
  get speaking() {
    const t = performance.now();
    return this.stats.state !== "idle" || t - this.#lastPushAt < 100 || t - this.#drainedAt < this.echoTailMs;
  }

  close() {
    this.node.port.postMessage({ type: "stop" });
    for (const resolve of this.#pending.values()) resolve({ itemId: null, playedMs: 0, receivedMs: 0, discardedMs: 0 });
    this.#pending.clear();
    this.node.disconnect();
    this.context.close();
  }
}

/**
 * Watches the agent's WebRTC track and reports when it becomes audible after silence: the
 * "played" anchor of the latency measurement in WebRTC mode (see client.js `remoteAudio`).
 */
export class RemoteAudioMonitor {
  /**
   * @param {object} [options]
   * @param {number} [options.thresholdRms=0.003] about -50 dBFS
   * @param {number} [options.silenceMs=300] silence that must precede a new onset
   */
  constructor({ thresholdRms = 0.003, silenceMs = 300 } = {}) {
    this.thresholdRms = thresholdRms;
    this.silenceMs = silenceMs;
    this.onAudible = null;
    this.onLevel = null;
    this.context = null;
    this.graph = null;
    this.lastLoudAt = -Infinity;
    this.closed = false;
  }

  /** Start watching `stream` (the remote stream, already playing in an audio element). */
  async attach(stream) {
    if (this.closed || this.context) return;
    this.context = new AudioContext({ latencyHint: "interactive" });
    this.graph = await captureNode(this.context, stream, { sendSamples: false });
    this.graph.node.port.onmessage = ({ data }) => {
      const t = contextTimeToPerformance(this.context, data.time, { input: true });
      this.onLevel?.(data.rms, t);
      if (data.rms < this.thresholdRms) return;
      if (t - this.lastLoudAt > this.silenceMs) this.onAudible?.(t);
      this.lastLoudAt = t;
    };
  }

  close() {
    this.closed = true;
    if (!this.context) return;
    this.graph?.node.port.postMessage("stop");
    this.context.close();
  }
}
