"""``mimo-agent train data``: the same corpus for the same seed, held-out voices kept out."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from agent.codec.audio import load_wav
from agent.train.data import HELD_OUT_VOICES, MANIFEST, AugmentRecipe, CorpusRecipe, generate, load_split
from agent.train.lexicon import WORDS, SentenceGenerator
from agent.train.voices import Augmentation, VoiceError, shift_formants, synthesize
from streaming.cli import main

from .conftest import SMALL, require_voices


def test_sentences_are_seeded_and_inside_the_lexicon():
    a, b = SentenceGenerator(7).sentences(300), SentenceGenerator(7).sentences(300)
    assert a == b
    assert a != SentenceGenerator(8).sentences(300)
    words = {w for s in a for w in re.findall(r"[a-z]+", s.lower())}
    assert words <= WORDS, words - WORDS
    assert any("plus" in s for s in a) and any(s.startswith("Repeat after me") for s in a)


def test_same_seed_same_bytes_and_held_out_voices_only_in_held_out(corpus, tmp_path):
    again = tmp_path / "again"
    assert main(["train", "data", "--out", str(again), "--seed", "3", "--minutes", str(SMALL["train_minutes"]),
                 "--held-out-per-voice", str(SMALL["held_out_per_voice"])]) == 0
    first, second = (json.loads((d / MANIFEST).read_text()) for d in (corpus, again))
    assert first["utterances"] == second["utterances"]
    for u in first["utterances"]:
        assert (corpus / u["file"]).read_bytes() == (again / u["file"]).read_bytes(), u["file"]
    held_out = [u for u in first["utterances"] if u["split"] == "held_out"]
    train = [u for u in first["utterances"] if u["split"] == "train"]
    assert [u["voice"] for u in held_out] == list(HELD_OUT_VOICES)
    assert first["recipe"]["held_out_voices"] == list(HELD_OUT_VOICES)
    assert train and not {u["voice"] for u in train} & set(HELD_OUT_VOICES)
    assert first["minutes"]["train"] >= SMALL["train_minutes"]
    assert first["recipe"]["seed"] == 3 and first["tools"]["sox"] != "not installed"
    # the audio is speech-like: 24 kHz, not silent, at the drawn peak level
    entry, audio = load_split(corpus, "held_out")[0]
    assert entry["file"] == held_out[0]["file"]
    assert audio.size / 24000 == pytest.approx(entry["seconds"], abs=1e-3)
    assert 20 * np.log10(np.abs(audio).max()) == pytest.approx(entry["augment"]["peak_db"], abs=0.2)


def test_another_seed_draws_other_sentences_voices_and_augmentation(corpus, tmp_path):
    other = generate(tmp_path, CorpusRecipe(seed=4, train_minutes=0.05, held_out_per_voice=1), log=lambda _: None)
    first = json.loads((corpus / MANIFEST).read_text())
    assert [u["text"] for u in other["utterances"]] != [u["text"] for u in first["utterances"]]
    assert [u["augment"] for u in other["utterances"]] != [u["augment"] for u in first["utterances"]]


def _vowel(rate: int, f0: float, formants: tuple[float, ...], seconds: float = 1.0) -> np.ndarray:
    """A pulse train at ``f0`` through two-pole resonators at ``formants`` (80-150 Hz wide)."""
    audio = np.zeros(int(rate * seconds))
    audio[:: int(rate / f0)] = 1.0
    for i, formant in enumerate(formants):
        r, theta = np.exp(-np.pi * (80 + 70 * i) / rate), 2 * np.pi * formant / rate
        a1, a2 = -2 * r * np.cos(theta), r * r
        out = np.zeros_like(audio)
        for n in range(len(audio)):
            out[n] = audio[n] - a1 * (out[n - 1] if n else 0.0) - a2 * (out[n - 2] if n > 1 else 0.0)
        audio = out
    return audio / np.abs(audio).max()


def _strongest_harmonics(audio: np.ndarray, rate: int, f0: float, bands: list[tuple[float, float]]) -> list[float]:
    """The frequency of the loudest harmonic of ``f0`` in each band (where the formant is)."""
    segment = audio[rate // 6 : -rate // 6]
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    harmonics = np.arange(1, int(rate / 2 / f0)) * f0
    level = spectrum[np.round(harmonics * len(segment) / rate).astype(int)]
    inside = [(harmonics >= lo) & (harmonics < hi) for lo, hi in bands]
    return [float(harmonics[band][np.argmax(level[band])]) for band in inside]


def _period(audio: np.ndarray, rate: int) -> int:
    segment = audio[rate // 6 : rate // 2]
    corr = np.correlate(segment, segment, "full")[len(segment) - 1 :]
    return int(np.argmax(corr[rate // 500 : rate // 60]) + rate // 500)


def test_shift_formants_moves_the_envelope_and_keeps_the_pitch():
    """A vowel of formants 700 and 1800 Hz at 120 Hz: shifted by 0.85 and 1.18 its formants sit
    near 595/1530 and 826/2124 Hz (the nearest harmonics of 120 Hz), its pitch and length stay."""
    rate, f0 = 24000, 120.0
    vowel = _vowel(rate, f0, (700.0, 1800.0))
    bands = [(300.0, 1200.0), (1200.0, 3000.0)]
    assert _strongest_harmonics(vowel, rate, f0, bands) == [720.0, 1800.0]
    for factor, expected in ((0.85, [600.0, 1560.0]), (1.18, [840.0, 2160.0])):
        shifted = shift_formants(vowel, factor, rate)
        assert shifted.shape == vowel.shape and shifted.dtype == np.float32
        assert _strongest_harmonics(shifted, rate, f0, bands) == expected, factor
        assert _period(shifted, rate) == _period(vowel, rate) == 200
    assert np.abs(shift_formants(vowel, 1.0, rate) - vowel).max() < 1e-5  # no shift: the audio back
    assert not np.isnan(shift_formants(np.zeros(rate // 10), 1.1, rate)).any()  # silence stays silent
    with pytest.raises(ValueError, match=r"formant shift 2.5 is outside 0.5\.\.2"):
        shift_formants(vowel, 2.5, rate)


def test_formant_shifts_are_drawn_only_when_asked_and_reach_the_audio(tmp_path):
    # without them a recipe draws exactly what it drew before they existed (recorded then)
    rng = random.Random(5)
    assert [AugmentRecipe().draw(rng) for _ in range(3)] == [
        Augmentation(pitch_cents=145, tempo=1.128, peak_db=-6.9), Augmentation(tempo=1.077, peak_db=-6.0),
        Augmentation(pitch_cents=-292, tempo=0.926, reverb=65, room_scale=79, pre_delay_ms=5, peak_db=-3.2),
    ]
    assert "formant_shift" not in Augmentation().to_dict()  # manifests as before
    recipe = AugmentRecipe(formant_probability=0.7, formant_shift=(0.9, 1.1))
    drawn = [recipe.draw(random.Random(i)) for i in range(200)]
    shifts = [a.formant_shift for a in drawn if a.formant_shift != 1.0]
    assert 0.6 < len(shifts) / len(drawn) < 0.8 and all(0.9 <= f <= 1.1 for f in shifts)
    assert Augmentation(**drawn[0].to_dict()) == drawn[0]
    # through the real synthesiser: same length and level; the mean all-pole envelope of the voiced
    # frames (its formants) is the unshifted one's stretched by the factor
    require_voices()
    envelope = {}
    for factor in (0.85, 1.0, 1.18):
        path = tmp_path / f"{factor}.wav"
        synthesize("flite:slt", "what is three plus four", path, Augmentation(formant_shift=factor, peak_db=-3.0))
        audio = load_wav(path)
        assert 20 * np.log10(np.abs(audio).max()) == pytest.approx(-3.0, abs=0.2)
        assert len(audio) == len(load_wav(tmp_path / "0.85.wav"))
        envelope[factor] = _mean_envelope(audio)
    bins = np.arange(len(envelope[1.0]))
    band = (bins * 24000 / 1024 > 200) & (bins * 24000 / 1024 < 4000)
    for factor in (0.85, 1.18):
        fits = {round(a, 2): np.corrcoef(np.interp(bins / a, bins, envelope[1.0])[band], envelope[factor][band])[0, 1]
                for a in np.arange(0.7, 1.4, 0.01)}
        assert abs(max(fits, key=fits.get) - factor) <= 0.03, (factor, max(fits, key=fits.get))


def _mean_envelope(audio: np.ndarray, size: int = 1024, order: int = 28) -> np.ndarray:
    """The mean log all-pole (linear prediction) envelope of the frames above a fiftieth of the mean energy."""
    out = []
    for start in range(0, len(audio) - size, size // 4):
        frame = audio[start : start + size] * np.hanning(size)
        if (frame**2).mean() < 0.02 * (audio**2).mean():
            continue
        r = np.fft.irfft(np.abs(np.fft.rfft(frame)) ** 2)[: order + 1]
        r[0] *= 1.0001
        lags = np.abs(np.arange(order)[:, None] - np.arange(order)[None, :])
        predictor = np.linalg.solve(r[lags], r[1:])
        out.append(-20 * np.log10(np.abs(np.fft.rfft(np.r_[1.0, -predictor], size))))
    return np.mean(out, axis=0)


def test_a_held_out_voice_among_the_training_voices_is_refused():
    with pytest.raises(ValueError, match="held-out voices also in the training voices"):
        CorpusRecipe(held_out_voices=("flite:slt",))


def test_unknown_voices_name_the_problem(tmp_path):
    require_voices()
    with pytest.raises(VoiceError, match="ENGINE:NAME"):
        synthesize("nobody", "hello", tmp_path / "x.wav", Augmentation())
    with pytest.raises(VoiceError, match="festival voice no_such_voice is not installed"):
        synthesize("festival:no_such_voice", "hello", tmp_path / "x.wav", Augmentation())
    with pytest.raises(VoiceError, match="flite voice"):
        synthesize("flite:no_such_voice", "hello", tmp_path / "x.wav", Augmentation())
