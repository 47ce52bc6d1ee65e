import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SDK } from "./helpers.mjs";

const { StreamingResampler, resample } = await import(SDK("resampler.js"));

function sine(freq, rate, n, amp = 0.5, phase = 0) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = amp * Math.sin((2 * Math.PI * freq * i) / rate + phase);
  return x;
}

function rms(x, from = 0, to = x.length) {
  let s = 0;
  for (let i = from; i < to; i++) s += x[i] * x[i];
  return Math.sqrt(s / (to - from));
}

function streamInChunks(input, inRate, outRate, sizes) {
  const r = new StreamingResampler(inRate, outRate);
  const parts = [];
  let at = 0;
  for (let k = 0; at < input.length; k++) {
    const n = sizes[k % sizes.length];
    parts.push(r.process(input.subarray(at, at + n)));
    at += n;
  }
  parts.push(r.flush());
  const out = new Float32Array(parts.reduce((a, b) => a + b.length, 0));
  let o = 0;
  for (const part of parts) {
    out.set(part, o);
    o += part.length;
  }
  return out;
}

const RATES = [
  [48000, 24000],
  [44100, 24000],
  [16000, 24000],
  [22050, 24000],
  [8000, 24000],
];

describe("StreamingResampler", () => {
  for (const [inRate, outRate] of RATES) {
    test(`${inRate} -> ${outRate}: streaming equals offline for chunks of 1, 2, odd and render-quantum sizes`, () => {
      const input = sine(440, inRate, 3001);
      for (let i = 0; i < input.length; i += 97) input[i] += 0.3; // clicks: broadband content
      const offline = resample(input, inRate, outRate);
      assert.equal(offline.length, Math.ceil((input.length * outRate) / inRate));
      for (const sizes of [[1], [2], [3, 7, 129], [128], [960]]) {
        assert.deepEqual(streamInChunks(input, inRate, outRate, sizes), offline, `chunks ${sizes}`);
      }
    });

    test(`${inRate} -> ${outRate}: a 1 kHz tone comes out at the same frequency, amplitude and time`, () => {
      const n = inRate; // one second
      const out = resample(sine(1000, inRate, n), inRate, outRate);
      const expected = sine(1000, outRate, out.length);
      // Away from the edges (the filter reads zeros outside the signal).
      const edge = 200;
      let err = 0;
      for (let i = edge; i < out.length - edge; i++) err = Math.max(err, Math.abs(out[i] - expected[i]));
      assert.ok(err < 1e-4, `max error ${err}`);
    });
  }

  test("causality of the stream: appending input does not change output already produced", () => {
    const input = sine(300, 48000, 4800);
    const r1 = new StreamingResampler(48000, 24000);
    const first = r1.process(input.subarray(0, 2400));
    const r2 = new StreamingResampler(48000, 24000);
    const longer = r2.process(input);
    assert.deepEqual(longer.subarray(0, first.length), first);
  });

  test("downsampling removes content above the new Nyquist frequency", () => {
    const out = resample(sine(15000, 48000, 48000), 48000, 24000);
    assert.ok(rms(out, 500, out.length - 500) < 1e-4, `alias rms ${rms(out, 500, out.length - 500)}`);
  });

  test("unit DC gain at every phase", () => {
    const out = resample(new Float32Array(44100).fill(0.25), 44100, 24000);
    for (let i = 100; i < out.length - 100; i++) assert.ok(Math.abs(out[i] - 0.25) < 1e-6, `sample ${i}: ${out[i]}`);
  });

  test("equal rates pass samples through; bad rates are named", () => {
    const x = sine(100, 24000, 50);
    assert.deepEqual(resample(x, 24000, 24000), x);
    assert.throws(() => new StreamingResampler(44100.5, 24000), /inRate must be an integer sample rate/);
    assert.throws(() => new StreamingResampler(48000, 0), /outRate must be an integer sample rate/);
    assert.throws(() => new StreamingResampler(48000, 24000).process([1, 2]), /Float32Array/);
  });

  test("flush resets: a second stream gives the same output as a fresh resampler", () => {
    const x = sine(700, 16000, 999);
    const r = new StreamingResampler(16000, 24000);
    const a = [r.process(x), r.flush()];
    const b = [r.process(x), r.flush()];
    assert.deepEqual(b, a);
  });
});
