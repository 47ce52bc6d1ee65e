/**
 * Audio level measurement for the microphone meter, the "last loud mic sample" latency anchor
 * and the WebRTC "agent audio audible" detector. Pure functions; the capture worklet imports them.
 */

/** Level below which dBFS figures are clamped. */
export const FLOOR_DB = -90;

/** RMS and peak (absolute) of a block of float samples. */
export function measureLevel(samples) {
  let sum = 0;
  let peak = 0;
  for (let i = 0; i < samples.length; i++) {
    const s = samples[i];
    sum += s * s;
    const a = s < 0 ? -s : s;
    if (a > peak) peak = a;
  }
  return { rms: samples.length ? Math.sqrt(sum / samples.length) : 0, peak };
}

/** Linear amplitude to dBFS (0 dBFS = full scale), clamped at FLOOR_DB. */
export function toDbfs(amplitude) {
  return amplitude > 0 ? Math.max(FLOOR_DB, 20 * Math.log10(amplitude)) : FLOOR_DB;
}

/**
 * A meter for display: jumps up at once, falls back at `releaseDbPerSecond`, and maps
 * [floorDb, 0] dBFS onto [0, 1].
 */
export class LevelMeter {
  constructor({ floorDb = -60, releaseDbPerSecond = 40 } = {}) {
    this.floorDb = floorDb;
    this.releaseDbPerSecond = releaseDbPerSecond;
    this.db = FLOOR_DB;
  }

  /** Feed one block's RMS and its duration; returns the displayed level in [0, 1]. */
  update(rms, durationMs) {
    const db = toDbfs(rms);
    this.db = Math.max(db, this.db - (this.releaseDbPerSecond * durationMs) / 1000);
    return this.value;
  }

  get value() {
    return Math.min(1, Math.max(0, (this.db - this.floorDb) / -this.floorDb));
  }
}
