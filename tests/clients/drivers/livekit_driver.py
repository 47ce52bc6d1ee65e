"""Driver: LiveKit Agents' OpenAI realtime plugin (``livekit.plugins.openai.realtime.RealtimeModel``
with ``base_url``), its ``RealtimeSession`` used directly, without a LiveKit room.

The calls are the ones ``AgentSession`` makes: ``update_chat_ctx`` with the user's message (in a
fresh session this inserts at ``previous_item_id: "root"``) and ``generate_reply`` for the text turn;
``push_audio`` / ``commit_audio`` / ``generate_reply`` for the spoken turn; ``interrupt()`` then
``truncate(audio_end_ms=...)`` for a barge-in. Errors are the session's ``error`` events and what
LiveKit logs at ERROR. Usage: python livekit_driver.py WS_URL WAV"""

from __future__ import annotations

import logging
import sys

from livekit import rtc
from livekit.plugins.openai.realtime import RealtimeModel
from openai.types.realtime import AudioTranscription
from report import INTERRUPT_AT_MS, RATE, Report, audio_ms, chunks, http_base, run, speech


class Logged(logging.Handler):
    """LiveKit's warnings and errors: a refused request only shows as a warning (e.g. "rejected part
    of a chat context update"), so the test sees both."""

    def __init__(self, report: Report) -> None:
        super().__init__(logging.WARNING)
        self.report = report
        report.notes["warnings"] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage()} {getattr(record, 'errors', '')}".strip()
        (self.report.errors if record.levelno >= logging.ERROR else self.report.notes["warnings"]).append(line)


async def scenario(report: Report) -> None:
    url, wav = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger().addHandler(Logged(report))
    model = RealtimeModel(model="mimo-audio", base_url=http_base(url), api_key="sk-clients", modalities=["audio"],
                          input_audio_transcription=AudioTranscription(model="whisper-1"), turn_detection=None)
    session = model.session()
    session.on("error", lambda ev: report.errors.append(f"error event: {ev.error}"))
    session.on("input_audio_transcription_completed", lambda ev: report.transcripts.append(ev.transcript))
    try:
        # text turn, as AgentSession.generate_reply(user_input=...) does it
        chat_ctx = session.chat_ctx.copy()
        chat_ctx.add_message(role="user", content="Hello!")
        await session.update_chat_ctx(chat_ctx)
        generation = await session.generate_reply()
        async for message in generation.message_stream:
            async for frame in message.audio_stream:
                report.text_audio_ms += audio_ms(len(frame.data.tobytes()), frame.sample_rate)

        # spoken turn, interrupted (interrupt + truncate, as AgentSession on a barge-in) at 400 ms
        for piece in chunks(speech(wav), 20):
            session.push_audio(rtc.AudioFrame(data=piece, sample_rate=RATE, num_channels=1,
                                              samples_per_channel=len(piece) // 2))
        session.commit_audio()
        generation = await session.generate_reply()
        async for message in generation.message_stream:
            async for frame in message.audio_stream:
                ms = audio_ms(len(frame.data.tobytes()), frame.sample_rate)
                if report.interrupted:
                    report.after_interrupt_audio_ms += ms
                    continue
                report.speech_audio_ms += ms
                if report.speech_audio_ms >= INTERRUPT_AT_MS:
                    report.interrupted = True
                    session.interrupt()
                    session.truncate(message_id=message.message_id, modalities=["audio"],
                                     audio_end_ms=int(report.speech_audio_ms))
        await report.transcript()
        report.notes["remote_items"] = len(session.chat_ctx.items)
    finally:
        await session.aclose()
        await model.aclose()


if __name__ == "__main__":
    run(scenario)
