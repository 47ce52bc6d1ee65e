"""Server VAD: detection on real (synthesised) speech, streaming equals offline, parameter mapping."""

from __future__ import annotations

import numpy as np
import pytest

from streaming import audio as A
from streaming import vad as V
from streaming.protocol import TurnDetection
from tests.streaming.helpers import DATA

HELLO, _ = A.read_wav(DATA / "speech_hello_padded.wav")  # speech from 0.6 s to 2.87 s
FRAME = 480  # 20 ms at 24 kHz


def start_stop(events):
    return [e for e in events if isinstance(e, V.SpeechStarted | V.SpeechStopped)]


def with_pause(ms: int, at_s: float = 1.6) -> np.ndarray:
    """HELLO with ``ms`` of digital silence spliced in mid-speech."""
    cut = int(at_s * 24000)
    return np.concatenate([HELLO[:cut], np.zeros(ms * 24, np.int16), HELLO[cut:]])


def test_detects_the_utterance_with_padding_and_silence_window():
    cfg = V.VadConfig()
    started, stopped = start_stop(V.detect_turns(HELLO, cfg))
    assert isinstance(started, V.SpeechStarted) and isinstance(stopped, V.SpeechStopped)
    assert 580 <= started.speech_start_ms <= 680
    assert started.audio_start_ms == started.speech_start_ms - cfg.prefix_padding_ms
    assert 2780 <= stopped.speech_end_ms <= 2960
    assert stopped.audio_end_ms == stopped.speech_end_ms + cfg.silence_duration_ms


def test_a_short_pause_does_not_end_the_turn_but_a_short_window_does():
    # "Hello, what ..." has a comma pause of ~150 ms: one turn at 500 ms, two turns at 100 ms
    assert len(start_stop(V.detect_turns(HELLO, V.VadConfig()))) == 2
    events = V.detect_turns(HELLO, V.VadConfig(silence_duration_ms=100))
    assert len(events) >= 4 and len(events) % 2 == 0


def test_silence_noise_and_clicks_are_not_speech():
    cfg = V.VadConfig()
    assert V.detect_turns(np.zeros(48000, np.int16), cfg) == []
    noise = (np.random.default_rng(0).standard_normal(48000) * 300).astype(np.int16)
    assert V.detect_turns(noise, cfg) == []
    click = np.zeros(48000, np.int16)
    click[24000:25440] = HELLO[24000:25440]  # 60 ms of speech: shorter than min_speech_ms
    assert V.detect_turns(click, cfg) == []


def test_threshold_needs_louder_audio():
    quiet = (HELLO.astype(np.float32) * 0.05).astype(np.int16)  # about -26 dB
    assert V.detect_turns(quiet, V.VadConfig(threshold=0.3))
    assert V.detect_turns(quiet, V.VadConfig(threshold=0.9)) == []
    assert V.detect_turns(HELLO, V.VadConfig(threshold=0.9))
    assert [V.VadConfig(threshold=t).mode for t in (0.0, 0.3, 0.5, 0.8, 1.0)] == [0, 1, 2, 3, 3]


def pushed_in_chunks(cfg: V.VadConfig, audio: np.ndarray, chunk: int) -> tuple[V.TurnDetector, list]:
    """A fresh detector fed ``audio`` ``chunk`` samples at a time, and the events it gave."""
    detector, events = V.TurnDetector(cfg), []
    for i in range(0, len(audio), chunk):
        events += detector.push(audio[i : i + chunk])
    return detector, events


@pytest.mark.parametrize("chunk", [FRAME, 2 * FRAME, 331, 1, 7919])
def test_streaming_equals_offline(chunk):
    cfg = V.VadConfig(silence_duration_ms=300, prefix_padding_ms=200, candidate_ms=100)
    audio = np.concatenate([with_pause(250), HELLO[: 24000 * 2]])  # a second turn that starts and stays open
    offline = V.detect_turns(audio, cfg)
    assert pushed_in_chunks(cfg, audio, chunk)[1] == offline
    assert len(start_stop(offline)) >= 3
    assert any(isinstance(e, V.SpeechResumed) for e in offline)


def test_causal_prefix_events_are_a_prefix():
    cfg = V.VadConfig()
    whole = V.detect_turns(HELLO, cfg)
    half = V.detect_turns(HELLO[: int(1.5 * 24000)], cfg)
    assert half == whole[: len(half)] and len(start_stop(half)) == 1


def test_end_turn_keeps_the_clock():
    cfg = V.VadConfig()
    detector = V.TurnDetector(cfg)
    events = start_stop(detector.push(HELLO[:24000]))
    assert detector.speaking and len(events) == 1
    detector.end_turn()
    assert not detector.speaking
    rest = detector.push(HELLO[24000:])
    # speech is still going on, so a new turn starts right away, on the same clock
    assert isinstance(rest[0], V.SpeechStarted) and rest[0].speech_start_ms > events[0].speech_start_ms + 200
    # decisions trail the audio by the resampler's filter delay, at most a couple of frames
    assert 0 <= len(HELLO) / 24 - detector.decided_ms <= 3 * cfg.frame_ms


