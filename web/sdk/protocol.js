/**
 * The OpenAI Realtime (GA) wire protocol as the browser SDK speaks it: event names, event
 * builders, validation that names the offending field, ids, and the base64 pcm16 audio codec.
 *
 * Pure functions, no I/O: the same module runs in the browser, in an AudioWorklet and in Node.
 */

/** Audio on the wire: 16-bit little-endian mono PCM at 24 kHz, base64 inside JSON text frames. */
export const WIRE_SAMPLE_RATE = 24000;

/** Raised for an event that does not follow the protocol; the message names the problem. */
export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

// ---------------------------------------------------------------------------------------------
// Event shapes. A field spec is a type name; a trailing "?" on the field name marks it optional.
// Types: string, object, array, uint (a non-negative integer), base64 (a base64 string), pcm16
// (base64 of an even number of bytes), "string|null".

const CLIENT_EVENTS = {
  "session.update": { session: "object" },
  "input_audio_buffer.append": { audio: "pcm16" },
  "input_audio_buffer.commit": {},
  "input_audio_buffer.clear": {},
  "conversation.item.create": { item: "object", "previous_item_id?": "string|null" },
  "conversation.item.retrieve": { item_id: "string" },
  "conversation.item.truncate": { item_id: "string", content_index: "uint", audio_end_ms: "uint" },
  "conversation.item.delete": { item_id: "string" },
  "response.create": { "response?": "object" },
  "response.cancel": { "response_id?": "string" },
  "output_audio_buffer.clear": {},
};

// Server events list the fields clients key on; extra fields are allowed (servers add fields
// over time and a client must not break on them).
const ADDRESS = { response_id: "string", item_id: "string", output_index: "uint", content_index: "uint" };
const SERVER_EVENTS = {
  error: { error: "object" },
  "session.created": { session: "object" },
  "session.updated": { session: "object" },
  "conversation.created": { conversation: "object" },
  "conversation.item.created": { item: "object" },
  "conversation.item.added": { item: "object" },
  "conversation.item.done": { item: "object" },
  "conversation.item.retrieved": { item: "object" },
  "conversation.item.truncated": { item_id: "string", content_index: "uint", audio_end_ms: "uint" },
  "conversation.item.deleted": { item_id: "string" },
  "conversation.item.input_audio_transcription.delta": { item_id: "string", "delta?": "string" },
  "conversation.item.input_audio_transcription.completed": { item_id: "string", transcript: "string" },
  "conversation.item.input_audio_transcription.failed": { item_id: "string", error: "object" },
  "conversation.item.input_audio_transcription.segment": { item_id: "string", text: "string" },
  "input_audio_buffer.committed": { item_id: "string" },
  "input_audio_buffer.cleared": {},
  "input_audio_buffer.speech_started": { audio_start_ms: "uint", item_id: "string" },
  "input_audio_buffer.speech_stopped": { audio_end_ms: "uint", item_id: "string" },
  "input_audio_buffer.timeout_triggered": { audio_start_ms: "uint", audio_end_ms: "uint", item_id: "string" },
  "output_audio_buffer.started": { response_id: "string" },
  "output_audio_buffer.stopped": { response_id: "string" },
  "output_audio_buffer.cleared": { response_id: "string" },
  "response.created": { response: "object" },
  "response.done": { response: "object" },
  "response.output_item.added": { response_id: "string", output_index: "uint", item: "object" },
  "response.output_item.done": { response_id: "string", output_index: "uint", item: "object" },
  "response.content_part.added": { ...ADDRESS, part: "object" },
  "response.content_part.done": { ...ADDRESS, part: "object" },
  "response.output_text.delta": { ...ADDRESS, delta: "string" },
  "response.output_text.done": { ...ADDRESS, text: "string" },
  "response.output_audio.delta": { ...ADDRESS, delta: "pcm16" },
  "response.output_audio.done": { ...ADDRESS },
  "response.output_audio_transcript.delta": { ...ADDRESS, delta: "string" },
  "response.output_audio_transcript.done": { ...ADDRESS, transcript: "string" },
  "response.function_call_arguments.delta": {
    response_id: "string", item_id: "string", output_index: "uint", call_id: "string", delta: "string",
  },
  "response.function_call_arguments.done": {
    response_id: "string", item_id: "string", output_index: "uint", call_id: "string", arguments: "string",
  },
  "rate_limits.updated": { rate_limits: "array" },
};

/** Event types a client may send. */
export const CLIENT_EVENT_TYPES = Object.freeze(Object.keys(CLIENT_EVENTS));
/** Event types a GA server may send (others are passed through untouched). */
export const SERVER_EVENT_TYPES = Object.freeze(Object.keys(SERVER_EVENTS));

const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

function base64ByteLength(b64) {
  const padding = b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0;
  return (b64.length / 4) * 3 - padding;
}

