// The browser demo: a thin page over the SDK. Everything a headless test needs to read is on
// window.mimoDemo (see the end of this file and web/sdk/README.md).

import * as sdk from "./sdk/index.js";
import { serverBase } from "./sdk/urls.js";

const { LevelMeter, TurnLatencyTracker, buildSession, connect, getMicrophone, resample, serverOffers } = sdk;

const $ = (id) => document.getElementById(id);
const VOICE_PROMPT_MAX_S = 10;
const STATS_EVERY_MS = 500;
const MAX_ERRORS = 50;

// ---- state exposed to tests -------------------------------------------------------------------

const demo = {
  sdk,
  sdkLoaded: true,
  // microphone: true while the connection has one, false when it runs without (typing only)
  state: { status: "idle", connected: false, transport: null, sessionId: null, callId: null, micMuted: false, ducked: false, microphone: null },
  // the server's model card (/healthz): {name, weights: "random"|"trained", summary, examples}
  model: null,
  // {role: "user"|"assistant", itemId, text, final, interrupted, placeholder, responseId}; a turn
  // without a transcript (user speech, or agent speech cut off before its first words) has text ""
  // and placeholder true (shown as "(speech)"). A new connection after earlier turns adds
  // {role: "separator", text}.
  transcript: [],
  latencies: [], // TurnLatencyTracker turns
  errors: [], // {source: "server"|"client"|"connection"|"settings", code, message, t}
  audio: { framesReceived: 0, framesPlayed: 0, msReceived: 0, msPlayed: 0, msDropped: 0, underruns: 0, micMsSent: 0, micMsDucked: 0 },
  eventCounts: {},
  client: null,
  connect: () => doConnect(),
  disconnect: () => doDisconnect(),
};
window.mimoDemo = demo;

let client = null;
let micStream = null;
let tracker = null;
let statsTimer = null;
let voicePrompt = null; // base64 pcm16 24 kHz, once a file was loaded
const meter = new LevelMeter();
const entries = new Map(); // itemId -> {entry, li}

// ---- status, errors ---------------------------------------------------------------------------

const STATUS_TEXT = { idle: "Disconnected", connecting: "Connecting…", connected: "Connected" };

function setStatus(status) {
  demo.state.status = status;
  demo.state.connected = status === "connected";
  const el = document.querySelector("[data-testid=status]");
  el.dataset.state = status;
  el.querySelector(".status-text").textContent =
    status === "connected" ? `Connected · ${demo.state.transport === "webrtc" ? "WebRTC" : "WebSocket"}` : STATUS_TEXT[status];
  const busy = status !== "idle";
  $("connect").disabled = busy;
  $("disconnect").disabled = !busy;
  for (const input of document.querySelectorAll("input[name=transport]")) input.disabled = busy;
  $("interrupt").disabled = status !== "connected";
  for (const id of ["mute", "talk"]) $(id).disabled = status !== "connected" || !micStream;
  // typing needs no microphone, and connects first when idle
  for (const id of ["text-input", "send-text"]) $(id).disabled = status === "connecting";
}

function addError(source, message, code = null) {
  const error = { source, code, message, t: Date.now() };
  demo.errors.push(error);
  if (demo.errors.length > MAX_ERRORS) demo.errors.shift();
  const li = document.createElement("li");
  const badge = Object.assign(document.createElement("span"), { className: `badge ${source}`, textContent: source });
  const text = Object.assign(document.createElement("span"), { className: "message", textContent: code ? `${code}: ${message}` : message });
  const time = Object.assign(document.createElement("time"), { textContent: new Date(error.t).toLocaleTimeString() });
  li.append(badge, text, time);
  $("errors").prepend(li);
  while ($("errors").children.length > MAX_ERRORS) $("errors").lastChild.remove();
  $("errors-card").hidden = false;
}

// ---- settings ---------------------------------------------------------------------------------

