/**
 * Streaming sample-rate conversion for the microphone path (device rate -> 24 kHz wire rate).
 *
 * A polyphase windowed-sinc (Kaiser) resampler at the exact rational ratio of the two rates.
 * Browsers have no streaming resampler API that works on arbitrary chunks (OfflineAudioContext
 * is whole-buffer only), so this one is ours. Chunked processing gives bit-identical output to
 * processing the whole signal at once (every output sample runs the same operations on the same
 * inputs), and the output is time-aligned with the input (a zero-phase filter; the cost is a
 * look-ahead of `latencySamples` input samples, under 1 ms at common rates).
 */

const MIN_RATE = 8000;
const MAX_RATE = 384000;

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

/** Modified Bessel function of the first kind, order 0 (power series; converges fast). */
function besselI0(x) {
  let sum = 1;
  let term = 1;
  const q = (x * x) / 4;
  for (let k = 1; k < 64; k++) {
    term *= q / (k * k);
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

function checkRate(name, rate) {
  if (!Number.isInteger(rate) || rate < MIN_RATE || rate > MAX_RATE) {
    throw new RangeError(`${name} must be an integer sample rate in [${MIN_RATE}, ${MAX_RATE}] Hz, got ${rate}`);
  }
}

/** Streaming resampler: `process(chunk)` as audio arrives, `flush()` at the end of a stream. */
export class StreamingResampler {
  /**
   * @param {number} inRate input sample rate (Hz, integer)
   * @param {number} outRate output sample rate (Hz, integer)
   * @param {object} [options]
   * @param {number} [options.zeroCrossings=16] sinc half-length in zero crossings of the cutoff
   * @param {number} [options.rolloff=0.945] cutoff as a fraction of the lower Nyquist frequency
   * @param {number} [options.kaiserBeta=8.6] Kaiser window shape (about 80 dB stop band)
   */
  constructor(inRate, outRate, { zeroCrossings = 16, rolloff = 0.945, kaiserBeta = 8.6 } = {}) {
    checkRate("inRate", inRate);
    checkRate("outRate", outRate);
    this.inRate = inRate;
    this.outRate = outRate;
    const g = gcd(inRate, outRate);
    this.up = outRate / g; // L: output samples per ...
    this.down = inRate / g; // M: ... input samples
    // Cutoff relative to the input Nyquist frequency: the lower of the two Nyquists, rolled off.
    this.cutoff = Math.min(1, outRate / inRate) * rolloff;
    this.halfWidth = Math.ceil(zeroCrossings / this.cutoff); // W, in input samples
    this.kaiserBeta = kaiserBeta;
    this.phases = new Array(this.up); // phase p -> Float32Array(2W) taps, built on first use
    this.reset();
  }

  /** Input samples of look-ahead before an output sample can be computed. */
  get latencySamples() {
    return this.inRate === this.outRate ? 0 : this.halfWidth;
  }

  /** Forget the stream: the next `process` starts a new signal at time zero. */
  reset() {
    const W = this.halfWidth;
    this.hist = new Float32Array(4096 + 2 * W); // input samples [histStart, histStart + histLen)
    this.histStart = -(W - 1); // inputs before the stream start read as zeros
    this.histLen = W - 1;
    this.totalIn = 0;
    this.nextIn = 0; // i: integer input position of the next output sample
    this.nextPhase = 0; // p: its fractional position, in 1/L steps
    this.totalOut = 0;
  }

  #taps(p) {
    let taps = this.phases[p];
    if (taps) return taps;
    const W = this.halfWidth;
    const frac = p / this.up;
    const norm = besselI0(this.kaiserBeta);
    taps = new Float32Array(2 * W);
    let sum = 0;
    for (let j = 0; j < 2 * W; j++) {
      const x = frac + (W - 1 - j); // distance (input samples) from tap j to the output instant
      const r = x / W;
      const window = Math.abs(r) >= 1 ? 0 : besselI0(this.kaiserBeta * Math.sqrt(1 - r * r)) / norm;
      const arg = Math.PI * this.cutoff * x;
      const sinc = arg === 0 ? 1 : Math.sin(arg) / arg;
      taps[j] = sinc * window;
      sum += taps[j];
    }
    // Unit DC gain for every phase, so a constant input gives a constant output.
    for (let j = 0; j < taps.length; j++) taps[j] /= sum;
    this.phases[p] = taps;
    return taps;
  }

  #append(input) {
    if (this.histLen + input.length > this.hist.length) {
      const grown = new Float32Array(Math.max(this.hist.length * 2, this.histLen + input.length));
      grown.set(this.hist.subarray(0, this.histLen));
      this.hist = grown;
    }
    this.hist.set(input, this.histLen);
    this.histLen += input.length;
  }

  /** Produce every output sample whose last tap is at input index <= lastIn (at most limitOut in all). */
  #drain(lastIn, limitOut) {
    const W = this.halfWidth;
    const out = [];
    let y = new Float32Array(Math.max(0, Math.ceil(((lastIn - this.nextIn) * this.up) / this.down) + 2));
    let count = 0;
    while (this.nextIn + W <= lastIn && this.totalOut < limitOut) {
      const taps = this.#taps(this.nextPhase);
      const base = this.nextIn - W + 1 - this.histStart;
      let acc = 0;
      for (let j = 0; j < taps.length; j++) acc += this.hist[base + j] * taps[j];
      if (count === y.length) {
        out.push(y);
        y = new Float32Array(y.length || 16);
        count = 0;
      }
      y[count++] = acc;
      this.totalOut += 1;
      this.nextPhase += this.down;
      this.nextIn += Math.floor(this.nextPhase / this.up);
      this.nextPhase %= this.up;
    }
    out.push(y.subarray(0, count));
    // Keep only the history the next output sample needs.
    const keepFrom = this.nextIn - W + 1 - this.histStart;
    if (keepFrom > 0) {
      this.hist.copyWithin(0, keepFrom, this.histLen);
      this.histLen -= keepFrom;
      this.histStart += keepFrom;
    }
    if (out.length === 1) return out[0].slice();
    const total = out.reduce((n, a) => n + a.length, 0);
    const joined = new Float32Array(total);
    let at = 0;
    for (const a of out) {
      joined.set(a, at);
      at += a.length;
    }
    return joined;
  }

  /** Resample the next chunk of the stream. The output may be a few samples shorter or longer. */
  process(input) {
    if (!(input instanceof Float32Array)) throw new TypeError("resampler input must be a Float32Array");
    if (this.inRate === this.outRate) return input.slice();
    this.#append(input);
    this.totalIn += input.length;
    // Output n needs inputs up to nextIn + W: only those already received.
    return this.#drain(this.totalIn - 1, Infinity);
  }

  /**
   * End the stream: emit the remaining output (the tail reads zeros past the end) so that the
   * whole stream has ceil(inputs * outRate / inRate) samples, then reset.
   */
  flush() {
    if (this.inRate === this.outRate) return new Float32Array(0);
    const target = Math.ceil((this.totalIn * this.up) / this.down);
    this.#append(new Float32Array(this.halfWidth + 1));
    const tail = this.#drain(this.totalIn + this.halfWidth, target);
    this.reset();
    return tail;
  }
}

/** Resample a whole signal (the same numbers as streaming it through one StreamingResampler). */
export function resample(input, inRate, outRate, options) {
  const r = new StreamingResampler(inRate, outRate, options);
  const head = r.process(input);
  const tail = r.flush();
  const out = new Float32Array(head.length + tail.length);
  out.set(head);
  out.set(tail, head.length);
  return out;
}
