"""Driver: Pipecat's OpenAI Realtime service (``OpenAIRealtimeLLMService``) in a Pipecat pipeline.

Turns are driven locally (``turn_detection=False``), as with Pipecat's local VAD: the pipeline gets
``UserStartedSpeakingFrame``, the user's ``InputAudioRawFrame``s and ``UserStoppedSpeakingFrame``
(the service commits and creates a response), and the interrupt is Pipecat's own
``InterruptionFrame`` (the service clears the input, cancels, truncates). The text turn is an
``LLMContextFrame`` holding a user message. Errors are what Pipecat logs at ERROR and the
``ErrorFrame``s it pushes. Usage: python pipecat_driver.py WS_URL WAV"""

from __future__ import annotations

import asyncio
import sys

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from report import INTERRUPT_AT_MS, RATE, Report, audio_ms, chunks, run, speech


class Service(OpenAIRealtimeLLMService):
    """Pipecat's service as is; ``response.done`` is also noted for the driver to pace the turns."""

    def __init__(self, done: asyncio.Queue, **kwargs) -> None:
        super().__init__(**kwargs)
        self.done = done

    async def _handle_evt_response_done(self, evt):
        await super()._handle_evt_response_done(evt)
        self.done.put_nowait(evt.response.status)


class Recorder(FrameProcessor):
    """Sees every frame the service pushes (audio downstream, transcripts and errors upstream)."""

    def __init__(self, report: Report, turn: list[str], after_service: bool) -> None:
        super().__init__()
        self.report, self.turn, self.after_service = report, turn, after_service
        self.got_audio = asyncio.Event()

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        r = self.report
        if isinstance(frame, TTSAudioRawFrame):
            ms = audio_ms(len(frame.audio), frame.sample_rate)
            if self.turn[0] == "text":
                r.text_audio_ms += ms
            elif r.interrupted:
                r.after_interrupt_audio_ms += ms
            else:
                r.speech_audio_ms += ms
                if r.speech_audio_ms >= INTERRUPT_AT_MS:
                    self.got_audio.set()
        elif isinstance(frame, InterruptionFrame) and self.after_service and self.turn[0] == "speech":
            r.interrupted = True
        elif isinstance(frame, TranscriptionFrame):
            r.transcripts.append(frame.text)
        elif isinstance(frame, ErrorFrame):
            r.errors.append(f"ErrorFrame: {frame.error}")
        await self.push_frame(frame, direction)


async def scenario(report: Report) -> None:
    url, wav = sys.argv[1], sys.argv[2]
    logger.add(lambda m: report.errors.append(m.record["message"]), level="ERROR")
    done: asyncio.Queue[str] = asyncio.Queue()
    turn = ["text"]
    properties = events.SessionProperties(
        output_modalities=["audio"],
        audio=events.AudioConfiguration(
            input=events.AudioInput(transcription=events.InputAudioTranscription(), turn_detection=False)))
    llm = Service(done, api_key="sk-clients", base_url=url,
                  settings=OpenAIRealtimeLLMService.Settings(model="mimo-audio", session_properties=properties))
    upstream, downstream = Recorder(report, turn, False), Recorder(report, turn, True)
    worker = PipelineWorker(Pipeline([upstream, llm, downstream]), idle_timeout_secs=None,
                            params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))
    runner = asyncio.create_task(PipelineRunner(handle_sigint=False).run(worker))

    # text turn: the first context, with the user's message, starts a response
    await worker.queue_frame(LLMContextFrame(LLMContext(messages=[{"role": "user", "content": "Hello!"}])))
    report.notes["text_status"] = await asyncio.wait_for(done.get(), 60)

    # spoken turn, then Pipecat's interrupt once 400 ms of the answer arrived
    turn[0] = "speech"
    await worker.queue_frame(UserStartedSpeakingFrame())
    for piece in chunks(speech(wav), 20):
        await worker.queue_frame(InputAudioRawFrame(audio=piece, sample_rate=RATE, num_channels=1))
    await worker.queue_frame(UserStoppedSpeakingFrame())
    await asyncio.wait_for(downstream.got_audio.wait(), 60)
    await worker.queue_frame(InterruptionFrame())
    report.notes["status"] = await asyncio.wait_for(done.get(), 60)
    await report.transcript()
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(runner, 30)


if __name__ == "__main__":
    run(scenario)