function number(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${$(id).getAttribute("aria-label") ?? id} must be a number`);
  return value;
}

/** The session the form describes; throws with a readable message on bad input. */
function readSession() {
  const settings = {
    turnDetection: $("turn-detection").value,
    transcribe: $("transcribe").checked,
    text: { temperature: number("text-temperature"), top_p: number("text-top-p") },
    speech: { temperature: number("speech-temperature"), top_p: number("speech-top-p") },
  };
  const instructions = $("instructions").value.trim();
  if (instructions) settings.instructions = instructions;
  const interleave = $("interleave").value.trim();
  if (interleave) settings.interleave = interleave;
  if (voicePrompt) settings.voicePrompt = voicePrompt;
  return buildSession(settings);
}

/** The form's session, or null after showing what is wrong with it. */
function sessionOrReport() {
  try {
    return readSession();
  } catch (err) {
    addError("settings", err.message);
    return null;
  }
}

function applySettings() {
  const session = sessionOrReport();
  if (!session) return;
  if (client) {
    try {
      client.updateSession(session);
    } catch (err) {
      addError("client", err.message);
    }
  }
  updateTalkMode();
}

async function loadVoicePrompt(file) {
  const context = new AudioContext();
  try {
    const decoded = await context.decodeAudioData(await file.arrayBuffer());
    const mono = new Float32Array(decoded.length);
    for (let c = 0; c < decoded.numberOfChannels; c++) {
      const ch = decoded.getChannelData(c);
      for (let i = 0; i < mono.length; i++) mono[i] += ch[i] / decoded.numberOfChannels;
    }
    const wire = resample(mono, decoded.sampleRate, 24000);
    const clipped = wire.subarray(0, VOICE_PROMPT_MAX_S * 24000);
    voicePrompt = sdk.protocol.pcm16ToBase64(sdk.protocol.floatToPcm16(clipped));
    const seconds = (clipped.length / 24000).toFixed(1);
    $("voice-prompt-hint").textContent = `${file.name}: ${seconds} s${wire.length > clipped.length ? ` (first ${VOICE_PROMPT_MAX_S} s)` : ""}; sent on Apply`;
  } catch (err) {
    voicePrompt = null;
    addError("settings", `voice prompt: cannot decode ${file.name} (${err.message})`);
  } finally {
    context.close();
  }
}

function updateTalkMode() {
  const pushToTalk = $("turn-detection").value === "none";
  $("talk").hidden = !pushToTalk;
  if (micStream) setMicEnabled(!pushToTalk && !demo.state.micMuted);
}

// ---- microphone -------------------------------------------------------------------------------

function setMicEnabled(on) {
  for (const track of micStream?.getAudioTracks() ?? []) track.enabled = on;
}

function toggleMute() {
  demo.state.micMuted = !demo.state.micMuted;
  $("mute").textContent = demo.state.micMuted ? "Unmute" : "Mute";
  $("mute").setAttribute("aria-pressed", String(demo.state.micMuted));
  setMicEnabled(!demo.state.micMuted && $("turn-detection").value !== "none");
}

function showLevel(event) {
  const value = meter.update(event.rms, 20);
  const el = document.querySelector("[data-testid=mic-level]");
  el.querySelector(".meter-fill").style.transform = `scaleX(${value})`;
  el.setAttribute("aria-valuenow", value.toFixed(2));
  $("mic-db").textContent = `${Math.round(meter.db)} dBFS`;
  demo.state.ducked = event.ducked;
  $("mic-state").textContent = demo.state.micMuted ? "muted" : event.ducked ? "ducked while the agent speaks" : "live";
}

// ---- transcript -------------------------------------------------------------------------------

function entryFor(role, itemId) {
  const known = entries.get(itemId);
  if (known) return known;
  $("transcript").querySelector(".empty")?.remove();
  const entry = { role, itemId, text: "", final: false, interrupted: false, placeholder: true, responseId: null };
  const li = document.createElement("li");
  li.className = `bubble ${role}`;
  li.dataset.itemId = itemId;
  li.append(Object.assign(document.createElement("span"), { className: "who", textContent: role === "user" ? "You" : "Agent" }));
  li.append(Object.assign(document.createElement("p"), { className: "text" }));
  $("transcript").append(li);
  const record = { entry, li };
  entries.set(itemId, record);
  demo.transcript.push(entry);
  render(record);
  return record;
}

/** A line between the turns of two connections: the conversation on the server starts afresh
 * (and so does the latency table). */
function addSeparator(transport) {
  if (!demo.transcript.length || demo.transcript.at(-1).role === "separator") return;
  const text = `New connection (${transport === "webrtc" ? "WebRTC" : "WebSocket"}) at ${new Date().toLocaleTimeString()}: the agent does not remember the turns above`;
  demo.transcript.push({ role: "separator", text });
  const li = Object.assign(document.createElement("li"), { className: "separator", textContent: text });
  li.dataset.testid = "transcript-separator";
  $("transcript").append(li);
}

function render({ entry, li }) {
  const blank = entry.placeholder && !entry.text.trim(); // a transcript of one space is no transcript
  li.querySelector(".text").textContent = blank ? "(speech)" : entry.text;
  li.classList.toggle("placeholder", blank);
  li.classList.toggle("interrupted", entry.interrupted);
  li.classList.toggle("pending", !entry.final);
  const list = $("transcript");
  list.scrollTop = list.scrollHeight;
}

function userText(itemId, text, final) {
  const record = entryFor("user", itemId);
  record.entry.text = text;
  record.entry.final = final;
  record.entry.placeholder = !text?.trim();
  render(record);
}

function agentText(itemId, text, { append = false, final = false, responseId = null } = {}) {
  const record = entryFor("assistant", itemId);
  if (responseId) record.entry.responseId = responseId;
  record.entry.text = append ? record.entry.text + text : text;
  record.entry.placeholder = !record.entry.text.trim();
  record.entry.final = record.entry.final || final;
  render(record);
}

function markInterrupted(itemId) {
  const record = entries.get(itemId);
  if (!record) return;
  record.entry.interrupted = true;
  record.entry.final = true;
  render(record);
}

function onItem(item) {
  if (item.type !== "message" || !item.id) return;
  const part = item.content?.[0];
  if (item.role === "user") {
    const text = part?.type === "input_text" ? part.text : part?.transcript;
    if (text) userText(item.id, text, true);
    else entryFor("user", item.id);
  } else if (item.role === "assistant") {
    entryFor("assistant", item.id);
  }
}

// ---- events -----------------------------------------------------------------------------------

function onEvent(e) {
  demo.eventCounts[e.type] = (demo.eventCounts[e.type] ?? 0) + 1;
  tracker?.handle(e);
  switch (e.type) {
    case "session.created":
    case "session.updated":
      demo.state.sessionId = e.session.id ?? null;
      updateVoicePromptControl();
      break;
    case "input_audio_buffer.committed": {
      // The turn is in; a transcript may still follow if the server transcribes input.
      const record = entryFor("user", e.item_id);
      record.entry.final = true;
      render(record);
      break;
    }
    case "conversation.item.added":
    case "conversation.item.done":
      onItem(e.item);
      break;
    case "conversation.item.input_audio_transcription.delta":
      userText(e.item_id, (entries.get(e.item_id)?.entry.text ?? "") + (e.delta ?? ""), false);
      break;
    case "conversation.item.input_audio_transcription.completed":
      userText(e.item_id, e.transcript, true);
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      agentText(e.item_id, e.delta, { append: true, responseId: e.response_id });
      break;
    case "response.output_audio_transcript.done":
      agentText(e.item_id, e.transcript, { final: true });
      break;
    case "response.output_text.done":
      agentText(e.item_id, e.text, { final: true });
      break;
    case "conversation.item.truncated":
    case "client.interrupted":
      markInterrupted(e.item_id);
      break;
    case "response.done":
      onResponseDone(e.response);
      break;
    case "error":
      addError("server", e.error.message, e.error.code ?? e.error.type);
      break;
    case "client.error":
      addError("client", e.error.message, e.error.type);
      break;
    case "client.mic_level":
      showLevel(e);
      break;
    case "client.close":
      if (e.error) addError("connection", e.error);
      teardown();
      break;
    default:
      break;
  }
}

function onResponseDone(response) {
  const itemIds = new Set((response.output ?? []).map((item) => item.id));
  for (const record of entries.values()) {
    const { entry } = record;
    if (entry.role !== "assistant" || !(itemIds.has(entry.itemId) || entry.responseId === response.id)) continue;
    if (response.status === "cancelled" || response.status === "incomplete") markInterrupted(entry.itemId);
    entry.final = true;
    render(record);
  }
  if (response.status === "failed") {
    const err = response.status_details?.error;
    addError("server", err?.message ?? "the response failed", err?.code ?? "response_failed");
  }
}

function updateVoicePromptControl() {
  const offered = serverOffers(client?.session, "voice_prompt");
  $("voice-prompt").disabled = !offered;
  if (!voicePrompt) {
    $("voice-prompt-hint").textContent = offered ? "a short clip of the voice to imitate (≤ 10 s)" : client ? "not offered by this server" : "available once connected, if the server offers it";
  }
}

// ---- the model ------------------------------------------------------------------------------

/** Say which model the server runs and what to expect of it (its /healthz model card); a model
 * that lists examples gets them as prompts to click. */
async function showModel() {
  const notice = $("model-notice");
  let card = null;
  try {
    const { secure, host, path } = serverBase($("server-url").value.trim() || location.origin);
    const res = await fetch(`${secure ? "https" : "http"}://${host}${path}/healthz`, { cache: "no-store" });
    card = res.ok ? (await res.json()).model_card ?? null : null;
  } catch {
    card = null;
  }
  demo.model = card;
  notice.dataset.weights = card?.weights ?? "";
  if (!card) {
    notice.textContent = "The server did not say which model it runs.";
    $("examples").replaceChildren();
    $("examples").hidden = true;
    return;
  }
  notice.textContent = card.weights === "random"
    ? `${card.name} has random weights: every stage runs for real, but its answers are noise and babble and its transcripts random characters. Serve a trained checkpoint (--model) for answers that mean something.`
    : `${card.name}: ${card.summary}`;
  const buttons = (card.examples ?? []).map((text) => {
    const button = Object.assign(document.createElement("button"), { type: "button", textContent: text });
    button.dataset.testid = "example-prompt";
    button.addEventListener("click", () => say(text));
    return button;
  });
  $("examples").replaceChildren(...buttons);
  $("examples").hidden = buttons.length === 0;
}

