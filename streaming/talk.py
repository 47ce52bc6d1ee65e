"""``mimo-agent talk``: talk to a realtime server through this machine's microphone and speaker.

Server VAD decides the turns; when it hears you start speaking, playback stops at once and the
assistant's item is truncated at what you actually heard. Use headphones: without echo
cancellation the assistant hears itself and interrupts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from typing import Any

import numpy as np

from streaming.audio import SAMPLE_RATE, PcmBuffer, StreamResampler, b64decode_audio, pcm16_from_bytes
from streaming.client import RealtimeClient, connect

PLAYBACK_BUFFER_S = 60  # assistant audio queued for the speaker; the oldest is dropped beyond it
MIC_QUEUE_BLOCKS = 200  # microphone blocks waiting to be sent; the oldest are dropped beyond it


class TalkError(RuntimeError):
    pass


def import_sounddevice() -> Any:
    """sounddevice, imported only here (it loads PortAudio), with a clear error when missing."""
    try:
        import sounddevice
    except ImportError:
        raise TalkError("the sounddevice package is missing: pip install sounddevice") from None
    except OSError as exc:  # sounddevice raises OSError when the PortAudio library is not found
        raise TalkError(
            f"the PortAudio library is missing ({exc}); install it with your package manager, "
            "e.g. `apt-get install libportaudio2` or `brew install portaudio`"
        ) from None
    return sounddevice


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/realtime",
                        help="the server: its realtime WebSocket URL, or its origin (http://HOST:PORT)")
    parser.add_argument("--api-key", default=os.environ.get("MIMO_AGENT_API_KEY"),
                        help="the server's API key, sent as a Bearer header (default: $MIMO_AGENT_API_KEY; none)")
    parser.add_argument("--model", default=None, help="the ?model= query parameter (default: none, the server's)")
    parser.add_argument("--instructions", default=None,
                        help="system instructions for the session (default: the server's)")
    parser.add_argument("--voice", default=None,
                        help="audio.output.voice to ask for; MiMo accepts it but speaks in its own voice "
                             "(default: none)")
    parser.add_argument("--vad-threshold", type=float, default=0.5, help="server VAD threshold, 0..1")
    parser.add_argument("--silence-ms", type=int, default=500, help="silence that ends your turn, in ms")
    parser.add_argument("--input-device", default=None,
                        help="microphone: a sounddevice device name or index (default: the system's default input)")
    parser.add_argument("--output-device", default=None,
                        help="speaker: a sounddevice device name or index (default: the system's default output)")
    parser.add_argument("--block-ms", type=int, default=20, help="audio block size, in ms")


def session_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The session.update this command sends: pcm16 24 kHz both ways, server VAD with barge-in."""
    turn = {
        "type": "server_vad",
        "threshold": args.vad_threshold,
        "silence_duration_ms": args.silence_ms,
        "create_response": True,
        "interrupt_response": True,
    }
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    output: dict[str, Any] = {"format": pcm}
    if args.voice:
        output["voice"] = args.voice
    fields: dict[str, Any] = {
        "output_modalities": ["audio"],
        "audio": {"input": {"format": pcm, "turn_detection": turn}, "output": output},
    }
    if args.instructions:
        fields["instructions"] = args.instructions
    return fields


class Speaker:
    """Assistant audio on its way to the sound card (filled by the event loop, drained by the
    PortAudio thread), and how much of the current item has been played."""

    def __init__(self, device_rate: int) -> None:
        self._lock = threading.Lock()
        self._buffer = PcmBuffer(PLAYBACK_BUFFER_S * device_rate)
        self._resampler = StreamResampler(SAMPLE_RATE, device_rate)
        self.device_rate = device_rate
        self.item_id: str | None = None
        self._interrupted: set[str] = set()  # items cut off: their late deltas are not played
        self._queued = 0  # device samples of the current item written
        self._played = 0  # ... and played

    def feed(self, item_id: str, pcm24: np.ndarray) -> None:
        if item_id in self._interrupted:
            return
        pcm = self._resampler.process(pcm24)
        with self._lock:
            if item_id != self.item_id:
                self.item_id, self._queued, self._played = item_id, 0, 0
            self._buffer.write(pcm)
            self._queued += len(pcm)

    def fill(self, out: np.ndarray) -> None:
        """PortAudio callback side: ``out`` is (frames, 1) int16."""
        with self._lock:
            pcm = self._buffer.read(len(out))
            self._played += len(pcm)
        out[: len(pcm), 0] = pcm
        out[len(pcm) :, 0] = 0

    def stop(self) -> tuple[str | None, int]:
        """Drop everything queued; returns (item id, ms of it that were played)."""
        with self._lock:
            self._buffer.clear()
            played_ms = self._played * 1000 // self.device_rate
            item, self.item_id = self.item_id, None
        if item is not None:
            self._interrupted.add(item)
        self._resampler.reset()
        return item, played_ms


