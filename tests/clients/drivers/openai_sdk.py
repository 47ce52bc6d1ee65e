"""Driver: the official ``openai`` SDK's realtime client (``client.realtime.connect``).

The SDK is a transport with typed events and no playback or interrupt logic of its own, so the
interrupt is what an app on it does: ``response.cancel``, then ``conversation.item.truncate`` at the
audio received so far. Usage: python openai_sdk.py WS_URL WAV"""

from __future__ import annotations

import asyncio
import base64
import sys
import time

from openai import AsyncOpenAI
from report import INTERRUPT_AT_MS, Report, audio_ms, chunks, http_base, run, speech

API_KEY = "sk-clients"


async def scenario(report: Report) -> None:
    url, wav = sys.argv[1], sys.argv[2]
    client = AsyncOpenAI(api_key=API_KEY, base_url=http_base(url))
    seen: set[str] = set()
    async with client.realtime.connect(model="mimo-audio") as conn:

        async def next_event(*types: str):
            async for event in conn:
                print(f"{time.monotonic():.3f} {event.type}", file=sys.stderr, flush=True)
                seen.add(event.type)
                if event.type == "error":
                    report.errors.append(f"{event.error.code}: {event.error.message}")
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    report.transcripts.append(event.transcript)
                if event.type in types:
                    return event
            raise RuntimeError("connection closed")

        await conn.session.update(session={
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
                          "transcription": {"model": "whisper-1"}},
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
            },
        })
        await next_event("session.updated")

        # text turn
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]})
        await conn.response.create()
        while (event := await next_event("response.output_audio.delta", "response.done")).type != "response.done":
            report.text_audio_ms += audio_ms(len(base64.b64decode(event.delta)))

        # spoken turn, interrupted once 400 ms of its answer arrived
        for piece in chunks(speech(wav)):
            await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        item_id = None
        while True:
            event = await next_event("response.output_audio.delta", "response.done")
            if event.type == "response.done":
                break
            ms = audio_ms(len(base64.b64decode(event.delta)))
            if report.interrupted:
                report.after_interrupt_audio_ms += ms
                if "conversation.item.truncated" in seen:
                    report.after_ack_audio_ms += ms
                continue
            report.speech_audio_ms += ms
            item_id = event.item_id
            if report.speech_audio_ms >= INTERRUPT_AT_MS:
                report.interrupted, report.after_ack_audio_ms = True, 0.0
                await conn.response.cancel()
                await conn.conversation.item.truncate(item_id=item_id, content_index=0,
                                                      audio_end_ms=int(report.speech_audio_ms))
        report.notes["status"] = event.response.status
        if "conversation.item.truncated" not in seen:
            await next_event("conversation.item.truncated")
        if not report.transcripts:
            await asyncio.wait_for(next_event("conversation.item.input_audio_transcription.completed"), 30)


if __name__ == "__main__":
    run(scenario)
