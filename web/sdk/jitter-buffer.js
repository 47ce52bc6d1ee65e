/**
 * The playback policy for streamed agent audio, as a plain class (the playback AudioWorklet
 * wraps it; tests drive it directly).
 *
 * - Start playing once `prebufferMs` of audio is buffered, or at once when the stream has ended
 *   (a reply shorter than the pre-buffer must still play).
 * - Running dry mid-stream is an underrun: wait for the pre-buffer again, a little longer each
 *   time (`underrunStepMs`, up to `maxPrebufferMs`), the way moshi's client adapts.
 * - Never hold more than `maxBufferMs`: beyond it the *oldest* audio is dropped, which bounds the
 *   delay when the audio clock falls behind the sender.
 * - Account, per item, the end of the audio actually played (`playedMs(itemId)`): the
 *   `audio_end_ms` of `conversation.item.truncate` after an interruption. Dropped audio was never
 *   heard, so it never counts as played.
 */

/** Defaults, in milliseconds. */
export const JITTER_DEFAULTS = Object.freeze({
  prebufferMs: 60,
  maxPrebufferMs: 200,
  underrunStepMs: 10,
  maxBufferMs: 1000,
  maxItems: 32, // per-item accounting kept for the most recent items only
});

/** Playback states. */
export const PlaybackState = Object.freeze({ IDLE: "idle", BUFFERING: "buffering", PLAYING: "playing" });

export class JitterBuffer {
  /**
   * @param {object} [options]
   * @param {number} [options.sampleRate=24000]
   * @param {number} [options.prebufferMs] audio to gather before playback starts
   * @param {number} [options.maxPrebufferMs] the pre-buffer stops growing here
   * @param {number} [options.underrunStepMs] pre-buffer growth per underrun
   * @param {number} [options.maxBufferMs] cap on buffered audio; the oldest goes beyond it
   * @param {number} [options.maxItems] how many items keep their played/received accounting
   */
  constructor({ sampleRate = 24000, ...options } = {}) {
    const o = { ...JITTER_DEFAULTS, ...options };
    for (const [key, value] of Object.entries(o)) {
      if (!Number.isFinite(value) || value < 0) throw new RangeError(`${key} must be a number >= 0, got ${value}`);
    }
    if (o.maxBufferMs <= o.maxPrebufferMs) {
      throw new RangeError(`maxBufferMs (${o.maxBufferMs}) must exceed maxPrebufferMs (${o.maxPrebufferMs})`);
    }
    if (o.prebufferMs > o.maxPrebufferMs) {
      throw new RangeError(`prebufferMs (${o.prebufferMs}) must not exceed maxPrebufferMs (${o.maxPrebufferMs})`);
    }
    const toSamples = (ms) => Math.round((ms * sampleRate) / 1000);
    this.sampleRate = sampleRate;
    this.prebufferSamples = toSamples(o.prebufferMs);
    this.maxPrebufferSamples = toSamples(o.maxPrebufferMs);
    this.underrunStepSamples = toSamples(o.underrunStepMs);
    this.maxBufferSamples = toSamples(o.maxBufferMs);
    this.maxItems = o.maxItems;

    this.state = PlaybackState.IDLE;
    this.ended = false; // the sender said no more audio is coming for now
    this.queue = []; // {data: Float32Array, pos, itemId, itemOffset}
    this.bufferedSamples = 0;
    this.items = new Map(); // itemId -> {received, playedEnd, started}
    this.lastPlayedItem = undefined;
    this.events = [];
    this.stats = { pushedSamples: 0, playedSamples: 0, droppedSamples: 0, clearedSamples: 0, underruns: 0 };
  }

  get bufferedMs() {
    return (this.bufferedSamples * 1000) / this.sampleRate;
  }