/** Send `text` as the user's turn, connecting first when idle. */
async function say(text) {
  if (!client) await doConnect();
  if (!client) return; // the connection failed and said why
  try {
    client.sendText(text);
  } catch (err) {
    addError("client", err.message);
  }
}

// ---- latency and stats ------------------------------------------------------------------------

const fmt = (ms) => (ms === null ? "—" : `${Math.round(ms)} ms`);

function renderLatency() {
  demo.latencies = tracker ? tracker.turns : [];
  const rows = demo.latencies.map((t) => {
    const tr = document.createElement("tr");
    tr.append(
      ...[String(t.index), fmt(t.vadToReceivedMs), fmt(t.vadToPlayedMs), fmt(t.micToReceivedMs), fmt(t.micToPlayedMs)].map((text) =>
        Object.assign(document.createElement("td"), { textContent: text }),
      ),
    );
    return tr;
  });
  if (rows.length === 0) {
    const td = Object.assign(document.createElement("td"), { colSpan: 5, className: "empty", textContent: "No turns yet" });
    rows.push(Object.assign(document.createElement("tr"), {}));
    rows[0].append(td);
  }
  $("latency-rows").replaceChildren(...rows.reverse());
  const played = demo.latencies.map((t) => t.micToPlayedMs).filter((v) => v !== null).sort((a, b) => a - b);
  const mid = played.length >> 1;
  const median = played.length % 2 ? played[mid] : (played[mid - 1] + played[mid]) / 2;
  $("latency-summary").textContent = played.length
    ? `median wait heard ${fmt(median)} over ${played.length} turn${played.length > 1 ? "s" : ""}`
    : "";
}

