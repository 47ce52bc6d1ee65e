"""End of turn on real recorded speech: Smart Turn v3.2 (our features against the model's reference
preprocessing, run in Pipecat's own environment), how the model file is fetched and found,
semantic_vad's early release and hold, Silero VAD frames, and a session refusing semantic_vad
without a model."""

from __future__ import annotations

import json
import subprocess
import zipfile

import numpy as np
import pytest

from streaming import audio as A
from streaming import turn_model as M
from streaming import vad as V
from streaming.bench.turns import room_tone
from streaming.protocol import TurnDetection
from tests.clients.harness import client_env
from tests.streaming.helpers import DATA
from tests.streaming.test_vad import pushed_in_chunks

EN_W, _ = A.read_wav(DATA / "real_speech_en_w.wav")  # speech 0.42 .. 3.02 s, ends low-scored at 200 ms
EN_M, _ = A.read_wav(DATA / "real_speech_en_m.wav")  # speech 0.10 .. 4.22 s, ends high-scored
HELLO, _ = A.read_wav(DATA / "speech_hello_padded.wav")
AUTO = TurnDetection(type="semantic_vad")

REFERENCE = """
import json, sys
import numpy as np
from pipecat.audio.turn.smart_turn._whisper_features import compute_whisper_log_mel_features
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
analyzer = LocalSmartTurnAnalyzerV3(sample_rate=16000)
out = {}
for name in sys.argv[2:]:
    x = np.load(f"{sys.argv[1]}/{name}.npy")
    window = np.pad(x[-128000:], (max(0, 128000 - len(x)), 0))  # its analyzer's last 8 s, padded in front
    np.save(f"{sys.argv[1]}/{name}.features.npy", compute_whisper_log_mel_features(window))
    out[name] = analyzer._predict_endpoint(x)["probability"]
print("REPORT " + json.dumps(out))
"""


def to16k(pcm: np.ndarray) -> np.ndarray:
    return A.resample(pcm, 24000, 16000).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def model() -> M.SmartTurn:
    return M.shared_model()  # fetched by tests/conftest.py when missing


