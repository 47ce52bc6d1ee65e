"""Driver: this project's Python SDK as the ``mimo-realtime-client`` distribution installed on its
own (``mimo_realtime.client``; no server, no torch). Usage: python mimo_sdk.py WS_URL WAV"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import sys

from mimo_realtime.client import connect
from report import INTERRUPT_AT_MS, RATE, Report, audio_ms, run, speech


async def scenario(report: Report) -> None:
    url, wav = sys.argv[1], sys.argv[2]
    turn_detection_off = {"input": {"turn_detection": None, "transcription": {"model": "whisper-1"}}}
    async with connect(url, api_key="sk-clients", model="mimo-audio", audio=turn_detection_off) as client:
        client.on("error", lambda e: report.errors.append(f"{e.error.code}: {e.error.message}"))
        client.on("conversation.item.input_audio_transcription.completed",
                  lambda e: report.transcripts.append(e.transcript))

        await client.send_text("Hello!")
        await client.create_response()
        text = await client.collect_response(timeout=60)
        report.text_audio_ms = text.audio_ms
        report.notes["text_status"] = text.status

        await client.send_audio(speech(wav), sample_rate=RATE)
        await client.commit()
        first = client.wait_for("response.created")
        await client.create_response()
        response_id = (await asyncio.wait_for(first, 30)).response.id
        received = [0.0]  # ms of this response's audio so far
        enough = asyncio.Event()
        truncated = client.wait_for("conversation.item.truncated")

        def on_audio(event) -> None:
            if event.response_id == response_id:
                ms = audio_ms(len(base64.b64decode(event.delta)))
                received[0] += ms
                if truncated.done():  # the server had acknowledged the interrupt
                    report.after_ack_audio_ms += ms
                if received[0] >= INTERRUPT_AT_MS:
                    enough.set()

        client.on("response.output_audio.delta", on_audio)
        await asyncio.wait_for(enough.wait(), 60)
        report.speech_audio_ms, report.interrupted, report.after_ack_audio_ms = received[0], True, 0.0
        await client.interrupt()
        result = await client.collect_response(response_id, timeout=60)
        report.after_interrupt_audio_ms = result.audio_ms - report.speech_audio_ms
        report.notes["status"] = result.status
        report.notes["truncated_ms"] = (await asyncio.wait_for(truncated, 30)).audio_end_ms
        await report.transcript()
        report.notes["torch_importable"] = importlib.util.find_spec("torch") is not None


if __name__ == "__main__":
    run(scenario)
