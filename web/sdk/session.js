/**
 * Session settings: build the partial GA session that `session.update` (or `connect({session})`)
 * carries, MiMo's extras included, from plain settings. Only the settings given are sent, so the
 * server keeps its defaults for the rest.
 *
 * MiMo extras live under `session.mimo` (see the server's session model):
 *   interleave  "N:M": N text patches then M speech patches, repeatedly; null: the model decides
 *   sampling    {text: {temperature, top_k, top_p}, speech: {...}}: per channel group
 *   task        "spoken_dialogue" | "audio_understanding" | "text_chat"
 *   voice_prompt  base64 pcm16 24 kHz mono of the voice to imitate, where the server offers it
 */

import { ProtocolError } from "./protocol.js";

const INTERLEAVE_RE = /^\s*(\d+)\s*:\s*(\d+)\s*$/;

/** `"N:M"` to `[N, M]` (positive integers), or a ProtocolError naming the value. */
export function parseInterleave(value) {
  const m = INTERLEAVE_RE.exec(String(value));
  if (!m || Number(m[1]) < 1 || Number(m[2]) < 1) {
    throw new ProtocolError(`interleave must look like "N:M" with positive integers N and M, got ${JSON.stringify(value)}`);
  }
  return [Number(m[1]), Number(m[2])];
}

function sampling(group, name) {
  if (!group) return undefined;
  const out = {};
  const { temperature, top_k: topK, top_p: topP } = group;
  if (temperature !== undefined && temperature !== null) {
    if (!(temperature >= 0 && temperature <= 5)) throw new RangeError(`${name} temperature must be in [0, 5], got ${temperature}`);
    out.temperature = temperature;
  }
  if (topK !== undefined && topK !== null) {
    if (!Number.isInteger(topK) || topK < 0) throw new RangeError(`${name} top_k must be an integer >= 0, got ${topK}`);
    out.top_k = topK;
  }
  if (topP !== undefined && topP !== null) {
    if (!(topP > 0 && topP <= 1)) throw new RangeError(`${name} top_p must be in (0, 1], got ${topP}`);
    out.top_p = topP;
  }
  return Object.keys(out).length ? out : undefined;
}

/**
 * @param {object} settings
 * @param {string} [settings.instructions]
 * @param {("audio"|"text")[]} [settings.outputModalities]
 * @param {string} [settings.voice]
 * @param {"server_vad"|"none"} [settings.turnDetection] "none": push-to-talk (commit yourself)
 * @param {object} [settings.vad] server_vad fields (threshold, silence_duration_ms, ...)
 * @param {string|null} [settings.interleave] "N:M", or null for free
 * @param {object} [settings.text] text sampling {temperature, top_k, top_p}
 * @param {object} [settings.speech] speech sampling {temperature, top_k, top_p}
 * @param {string} [settings.task]
 * @param {string} [settings.voicePrompt] base64 pcm16 24 kHz mono
 * @param {boolean} [settings.transcribe] ask for input transcription (user-side transcript events)
 * @returns {object} a partial GA session (without `type`; sessionUpdate adds it)
 */
export function buildSession(settings = {}) {
  const session = {};
  if (settings.instructions !== undefined) session.instructions = settings.instructions;
  if (settings.outputModalities) session.output_modalities = [...settings.outputModalities];

  const audio = {};
  if (settings.turnDetection === "none") {
    audio.input = { turn_detection: null };
  } else if (settings.turnDetection === "server_vad" || settings.vad) {
    audio.input = { turn_detection: { type: "server_vad", ...(settings.vad ?? {}) } };
  }
  if (settings.transcribe !== undefined) {
    audio.input = { ...(audio.input ?? {}), transcription: settings.transcribe ? { model: "mimo-asr" } : null };
  }
  if (settings.voice) audio.output = { voice: settings.voice };
  if (Object.keys(audio).length) session.audio = audio;

  const mimo = {};
  if (settings.interleave !== undefined) {
    const value = settings.interleave === null || settings.interleave === "" ? null : settings.interleave.trim();
    if (value !== null) parseInterleave(value);
    mimo.interleave = value;
  }
  const text = sampling(settings.text, "text");
  const speech = sampling(settings.speech, "speech");
  if (text || speech) mimo.sampling = { ...(text ? { text } : {}), ...(speech ? { speech } : {}) };
  if (settings.task) mimo.task = settings.task;
  if (settings.voicePrompt) mimo.voice_prompt = settings.voicePrompt;
  if (Object.keys(mimo).length) session.mimo = mimo;
  return session;
}

/** True when the server's session (from session.created) offers a MiMo setting named `key`. */
export function serverOffers(session, key) {
  return Boolean(session?.mimo) && Object.hasOwn(session.mimo, key);
}