def test_features_and_probabilities_match_the_reference_preprocessing(tmp_path, model) -> None:
    env = client_env("pipecat", "bin/python")
    inputs = {
        "en_w": to16k(EN_W),  # 3.3 s: padded in front
        "en_m_cut": to16k(EN_M[: 2 * 24000]),  # mid-sentence
        "long": to16k(np.concatenate([EN_M, EN_W, EN_M])),  # 12 s: only the last 8 s count
    }
    for name, x in inputs.items():
        np.save(tmp_path / f"{name}.npy", x)
    done = subprocess.run([str(env / "bin" / "python"), "-c", REFERENCE, str(tmp_path), *inputs],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    reference = json.loads(lines[-1].removeprefix("REPORT "))
    for name, x in inputs.items():
        ours = M.whisper_features(x)
        theirs = np.load(tmp_path / f"{name}.features.npy")
        assert ours.shape == theirs.shape == (80, 800)
        assert np.abs(ours - theirs).max() < 1e-5, name
        assert model.probability(x) == pytest.approx(reference[name], abs=1e-5), name


def test_fetch_extracts_the_model_from_the_wheel_and_checks_it(tmp_path) -> None:
    path = M.fetch_model(tmp_path / "cache", wheel_dir=None)
    assert path.name == M.MODEL_NAME and M._sha256(path) == M.MODEL_SHA256
    assert M.fetch_model(tmp_path / "cache") == path  # kept: no second download
    fake = tmp_path / "wheels"
    fake.mkdir()
    with zipfile.ZipFile(fake / "pipecat_ai-1.14.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(M.MODEL_IN_WHEEL, b"not the model")
    with pytest.raises(M.TurnModelMissing, match="sha256"):
        M.fetch_model(tmp_path / "other", wheel_dir=fake)
    assert not (tmp_path / "other" / M.MODEL_NAME).exists()


def test_a_missing_model_names_the_command_that_fetches_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MIMO_AGENT_CACHE", str(tmp_path))
    monkeypatch.delenv(M.ENV_MODEL, raising=False)
    monkeypatch.setattr(M, "_in_pipecat", lambda: None)
    with pytest.raises(M.TurnModelMissing, match="mimo-agent fetch-turn-model"):
        M.find_model()
    with pytest.raises(M.TurnModelMissing, match="no such file"):
        M.find_model(tmp_path / "nope.onnx")


def hold(pcm: np.ndarray, at_ms: int, ms: int, tail_ms: int = 3000) -> np.ndarray:
    cut = at_ms * 24
    return np.concatenate([pcm[:cut], room_tone(pcm, ms), pcm[cut:], room_tone(pcm, tail_ms)])


def stops(events: list) -> list[V.SpeechStopped]:
    return [e for e in events if isinstance(e, V.SpeechStopped)]


def test_semantic_vad_ends_a_confident_turn_at_the_candidate(model) -> None:
    cfg = V.VadConfig.from_turn_detection(AUTO)
    detector = V.TurnDetector(cfg)
    (stop,) = stops(detector.push(np.concatenate([EN_M, room_tone(EN_M, 3000)])))
    assert stop.audio_end_ms - stop.speech_end_ms == cfg.candidate_ms  # released after 200 ms, not 800
    ((at, score),) = detector.scores
    assert at == stop.audio_end_ms and score >= cfg.end_threshold
    # a low score waits for the silence window
    detector = V.TurnDetector(cfg)
    (stop,) = stops(detector.push(np.concatenate([EN_W, room_tone(EN_W, 3000)])))
    assert stop.audio_end_ms - stop.speech_end_ms == cfg.silence_duration_ms
    assert detector.scores[0][1] < cfg.end_threshold


def test_semantic_vad_holds_through_a_mid_sentence_pause_that_server_vad_cuts(model) -> None:
    audio = hold(EN_W, 2410, 500)  # between two words, mid-sentence
    assert len(stops(V.detect_turns(audio, V.VadConfig()))) == 2  # 500 ms window: a false cut-in
    events = V.detect_turns(audio, V.VadConfig.from_turn_detection(AUTO))
    assert len(stops(events)) == 1
    resumed = [e for e in events if isinstance(e, V.SpeechResumed)]
    assert len(resumed) == 1 and 2900 <= resumed[0].speech_ms <= 3100  # the candidate, then speech again


@pytest.mark.parametrize("chunk", [480, 331, 7919])
def test_semantic_vad_streaming_equals_offline(chunk, model) -> None:
    cfg = dataclass_replace(V.VadConfig.from_turn_detection(AUTO), rescore_ms=200, silence_duration_ms=1000)
    audio = hold(EN_W, 2410, 500)
    detector, streamed = pushed_in_chunks(cfg, audio, chunk)
    assert streamed == V.detect_turns(audio, cfg) and len(detector.scores) >= 3


@pytest.mark.parametrize("late", [0, 1, 25])
def test_deferred_scores_give_the_inline_events_however_late_they_come(late, model) -> None:
    """A detector that asks for its scores (the server's) and gets each answer ``late`` pushes of
    20 ms later decides every frame as the inline one does: the same events, only later."""
    cfg = dataclass_replace(V.VadConfig.from_turn_detection(AUTO), rescore_ms=200, silence_duration_ms=1000)
    audio = np.concatenate([hold(EN_W, 2410, 500), EN_M, room_tone(EN_M, 1500)])
    detector, events, asked = V.TurnDetector(cfg, defer_scores=True), [], []

    def take(i: int, new: list) -> None:
        for event in new:
            (asked if isinstance(event, V.ScoreNeeded) else events).append((i, event))
    for i in range(0, len(audio) + 480 * 2 * late, 480):
        take(i, detector.push(audio[i : i + 480]))
        if asked and asked[0][0] <= i - 480 * late:
            (_, request), *asked = asked
            take(i, detector.scored(request.request_id, model.probability(request.audio16k)))
    offline = V.detect_turns(audio, cfg)
    assert [e for _, e in events] == offline and len(stops(offline)) == 2
    assert detector.waiting is None and len(detector.scores) >= 3


def test_a_falling_threshold_ends_the_turn_at_the_rescore_that_reaches_it(model) -> None:
    cfg = dataclass_replace(V.VadConfig.from_turn_detection(AUTO), rescore_ms=100, end_threshold_slope=2.0)
    detector = V.TurnDetector(cfg)
    detector.scorer = lambda audio: 0.9  # below 0.98 at 200 ms; 0.87 is needed at 300 ms
    (stop,) = stops(detector.push(np.concatenate([EN_M, room_tone(EN_M, 3000)])))
    assert stop.audio_end_ms - stop.speech_end_ms == 300 and [s for _, s in detector.scores] == [0.9, 0.9]


def dataclass_replace(cfg: V.VadConfig, **changes) -> V.VadConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_semantic_vad_waits_the_maximum_when_the_model_is_sure_the_turn_goes_on(model) -> None:
    cfg = dataclass_replace(V.VadConfig.from_turn_detection(AUTO), unsure_below=0.1)
    audio = hold(EN_W, 2410, 1500, tail_ms=6000)  # a long pause after a low score: 4 s apply, not 800 ms
    assert len(stops(V.detect_turns(audio, cfg))) == 1
    assert len(stops(V.detect_turns(audio, V.VadConfig.from_turn_detection(AUTO)))) == 2


# ------------------------------------------------------------------------------------- Silero VAD
SILERO = V.VadConfig(classifier="silero", frame_ms=V.SILERO_FRAME_MS)


def test_silero_finds_real_and_synthetic_speech_and_not_noise() -> None:
    started, stopped = stops_and_starts(V.detect_turns(np.concatenate([EN_W, room_tone(EN_W, 1000)]), SILERO))
    assert 300 <= started.speech_start_ms <= 700 and 2900 <= stopped.speech_end_ms <= 3150
    started, stopped = stops_and_starts(V.detect_turns(HELLO, SILERO))
    assert 560 <= started.speech_start_ms <= 700 and 2780 <= stopped.speech_end_ms <= 2990
    noise = (np.random.default_rng(0).standard_normal(48000) * 300).astype(np.int16)
    assert V.detect_turns(noise, SILERO) == [] and V.detect_turns(np.zeros(48000, np.int16), SILERO) == []


def stops_and_starts(events: list) -> list:
    return [e for e in events if isinstance(e, V.SpeechStarted | V.SpeechStopped)]


@pytest.mark.parametrize("chunk", [480, 1, 7919])
def test_silero_streaming_equals_offline(chunk) -> None:
    audio = hold(EN_W, 2410, 400)
    offline = V.detect_turns(audio, SILERO)
    assert pushed_in_chunks(SILERO, audio, chunk)[1] == offline and len(stops_and_starts(offline)) >= 2


def test_silero_frames_are_32_ms() -> None:
    with pytest.raises(ValueError, match="32"):
        V.VadConfig(classifier="silero")


# ---------------------------------------------------------------------------------------- session
def session_with(turn_model: str | None, turn_detection: dict, mimo: dict | None = None, **options):
    from streaming.session import RealtimeSession, SessionOptions

    s = RealtimeSession(SessionOptions(turn_model=turn_model, **options))
    s.start(None)
    s.take_events()
    session = {"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}}
    if mimo:
        session["mimo"] = mimo
    s.receive(json.dumps({"type": "session.update", "session": session}))
    return s, s.take_events()


def test_a_session_without_the_model_refuses_semantic_vad_and_keeps_its_settings(tmp_path) -> None:
    s, events = session_with(str(tmp_path / "missing.onnx"), {"type": "semantic_vad", "eagerness": "high"})
    (error,) = [e.error for e in events if e.type == "error"]
    assert error.code == "invalid_value" and error.param == "session.audio.input.turn_detection"
    assert "missing.onnx" in error.message
    assert s.config.audio.input.turn_detection.type == "server_vad"  # unchanged
    assert s.input.vad.config.end_threshold is None


def test_a_semantic_session_with_silero_frames_turns_on_real_speech(model) -> None:
    s, events = session_with(str(model.path), {"type": "semantic_vad", "eagerness": "auto"}, {"vad": "silero"})
    assert [e.type for e in events] == ["session.updated"]
    assert events[0].session.mimo.vad == "silero"
    assert s.input.vad.config.classifier == "silero" and s.input.vad.config.end_threshold == 0.98
    speak(s, np.concatenate([EN_M, room_tone(EN_M, 1500)]))
    for score in scores_asked(s):  # the server's bridge runs these on the scorer's thread
        s.turn_scored(score.request_id, model.probability(score.audio16k))
    kinds = [e.type for e in s.take_events()]
    assert kinds[:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed"]
    assert kinds.count("input_audio_buffer.speech_started") == 1


def speak(s, pcm: np.ndarray) -> None:
    for i in range(0, len(pcm), 480):
        s.push_audio(pcm[i : i + 480])


def scores_asked(s) -> list:
    from streaming.actions import ScoreTurn

    return [a for a in s.take_actions() if isinstance(a, ScoreTurn)]


SPOKEN = np.concatenate([EN_M, room_tone(EN_M, 1500)])


@pytest.mark.parametrize("score", [0.99, 0.5, None])
def test_the_session_waits_for_the_score_off_its_loop_and_ends_the_turn_where_it_was_asked(model, score) -> None:
    """The session calls no model: it asks (an action), keeps the audio that comes meanwhile, and
    the answer, whenever it comes, decides the turn as an inline call would have (None: the model
    failed, the silence window decides)."""
    s, _ = session_with(str(model.path), {"type": "semantic_vad", "eagerness": "auto"})
    speak(s, SPOKEN)  # all of it: 1.5 s of silence came after the candidate end
    (asked,) = scores_asked(s)  # one score, at the candidate end: the detector waits for it
    assert [e.type for e in s.take_events()] == ["input_audio_buffer.speech_started"]
    reference = V.detect_turns(SPOKEN, dataclass_replace(s.input.vad.config, end_threshold=0.98))
    speech_end = stops(reference)[0].speech_end_ms
    assert asked.audio16k.shape == ((speech_end + 200 - max(0, reference[0].speech_start_ms - V.PRE_SPEECH_MS)) * 16,)
    s.turn_scored(asked.request_id + 1, 1.0)  # an answer to nothing: ignored
    assert s.take_events() == []
    s.turn_scored(asked.request_id, score)
    events = s.take_events()
    assert [e.type for e in events][:3] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                            "conversation.item.added"]
    waited = 200 if score == 0.99 else 800
    assert events[0].audio_end_ms == speech_end + waited
    item = s.conversation.get(events[0].item_id)
    assert item.audio_samples == (speech_end + waited - reference[0].audio_start_ms) * 24
    s.turn_scored(asked.request_id, 1.0)  # a second answer: ignored
    assert [e.type for e in s.take_events()] == []


def test_a_speculation_starts_at_the_candidate_before_the_score_and_a_confident_score_releases_it(model) -> None:
    from streaming import actions as act

    s, _ = session_with(str(model.path), {"type": "semantic_vad", "eagerness": "auto"}, stream_input=True,
                        speculate=True)
    speak(s, SPOKEN)
    actions = s.take_actions()
    kinds = [type(a) for a in actions]
    assert act.Speculate in kinds and act.ScoreTurn in kinds  # both at the candidate end
    (asked,) = [a for a in actions if isinstance(a, act.ScoreTurn)]
    s.turn_scored(asked.request_id, 0.99)
    kinds = [type(a) for a in s.take_actions()]
    assert kinds == [act.AppendUserAudio, act.CreateResponse]  # the held answer is released, not abandoned