// Whole 20 ms frames; the half-millisecond guard keeps 4109.99 ms and 4110 ms (the same audio seen
// by two counters) from landing on either side of a frame boundary.
const frames20 = (ms) => Math.floor((ms + 0.5) / 20);

async function refreshStats() {
  if (!client) return;
  const s = await client.getStats();
  const rtc = s.transport.inbound;
  const msReceived = rtc ? (rtc.audioMsReceived ?? 0) : s.audioMsReceived;
  // WebRTC: the track carries audio (silence included) all along; concealed samples are at 48 kHz.
  const msPlayed = rtc
    ? (s.transport.playout?.msPlayed ?? msReceived - (rtc.concealedSamples ?? 0) / 48)
    : (s.player?.playedMs ?? 0);
  Object.assign(demo.audio, {
    transport: s.transport.transport,
    framesReceived: frames20(msReceived),
    framesPlayed: frames20(msPlayed),
    msReceived,
    msPlayed,
    msDropped: s.player?.droppedMs ?? 0,
    underruns: s.player?.underruns ?? 0,
    micMsSent: s.audioMsSent,
    micMsDucked: s.audioMsDucked,
    deltasReceived: s.audioDeltasReceived,
    packetsReceived: rtc?.packetsReceived ?? null,
    rttMs: s.transport.rttMs ?? null,
  });
  const a = demo.audio;
  const what = a.transport === "webrtc" ? "Track audio" : "Agent audio";
  const rows = [
    [`${what} received`, `${(a.msReceived / 1000).toFixed(1)} s · ${a.framesReceived} frames`],
    [`${what} played`, `${(a.msPlayed / 1000).toFixed(1)} s · ${a.framesPlayed} frames`],
  ];
  if (a.transport === "websocket") {
    rows.push(["Dropped (buffer cap)", `${Math.round(a.msDropped)} ms`], ["Underruns", String(a.underruns)]);
    rows.push(["Mic sent", `${(a.micMsSent / 1000).toFixed(1)} s`], ["Mic ducked", `${(a.micMsDucked / 1000).toFixed(1)} s`]);
  } else {
    rows.push(["RTP packets", String(a.packetsReceived ?? "—")], ["Round trip", a.rttMs === null ? "—" : fmt(a.rttMs)]);
  }
  showStats(rows);
}