function typeOk(value, spec) {
  switch (spec) {
    case "string":
      return typeof value === "string";
    case "string|null":
      return value === null || typeof value === "string";
    case "object":
      return value !== null && typeof value === "object" && !Array.isArray(value);
    case "array":
      return Array.isArray(value);
    case "uint":
      return Number.isInteger(value) && value >= 0;
    case "base64":
      return typeof value === "string" && value.length % 4 === 0 && BASE64_RE.test(value);
    case "pcm16":
      return typeOk(value, "base64") && base64ByteLength(value) % 2 === 0;
    default:
      throw new Error(`unknown field spec ${spec}`);
  }
}

function describe(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "string") return value.length > 40 ? "a string" : JSON.stringify(value);
  return `${typeof value} ${typeof value === "object" ? "" : String(value)}`.trim();
}

function checkFields(event, fields, where) {
  for (const [key, spec] of Object.entries(fields)) {
    const optional = key.endsWith("?");
    const name = optional ? key.slice(0, -1) : key;
    if (!(name in event) || event[name] === undefined) {
      if (optional) continue;
      throw new ProtocolError(`${where}: missing field "${name}" (${spec})`);
    }
    if (!typeOk(event[name], spec)) {
      throw new ProtocolError(`${where}: field "${name}" must be ${spec}, got ${describe(event[name])}`);
    }
  }
}

function checkEnvelope(event, where) {
  if (event === null || typeof event !== "object" || Array.isArray(event)) {
    throw new ProtocolError(`${where}: an event must be a JSON object, got ${describe(event)}`);
  }
  if (typeof event.type !== "string" || event.type === "") {
    throw new ProtocolError(`${where}: missing string field "type"`);
  }
  if ("event_id" in event && typeof event.event_id !== "string") {
    throw new ProtocolError(`${where}: field "event_id" must be a string, got ${describe(event.event_id)}`);
  }
}

/**
 * Check an event before it is sent: known type, required fields with the right types, no
 * unknown top-level fields (a typo would otherwise be silently ignored). Returns the event.
 */
export function validateClientEvent(event) {
  checkEnvelope(event, "client event");
  const fields = CLIENT_EVENTS[event.type];
  if (!fields) {
    throw new ProtocolError(
      `client event: field "type" has unknown value "${event.type}"; expected one of ${CLIENT_EVENT_TYPES.join(", ")}`,
    );
  }
  const where = `client event "${event.type}"`;
  checkFields(event, fields, where);
  const allowed = new Set(["type", "event_id", ...Object.keys(fields).map((k) => k.replace(/\?$/, ""))]);
  for (const key of Object.keys(event)) {
    if (!allowed.has(key)) throw new ProtocolError(`${where}: unknown field "${key}"`);
  }
  return event;
}

/**
 * Parse one server message (a JSON string, or an already parsed object) into an event. Known
 * types must carry the fields clients rely on; unknown types pass through so that a newer server
 * does not break an older client.
 */
export function parseServerEvent(message) {
  let event = message;
  if (typeof message === "string") {
    try {
      event = JSON.parse(message);
    } catch (err) {
      throw new ProtocolError(`server message is not valid JSON (${err.message}): ${message.slice(0, 80)}`);
    }
  }
  checkEnvelope(event, "server event");
  const fields = SERVER_EVENTS[event.type];
  if (fields) checkFields(event, fields, `server event "${event.type}"`);
  return event;
}

/** True when `type` is a server event this SDK knows. */
export function isKnownServerEvent(type) {
  return Object.hasOwn(SERVER_EVENTS, type);
}

// ---------------------------------------------------------------------------------------------
// Ids

const ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/** A random id such as `event_3fK9...` (`length` base-62 characters from the platform CSPRNG). */
export function newId(prefix = "event", length = 20) {
  const bytes = new Uint8Array(length);
  globalThis.crypto.getRandomValues(bytes);
  let out = "";
  // 248 = 4 * 62: rejecting bytes >= 248 keeps the characters uniform.
  for (let i = 0; out.length < length; i++) {
    if (i === bytes.length) {
      globalThis.crypto.getRandomValues(bytes);
      i = 0;
    }
    if (bytes[i] < 248) out += ID_ALPHABET[bytes[i] % 62];
  }
  return `${prefix}_${out}`;
}

// ---------------------------------------------------------------------------------------------
// Event builders. Each returns a plain object that passes validateClientEvent; `send` adds the
// event_id.

/**
 * `session.update` with a partial GA session. The GA schema requires `session.type`
 * ("realtime"), which is filled in when missing.
 */
export function sessionUpdate(session) {
  if (session === null || typeof session !== "object" || Array.isArray(session)) {
    throw new ProtocolError(`session.update: session must be an object, got ${describe(session)}`);
  }
  return { type: "session.update", session: { type: "realtime", ...session } };
}

