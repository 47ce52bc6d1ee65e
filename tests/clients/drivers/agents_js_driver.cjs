// Driver: openai-agents-js's RealtimeSession over WebSocket in Node (@openai/agents-realtime).
//
// Its defaults are kept: server-side semantic VAD (the spoken turn's answer is the server's own) and
// input transcription on. The text turn is session.sendMessage(); the interrupt is
// session.interrupt() (response.cancel, then conversation.item.truncate at the time played).
// Errors are the session's 'error' events and what the SDK writes with console.error.
// Usage: node agents_js_driver.cjs NPM_PREFIX WS_URL WAV
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const [prefix, url, wav] = process.argv.slice(2);
const sdk = createRequire(path.join(path.resolve(prefix), 'package.json'))('@openai/agents-realtime');
const RATE = 24000;
const started = Date.now();
const report = {
  errors: [], text_audio_ms: 0, speech_audio_ms: 0, after_interrupt_audio_ms: 0,
  interrupted: false, after_ack_audio_ms: null, transcripts: [], notes: {},
};

function emit() {
  report.wall_s = (Date.now() - started) / 1000;
  process.stdout.write('REPORT ' + JSON.stringify(report) + '\n', () => process.exit(0));
}

function speech(file) {  // pcm16 mono 24 kHz samples of a WAV file's data chunk
  const buf = fs.readFileSync(file);
  let at = 12;
  while (at + 8 <= buf.length) {
    const id = buf.toString('ascii', at, at + 4);
    const size = buf.readUInt32LE(at + 4);
    if (id === 'fmt ' && buf.readUInt32LE(at + 12) !== RATE) throw new Error(`${file}: not ${RATE} Hz`);
    if (id === 'data') return buf.subarray(at + 8, at + 8 + size);
    at += 8 + size + (size % 2);
  }
  throw new Error(`${file}: no data chunk`);
}

function waitFor(check, what, ms = 30000) {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const timer = setInterval(() => {
      if (check()) { clearInterval(timer); resolve(); } else if (Date.now() - t0 > ms) {
        clearInterval(timer); reject(new Error(`timed out waiting for ${what}`));
      }
    }, 10);
  });
}

async function main() {
  const consoleError = console.error;
  console.error = (...args) => { report.errors.push('console.error: ' + args.map(String).join(' ')); consoleError(...args); };
  const agent = new sdk.RealtimeAgent({ name: 'Assistant', instructions: 'Answer briefly.' });
  const session = new sdk.RealtimeSession(agent, { transport: 'websocket', model: 'mimo-audio' });
  let phase = 'text';
  let acked = false;
  const done = [];
  session.on('error', (e) => report.errors.push('error event: ' + JSON.stringify(e.error?.error ?? e.error ?? e)));
  session.on('audio', (event) => {
    const ms = event.data.byteLength / 2 / RATE * 1000;
    if (phase === 'text') report.text_audio_ms += ms;
    else if (report.interrupted) {
      report.after_interrupt_audio_ms += ms;
      if (acked) report.after_ack_audio_ms += ms;  // the server had acknowledged the interrupt
    }
    else report.speech_audio_ms += ms;
  });
  session.on('transport_event', (event) => {
    if (event.type === 'conversation.item.input_audio_transcription.completed') report.transcripts.push(event.transcript);
    if (event.type === 'response.done') done.push(event.response.status);
    if (event.type === 'conversation.item.truncated' && report.interrupted) acked = true;
  });
  await session.connect({ apiKey: 'sk-clients', url: `${url}?model=mimo-audio` });

  session.sendMessage('Hello!');  // text turn
  await waitFor(() => done.length === 1, 'the text turn');
  report.notes.text_status = done[0];

  phase = 'speech';  // spoken turn: the server's VAD ends it and answers
  const pcm = speech(wav);
  for (let i = 0; i < pcm.length; i += 2 * RATE / 10) {
    const piece = pcm.subarray(i, i + 2 * RATE / 10);
    session.sendAudio(piece.buffer.slice(piece.byteOffset, piece.byteOffset + piece.byteLength));
  }
  await waitFor(() => report.speech_audio_ms >= 400, '400 ms of the spoken turn\'s answer');
  report.interrupted = true;
  report.after_ack_audio_ms = 0;
  session.interrupt();
  await waitFor(() => done.length === 2, 'the interrupted response to end');
  report.notes.status = done[1];
  await waitFor(() => report.transcripts.length > 0, 'the input transcript');
  session.close();
}

const deadline = setTimeout(() => { report.errors.push('driver: timed out'); emit(); }, 150000);
main().then(() => { clearTimeout(deadline); emit(); }, (err) => {
  report.errors.push(`driver: ${err && err.stack || err}`);
  clearTimeout(deadline);
  emit();
});
