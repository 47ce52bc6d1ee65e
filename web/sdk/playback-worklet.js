/**
 * AudioWorklet processor "mimo-playback": plays agent audio through a JitterBuffer.
 *
 * Messages in:  {type: "push", samples: Float32Array, itemId} | {type: "end"} |
 *               {type: "clear", id, itemId?} | {type: "stop"}
 * Messages out: {type: "started", itemId, time} (time: context time of the item's first sample) |
 *               {type: "drained", time} | {type: "underrun"} | {type: "dropped", samples} |
 *               {type: "cleared", id, itemId, playedMs, receivedMs, discardedMs} |
 *               {type: "stats", stats} about every `reportMs` while audio flows.
 */

import { JitterBuffer, PlaybackState } from "./jitter-buffer.js";
import { playerStats } from "./player.js";

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { jitter = {}, reportMs = 100 } = options.processorOptions ?? {};
    this.buffer = new JitterBuffer({ ...jitter, sampleRate });
    this.reportEvery = Math.max(1, Math.round((sampleRate * reportMs) / 1000 / 128));
    this.quanta = 0;
    this.stopped = false;
    this.port.onmessage = ({ data }) => {
      switch (data.type) {
        case "push":
          this.buffer.push(data.samples, data.itemId);
          break;
        case "end":
          this.buffer.endOfStream();
          break;
        case "clear":
          this.port.postMessage({ type: "cleared", id: data.id, ...this.buffer.clear(data.itemId) });
          this.#report();
          break;
        case "stop":
          this.stopped = true;
          break;
        default:
          break;
      }
    };
  }

  #report() {
    this.port.postMessage({ type: "stats", stats: playerStats(this.buffer) });
  }

  process(_inputs, outputs) {
    if (this.stopped) return false;
    const out = outputs[0];
    this.buffer.pull(out[0]);
    for (let c = 1; c < out.length; c++) out[c].set(out[0]);
    for (const event of this.buffer.takeEvents()) {
      if (event.type === "started") {
        this.port.postMessage({ type: "started", itemId: event.itemId, time: currentTime + event.offset / sampleRate });
      } else if (event.type === "drained") {
        this.port.postMessage({ type: "drained", time: currentTime });
        this.#report();
      } else {
        this.port.postMessage(event);
      }
    }
    if (this.buffer.state !== PlaybackState.IDLE && ++this.quanta % this.reportEvery === 0) this.#report();
    return true;
  }
}

registerProcessor("mimo-playback", PlaybackProcessor);