/** `input_audio_buffer.append` from pcm16 samples (Int16Array) at 24 kHz. */
export function inputAudioAppend(pcm16) {
  if (!(pcm16 instanceof Int16Array)) {
    throw new ProtocolError("input_audio_buffer.append: audio must be an Int16Array of 24 kHz samples");
  }
  return { type: "input_audio_buffer.append", audio: pcm16ToBase64(pcm16) };
}

export const inputAudioCommit = () => ({ type: "input_audio_buffer.commit" });
export const inputAudioClear = () => ({ type: "input_audio_buffer.clear" });
export const outputAudioClear = () => ({ type: "output_audio_buffer.clear" });

/** `response.create`; `response` holds GA response options (instructions, output_modalities, ...). */
export function responseCreate(response) {
  if (response === undefined || response === null || Object.keys(response).length === 0) {
    return { type: "response.create" };
  }
  return { type: "response.create", response: { ...response } };
}

/** `response.cancel`, optionally for a given response id. */
export function responseCancel(responseId) {
  return responseId ? { type: "response.cancel", response_id: responseId } : { type: "response.cancel" };
}

/** `conversation.item.truncate`: the listener heard `audioEndMs` of the item's first content part. */
export function itemTruncate(itemId, audioEndMs, contentIndex = 0) {
  if (typeof itemId !== "string" || itemId === "") {
    throw new ProtocolError("conversation.item.truncate: item_id must be a non-empty string");
  }
  const ms = Math.max(0, Math.floor(audioEndMs));
  return { type: "conversation.item.truncate", item_id: itemId, content_index: contentIndex, audio_end_ms: ms };
}

/** `conversation.item.create` holding a user text message. */
export function userTextMessage(text) {
  if (typeof text !== "string") throw new ProtocolError("user text message: text must be a string");
  return {
    type: "conversation.item.create",
    item: { type: "message", role: "user", content: [{ type: "input_text", text }] },
  };
}

export const itemDelete = (itemId) => ({ type: "conversation.item.delete", item_id: itemId });
export const itemRetrieve = (itemId) => ({ type: "conversation.item.retrieve", item_id: itemId });

// ---------------------------------------------------------------------------------------------
// Audio codec: float <-> pcm16 <-> base64 (little-endian on the wire whatever the host order).

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Float samples in [-1, 1] to pcm16, clipped. One scale (32768) both ways makes pcm16 -> float ->
 * pcm16 exact; +1.0 itself clips to 32767.
 */
export function floatToPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.round(samples[i] * 32768);
    out[i] = v > 32767 ? 32767 : v < -32768 ? -32768 : v;
  }
  return out;
}

/** pcm16 to float samples in [-1, 1). */
export function pcm16ToFloat(pcm16) {
  const out = new Float32Array(pcm16.length);
  for (let i = 0; i < pcm16.length; i++) out[i] = pcm16[i] / 32768;
  return out;
}

/** Little-endian bytes of pcm16 samples. */
export function pcm16ToBytes(pcm16) {
  if (LITTLE_ENDIAN) return new Uint8Array(pcm16.buffer, pcm16.byteOffset, pcm16.byteLength).slice();
  const out = new Uint8Array(pcm16.length * 2);
  const view = new DataView(out.buffer);
  for (let i = 0; i < pcm16.length; i++) view.setInt16(2 * i, pcm16[i], true);
  return out;
}

/** pcm16 samples from little-endian bytes; an odd byte count is a protocol error. */
export function bytesToPcm16(bytes) {
  if (bytes.length % 2 !== 0) {
    throw new ProtocolError(`pcm16 audio must have an even number of bytes, got ${bytes.length}`);
  }
  if (LITTLE_ENDIAN) {
    const copy = bytes.slice(); // aligned copy
    return new Int16Array(copy.buffer, copy.byteOffset, copy.length / 2);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Int16Array(bytes.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true);
  return out;
}

const B64_CHUNK = 0x8000; // String.fromCharCode argument limit stays far away

/** Base64 of raw bytes. */
export function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += B64_CHUNK) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + B64_CHUNK));
  }
  return btoa(binary);
}

/** Raw bytes of a base64 string; invalid base64 is a protocol error. */
export function base64ToBytes(b64) {
  let binary;
  try {
    binary = atob(b64);
  } catch {
    throw new ProtocolError(`invalid base64 audio (${b64.length} characters)`);
  }
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

/** Base64 pcm16 as sent in `input_audio_buffer.append`. */
export const pcm16ToBase64 = (pcm16) => bytesToBase64(pcm16ToBytes(pcm16));
/** pcm16 samples from the base64 `delta` of `response.output_audio.delta`. */
export const base64ToPcm16 = (b64) => bytesToPcm16(base64ToBytes(b64));

/** Duration in milliseconds of `samples` samples at `sampleRate`. */
export const samplesToMs = (samples, sampleRate = WIRE_SAMPLE_RATE) => (samples * 1000) / sampleRate;