def device_rate(sd: Any, device: str | None, kind: str) -> int:
    """The sample rate of the ``kind`` ("input" or "output") device, or a :class:`TalkError`
    saying which device is missing and which ones there are."""
    what = "microphone" if kind == "input" else "speaker"
    option = f"--{kind}-device"
    if device is not None and device.isdigit():
        device = int(device)
    try:
        return int(sd.query_devices(device, kind)["default_samplerate"])
    except (sd.PortAudioError, ValueError) as exc:
        try:
            names = [f"{i}: {d['name']}" for i, d in enumerate(sd.query_devices()) if d[f"max_{kind}_channels"] > 0]
        except sd.PortAudioError:
            names = []
        found = f"the {kind} devices are {'; '.join(names)}" if names else f"PortAudio finds no {kind} device"
        wanted = f"no {kind} device {device!r}" if device is not None else f"no default {what}"
        raise TalkError(f"{wanted} ({exc}); {found}. Plug one in, or choose one with {option} NAME|INDEX "
                        "(`python3 -m sounddevice` lists them)") from None


async def talk(args: argparse.Namespace, sd: Any) -> None:
    loop = asyncio.get_running_loop()
    in_rate = device_rate(sd, args.input_device, "input")
    out_rate = device_rate(sd, args.output_device, "output")
    speaker = Speaker(out_rate)
    mic: asyncio.Queue[np.ndarray] = asyncio.Queue(MIC_QUEUE_BLOCKS)

    def on_mic(indata: np.ndarray, frames: int, when: Any, status: Any) -> None:
        block = indata[:, 0].copy()

        def put() -> None:
            if mic.full():
                mic.get_nowait()  # the network fell behind: drop the oldest block
            mic.put_nowait(block)

        loop.call_soon_threadsafe(put)

    def on_speaker(outdata: np.ndarray, frames: int, when: Any, status: Any) -> None:
        speaker.fill(outdata)

    client: RealtimeClient = await connect(
        args.url, api_key=args.api_key, model=args.model, **session_fields(args)
    )

    async def on_audio(event: Any) -> None:
        speaker.feed(event.item_id, pcm16_from_bytes(b64decode_audio(event.delta)))

    async def on_speech(event: Any) -> None:
        item_id, played_ms = speaker.stop()
        print("\n[you]", flush=True)
        if item_id is not None:
            await client.interrupt(audio_end_ms=played_ms)

    client.on("response.output_audio.delta", on_audio)
    client.on("input_audio_buffer.speech_started", on_speech)
    client.on("response.output_audio_transcript.delta", lambda e: print(e.delta, end="", flush=True))
    client.on("response.created", lambda e: print("\n[assistant] ", end="", flush=True))
    client.on("error", lambda e: print(f"\n[error] {e.error.code}: {e.error.message}", file=sys.stderr))

    block_in = in_rate * args.block_ms // 1000
    block_out = out_rate * args.block_ms // 1000
    with (
        sd.InputStream(
            samplerate=in_rate,
            channels=1,
            dtype="int16",
            blocksize=block_in,
            device=args.input_device,
            callback=on_mic,
        ),
        sd.OutputStream(
            samplerate=out_rate,
            channels=1,
            dtype="int16",
            blocksize=block_out,
            device=args.output_device,
            callback=on_speaker,
        ),
    ):
        print(f"connected to {args.url}: speak (Ctrl-C to quit)", flush=True)
        try:
            while not client.closed:
                block = await mic.get()
                await client.send_audio(block, sample_rate=in_rate, chunk_ms=args.block_ms)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


def run(args: argparse.Namespace) -> int:
    try:
        sd = import_sounddevice()
    except TalkError as exc:
        print(f"mimo-agent talk: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(talk(args, sd))
    except KeyboardInterrupt:
        return 0
    except (TalkError, OSError, RuntimeError, sd.PortAudioError) as exc:  # PortAudio: a device that fails to open
        print(f"mimo-agent talk: {exc}", file=sys.stderr)
        return 1
    return 0