  #item(itemId) {
    let item = this.items.get(itemId);
    if (!item) {
      item = { received: 0, playedEnd: 0, started: false };
      this.items.set(itemId, item);
      if (this.items.size > this.maxItems) this.items.delete(this.items.keys().next().value); // oldest
    }
    return item;
  }

  /** Queue `samples` (Float32Array, copied) of item `itemId` (any key; null for "no item"). */
  push(samples, itemId = null) {
    if (!(samples instanceof Float32Array)) throw new TypeError("JitterBuffer.push expects a Float32Array");
    if (samples.length === 0) return;
    const item = this.#item(itemId);
    this.queue.push({ data: samples.slice(), pos: 0, itemId, itemOffset: item.received });
    item.received += samples.length;
    this.bufferedSamples += samples.length;
    this.stats.pushedSamples += samples.length;
    this.ended = false;
    if (this.state === PlaybackState.IDLE) this.state = PlaybackState.BUFFERING;
    this.#dropOverflow();
  }

  #dropOverflow() {
    let excess = this.bufferedSamples - this.maxBufferSamples;
    while (excess > 0) {
      const head = this.queue[0];
      const n = Math.min(excess, head.data.length - head.pos);
      head.pos += n;
      excess -= n;
      this.bufferedSamples -= n;
      this.stats.droppedSamples += n;
      this.events.push({ type: "dropped", itemId: head.itemId, samples: n });
      if (head.pos === head.data.length) this.queue.shift();
    }
  }

  /** No more audio is coming for now: play what is buffered without waiting for the pre-buffer. */
  endOfStream() {
    this.ended = true;
    if (this.bufferedSamples === 0 && this.state !== PlaybackState.IDLE) {
      this.state = PlaybackState.IDLE;
      this.events.push({ type: "drained" });
    }
  }

  /**
   * Fill `out` with the next samples to play (silence where there is no audio) and return how
   * many samples of real audio were written.
   */
  pull(out) {
    let written = 0;
    if (
      this.state === PlaybackState.BUFFERING &&
      (this.bufferedSamples >= this.prebufferSamples || (this.ended && this.bufferedSamples > 0))
    ) {
      this.state = PlaybackState.PLAYING;
    }
    if (this.state === PlaybackState.PLAYING) {
      while (written < out.length && this.queue.length > 0) {
        const chunk = this.queue[0];
        const item = this.#item(chunk.itemId);
        if (!item.started) {
          item.started = true;
          this.events.push({ type: "started", itemId: chunk.itemId, offset: written });
        }
        const n = Math.min(out.length - written, chunk.data.length - chunk.pos);
        out.set(chunk.data.subarray(chunk.pos, chunk.pos + n), written);
        chunk.pos += n;
        written += n;
        this.bufferedSamples -= n;
        item.playedEnd = chunk.itemOffset + chunk.pos;
        this.lastPlayedItem = chunk.itemId;
        if (chunk.pos === chunk.data.length) this.queue.shift();
      }
      this.stats.playedSamples += written;
      if (this.queue.length === 0) {
        if (this.ended) {
          this.state = PlaybackState.IDLE;
          this.events.push({ type: "drained" });
        } else if (written < out.length) {
          this.state = PlaybackState.BUFFERING;
          this.stats.underruns += 1;
          this.prebufferSamples = Math.min(this.maxPrebufferSamples, this.prebufferSamples + this.underrunStepSamples);
          this.events.push({ type: "underrun", itemId: this.lastPlayedItem });
        }
      }
    }
    out.fill(0, written);
    return written;
  }

  /**
   * Stop: discard everything buffered. Returns how much of `itemId` was heard (by default the item
   * that was playing or about to play), for `conversation.item.truncate`.
   */
  clear(itemId = this.queue.length > 0 ? this.queue[0].itemId : this.lastPlayedItem) {
    const discarded = this.bufferedSamples;
    this.stats.clearedSamples += discarded;
    this.queue = [];
    this.bufferedSamples = 0;
    this.ended = false;
    this.state = PlaybackState.IDLE;
    const item = itemId === undefined ? undefined : this.items.get(itemId);
    return {
      itemId: itemId === undefined ? null : itemId,
      playedMs: item ? this.#ms(item.playedEnd) : 0,
      receivedMs: item ? this.#ms(item.received) : 0,
      discardedMs: this.#ms(discarded),
    };
  }

  #ms(samples) {
    return (samples * 1000) / this.sampleRate;
  }

  /** Milliseconds of `itemId`'s audio heard so far: the end of its last played sample. */
  playedMs(itemId) {
    const item = this.items.get(itemId);
    return item ? this.#ms(item.playedEnd) : 0;
  }

  /** Milliseconds of `itemId`'s audio received so far. */
  receivedMs(itemId) {
    const item = this.items.get(itemId);
    return item ? this.#ms(item.received) : 0;
  }

  /** Events since the last call: started / underrun / dropped / drained. */
  takeEvents() {
    const events = this.events;
    this.events = [];
    return events;
  }
}
