/**
 * AudioWorklet processor "mimo-capture": cuts the input into blocks of `blockMs` (default 20 ms),
 * mixes them down to mono and posts `{samples?, rms, peak, time}` to the main thread, where
 * `time` is the context time at the end of the block. With `sendSamples: false` it posts levels
 * only (a meter on the WebRTC microphone, or on the agent's remote track).
 */

import { measureLevel } from "./level.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { blockMs = 20, sendSamples = true } = options.processorOptions ?? {};
    this.blockSize = Math.max(1, Math.round((sampleRate * blockMs) / 1000));
    this.sendSamples = sendSamples;
    this.block = new Float32Array(this.blockSize);
    this.fill = 0;
    this.stopped = false;
    this.port.onmessage = (e) => {
      if (e.data === "stop") this.stopped = true;
    };
  }

  process(inputs) {
    if (this.stopped) return false;
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // input not connected yet
    const n = channels[0].length;
    const scale = 1 / channels.length;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < channels.length; c++) s += channels[c][i];
      this.block[this.fill++] = s * scale;
      if (this.fill === this.blockSize) {
        const { rms, peak } = measureLevel(this.block);
        const time = currentTime + (i + 1) / sampleRate;
        if (this.sendSamples) {
          this.port.postMessage({ samples: this.block, rms, peak, time }, [this.block.buffer]);
          this.block = new Float32Array(this.blockSize);
        } else {
          this.port.postMessage({ rms, peak, time });
        }
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("mimo-capture", CaptureProcessor);
