"""``mimo-agent eval-codec``: the metrics on known cases, and the command on a corpus and files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.codec.audio import load_wav
from agent.codec.tokenizer import load_audio_tokenizer
from agent.train.data import HELD_OUT_VOICES
from agent.train.evaluate import log_mel_l1, stoi
from streaming.cli import main

SPEECH = Path(__file__).resolve().parents[2] / "data" / "codec" / "speech_en.wav"


def test_identity_scores_perfect_and_noise_scores_worse_in_order():
    tok = load_audio_tokenizer(preset="tiny")
    speech = load_wav(SPEECH)
    assert stoi(speech, speech, 24000) == pytest.approx(1.0, abs=1e-6)
    assert log_mel_l1(tok, speech, speech) == 0.0
    noise = np.random.default_rng(0).standard_normal(speech.size).astype(np.float32)
    noise *= np.sqrt(np.mean(speech**2) / np.mean(noise**2))
    scores = [stoi(speech, speech + gain * noise, 24000) for gain in (0.1, 1.0, 10.0)]  # 20, 0, -20 dB SNR
    assert 1.0 > scores[0] > scores[1] > scores[2]
    # STOI's clipping of the degraded envelopes leaves unrelated noise a floor near 0.45, not 0
    assert stoi(speech, noise, 24000) < 0.5
    distances = [log_mel_l1(tok, speech, speech + gain * noise) for gain in (0.1, 1.0, 10.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_eval_codec_reports_held_out_voices_and_files(corpus, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval-codec", "--preset", "tiny", "--data", str(corpus), "--audio", str(SPEECH),
                 "--n-q", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    held_out = result["held-out voices"]
    assert set(held_out) == {*HELD_OUT_VOICES, "mean"}
    assert held_out["mean"]["n_q=8"]["utterances"] == len(HELD_OUT_VOICES)
    files = result["audio files"]
    assert list(files) == ["speech_en.wav"]
    # random weights: far from the input
    assert files["speech_en.wav"]["n_q=8"]["stoi"] < 0.7
    assert files["speech_en.wav"]["n_q=8"]["log_mel_l1"] > 1.0


def test_eval_codec_needs_something_to_measure():
    with pytest.raises(SystemExit, match="--data"):
        main(["eval-codec", "--preset", "tiny"])