def test_a_pause_is_a_candidate_end_then_a_resume():
    cfg = V.VadConfig(candidate_ms=200)
    events = V.detect_turns(with_pause(400), cfg)
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("SpeechStarted") == kinds.count("SpeechStopped") == 1  # 400 ms < the 500 ms window
    i = kinds.index("SpeechPaused")
    paused, resumed = events[i], events[i + 1]
    assert isinstance(resumed, V.SpeechResumed)
    # the spliced silence starts at 1.6 s + the pause in the speech that was already there
    assert 1600 <= paused.speech_end_ms <= 1620 and paused.audio_end_ms - paused.speech_end_ms == 200
    assert 1980 <= resumed.speech_ms <= 2100
    # every candidate ends in exactly one resume or the stop
    for k, e in enumerate(events):
        if isinstance(e, V.SpeechPaused):
            assert isinstance(events[k + 1], V.SpeechResumed | V.SpeechStopped)
    assert isinstance(events[-2], V.SpeechPaused) and isinstance(events[-1], V.SpeechStopped)
    assert events[-2].speech_end_ms == events[-1].speech_end_ms


def test_candidates_off_or_longer_than_the_window_are_not_reported():
    for cfg in (V.VadConfig(candidate_ms=0), V.VadConfig(candidate_ms=500), V.VadConfig(candidate_ms=900)):
        assert V.detect_turns(with_pause(400), cfg) == start_stop(V.detect_turns(with_pause(400), cfg))
    # a candidate that is not a multiple of the frame fires on the frame that fills it
    paused = [e for e in V.detect_turns(HELLO, V.VadConfig(candidate_ms=150)) if isinstance(e, V.SpeechPaused)]
    assert paused and all(e.audio_end_ms - e.speech_end_ms == 160 for e in paused)


def test_turn_detection_mapping():
    td = TurnDetection(type="server_vad", threshold=0.7, prefix_padding_ms=100, silence_duration_ms=900)
    cfg = V.VadConfig.from_turn_detection(td)
    assert (cfg.threshold, cfg.prefix_padding_ms, cfg.silence_duration_ms) == (0.7, 100, 900)
    high = V.VadConfig.from_turn_detection(TurnDetection(type="semantic_vad", eagerness="high"))
    auto = V.VadConfig.from_turn_detection(TurnDetection(type="semantic_vad"))
    low = V.VadConfig.from_turn_detection(TurnDetection(type="semantic_vad", eagerness="low"), "silero")
    assert (high.end_threshold, high.silence_duration_ms, high.max_silence_ms) == (0.95, 600, 2000)
    assert (auto.end_threshold, auto.silence_duration_ms, auto.max_silence_ms) == (0.98, 800, 4000)
    assert (low.end_threshold, low.silence_duration_ms, low.max_silence_ms) == (0.995, 1000, 8000)
    assert (low.classifier, low.frame_ms) == ("silero", V.SILERO_FRAME_MS)
    assert V.VadConfig.from_turn_detection(td).end_threshold is None  # server_vad: no model
    full = V.resolve_turn_detection(TurnDetection(type="server_vad"))
    assert full.model_dump(exclude_none=True) == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": True,
        "interrupt_response": True,
    }
    assert V.resolve_turn_detection(None) is None
    with pytest.raises(ValueError, match="frame_ms"):
        V.VadConfig(frame_ms=15)


def test_input_audio_reports_candidates_on_the_session_clock():
    from streaming.input_audio import InputAudio, TurnEnded, TurnPaused, TurnResumed, TurnStarted

    audio = InputAudio(max_ms=60_000)
    audio.append(np.zeros(24000, np.int16))  # 1 s before VAD is on: the session clock runs on
    audio.set_vad(V.VadConfig())
    signal = with_pause(400)
    turns = []
    for i in range(0, len(signal), FRAME):
        turns += audio.append(signal[i : i + FRAME])
    events = V.detect_turns(signal, V.VadConfig())
    assert [type(t) for t in turns] == [
        {V.SpeechStarted: TurnStarted, V.SpeechPaused: TurnPaused, V.SpeechResumed: TurnResumed,
         V.SpeechStopped: TurnEnded}[type(e)] for e in events
    ]
    assert len({t.item_id for t in turns}) == 1
    for t, e in zip(turns, events, strict=True):
        if isinstance(t, TurnPaused):
            assert t.audio_end_ms == 1000 + e.audio_end_ms
        elif isinstance(t, TurnResumed):
            assert t.speech_ms == 1000 + e.speech_ms