function showStats(rows) {
  $("stats").replaceChildren(
    ...rows.map(([k, v]) => {
      const div = document.createElement("div");
      div.append(Object.assign(document.createElement("dt"), { textContent: k }), Object.assign(document.createElement("dd"), { textContent: v }));
      return div;
    }),
  );
}

// ---- connect / disconnect ---------------------------------------------------------------------

function transportChoice() {
  return document.querySelector("input[name=transport]:checked").value;
}

function iceServers() {
  const raw = $("ice-servers").value.trim();
  return raw ? raw.split(/[\s,]+/).map((urls) => ({ urls })) : [];
}

async function doConnect() {
  if (client || demo.state.status === "connecting") return;
  const session = sessionOrReport();
  if (!session) return;
  demo.state.transport = transportChoice();
  setStatus("connecting");
  tracker = new TurnLatencyTracker({ onUpdate: renderLatency });
  renderLatency(); // a new connection starts a new table
  try {
    try {
      micStream = await getMicrophone();
    } catch (err) {
      micStream = null; // no microphone: the conversation goes on in text
      $("mic-state").textContent = `off: ${err.message}; type your messages`;
    }
    demo.state.microphone = Boolean(micStream);
    updateTalkMode();
    client = await connect({
      url: $("server-url").value.trim() || location.origin,
      transport: demo.state.transport,
      apiKey: $("api-key").value.trim() || undefined,
      iceServers: iceServers(),
      headphones: $("headphones").checked,
      session,
      microphone: micStream ?? false,
      audioElement: $("agent-audio"),
      on: { "*": onEvent },
    });
  } catch (err) {
    addError("connection", err.message, err.code ?? null);
    teardown();
    return;
  }
  demo.client = client;
  demo.state.callId = client.callId;
  addSeparator(demo.state.transport);
  setStatus("connected");
  updateVoicePromptControl();
  statsTimer = setInterval(() => refreshStats().catch((err) => console.warn("stats:", err)), STATS_EVERY_MS);
}

function doDisconnect() {
  client?.close(); // emits client.close, which tears down
  teardown();
}

function teardown() {
  clearInterval(statsTimer);
  statsTimer = null;
  if (client) refreshStats().catch(() => {});
  client = null;
  demo.client = null;
  for (const track of micStream?.getTracks() ?? []) track.stop();
  micStream = null;
  meter.db = -90;
  document.querySelector("[data-testid=mic-level] .meter-fill").style.transform = "scaleX(0)";
  $("mic-db").textContent = "-- dBFS";
  if (demo.state.microphone !== false) $("mic-state").textContent = "off";
  setStatus("idle");
  updateVoicePromptControl();
}

// ---- wiring -----------------------------------------------------------------------------------

const TRANSPORT_HINTS = {
  webrtc: "Opus over WebRTC. The browser cancels the agent's echo, so you can interrupt by speaking.",
  websocket: "PCM over WebSocket. Without headphones the microphone is muted while the agent speaks (browsers do not cancel the echo of this playback).",
};

function onTransportChange() {
  const choice = transportChoice();
  $("transport-hint").textContent = TRANSPORT_HINTS[choice];
  $("headphones-row").hidden = choice !== "websocket";
}

function init() {
  $("server-url").value = location.origin;
  for (const input of document.querySelectorAll("input[name=transport]")) input.addEventListener("change", onTransportChange);
  onTransportChange();
  $("connect").addEventListener("click", doConnect);
  $("disconnect").addEventListener("click", doDisconnect);
  $("mute").addEventListener("click", toggleMute);
  $("interrupt").addEventListener("click", () => client?.interrupt().catch((err) => addError("client", err.message)));
  $("apply").addEventListener("click", applySettings);
  $("turn-detection").addEventListener("change", updateTalkMode);
  $("voice-prompt").addEventListener("change", (e) => e.target.files[0] && loadVoicePrompt(e.target.files[0]));
  $("clear-errors").addEventListener("click", () => {
    demo.errors.length = 0;
    $("errors").replaceChildren();
    $("errors-card").hidden = true;
  });
  $("clear-transcript").addEventListener("click", () => {
    entries.clear();
    demo.transcript.length = 0;
    $("transcript").replaceChildren();
  });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text-input").value.trim();
    if (!text) return;
    $("text-input").value = "";
    say(text);
  });
  $("server-url").addEventListener("change", () => showModel());
  const talk = $("talk");
  talk.addEventListener("pointerdown", () => {
    if (!client) return;
    client.clearInput();
    setMicEnabled(true);
    talk.classList.add("active");
  });
  const release = () => {
    if (!client || !talk.classList.contains("active")) return;
    talk.classList.remove("active");
    setMicEnabled(false);
    client.commit();
    client.createResponse();
  };
  talk.addEventListener("pointerup", release);
  talk.addEventListener("pointerleave", release);
  setStatus("idle");
  renderLatency();
  showStats([["Agent audio", "not connected"]]);
  showModel();
}

init();
