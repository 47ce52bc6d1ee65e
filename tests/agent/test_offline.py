"""The offline commands (tts, asr, dialogue, continue) on the tiny preset, through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streaming.cli import main


@pytest.fixture()
def user_codes(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, e, 30) for e in [1024, 1024] + [128] * 6], axis=1)
    path = tmp_path / "user.npy"
    np.save(path, codes)
    return path


def test_tts_writes_the_speech_patches(tmp_path, capsys) -> None:
    out = tmp_path / "speech.npy"
    assert main(["tts", "--preset", "tiny", "--text", "Hello there", "--max-patches", "12", "--out", str(out)]) == 0
    codes = np.load(out)
    # presets interleave 5:5 and run the whole budget: 5 text, 5 speech, 2 text patches
    assert codes.shape == (20, 8) and codes.dtype == np.int64
    assert (codes >= 0).all() and (codes < np.array([1024, 1024] + [128] * 6)).all()
    err = capsys.readouterr().err
    assert "12 patches (5 speech, 20 frames = 0.80 s of audio)" in err and "stop: max_patches" in err
    # the first line says which model runs and what to expect of it: random weights say noise
    assert err.startswith("[model mimo-audio-tiny: random weights: ") and "noise" in err.splitlines()[0]


def test_asr_prints_a_transcript(user_codes, capsys) -> None:
    assert main(["asr", "--preset", "tiny", "--input", str(user_codes), "--max-patches", "4", "--mode", "text",
                 "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and len(captured.out) > 1
    assert "4 patches (0 speech" in captured.err and "prompt" in captured.err


def test_dialogue_and_continue(user_codes, tmp_path, capsys) -> None:
    out = tmp_path / "reply.npy"
    assert (
        main(
            [
                "dialogue",
                "--preset",
                "tiny",
                "--input",
                str(user_codes),
                "--mode",
                "audio",
                "--max-patches",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert np.load(out).shape == (12, 8)
    assert (
        main(
            [
                "continue",
                "--preset",
                "tiny",
                "--input",
                str(user_codes),
                "--mode",
                "audio",
                "--max-patches",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert np.load(out).shape == (8, 8)
    # the default for presets: interleave 5:5, so 2 patches are text patches and no audio comes out
    assert main(["continue", "--preset", "tiny", "--input", str(user_codes), "--max-patches", "2", "--out",
                 str(out)]) == 0
    assert np.load(out).shape == (0, 8)


def test_wav_in_wav_out_through_the_audio_tokenizer(tmp_path, capsys) -> None:
    from agent.codec import load_wav

    speech = Path(__file__).resolve().parents[1] / "data" / "speech_yes.wav"
    out = tmp_path / "reply.wav"
    assert main(["dialogue", "--preset", "tiny", "--input", str(speech), "--max-patches", "10", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "10 patches (5 speech, 20 frames = 0.80 s of audio)" in err
    wav = load_wav(out)
    assert len(wav) == 20 * 960 and np.abs(wav).max() > 0
    # the preset's ASR answers in text
    assert main(["asr", "--preset", "tiny", "--input", str(speech), "--max-patches", "4", "--greedy"]) == 0
    assert "4 patches (0 speech" in capsys.readouterr().err


def test_checkpoint_without_audio_tokenizer_takes_codes_only(user_codes, tmp_path, capsys) -> None:
    from agent.checkpoint import save_lm
    from agent.lm.model import build_preset

    lm, _, tokenizer = build_preset("tiny")
    save_lm(lm, tmp_path / "ckpt", tokenizer=tokenizer)
    model = ["--model", str(tmp_path / "ckpt"), "--max-patches", "2"]
    assert main(["continue", *model, "--input", str(user_codes), "--out", str(tmp_path / "a.wav")]) == 2
    assert "writing audio files needs the audio tokenizer (--tokenizer DIR)" in capsys.readouterr().err
    assert main(["asr", *model, "--input", str(tmp_path / "a.wav")]) == 2
    assert "audio files need the audio tokenizer (--tokenizer DIR)" in capsys.readouterr().err
    assert main(["asr", *model, "--input", str(user_codes)]) == 0


def test_clear_errors(user_codes, tmp_path, capsys) -> None:
    assert main(["asr", "--preset", "tiny", "--input", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((8, 5), dtype=np.int64))
    assert main(["asr", "--preset", "tiny", "--input", str(tmp_path / "bad.npy")]) == 2
    assert "RVQ codes must be an integer array [T, 8]" in capsys.readouterr().err
    np.save(tmp_path / "big.npy", np.full((8, 8), 5000, dtype=np.int64))
    assert main(["asr", "--preset", "tiny", "--input", str(tmp_path / "big.npy")]) == 2
    assert "code 5000 at frame 0, channel 0 is outside 0..1023" in capsys.readouterr().err
    assert main(["tts", "--preset", "tiny", "--text", "hi", "--voice", str(user_codes)]) == 2
    assert "--voice needs --instruct" in capsys.readouterr().err


def test_transcripts_show_no_special_tokens_or_control_bytes(user_codes, capsys) -> None:
    """Random weights write random ids: special tokens, control bytes, bytes that are not UTF-8.
    The terminal shows only readable text."""
    from tests.agent.lm.test_tokenizer import _UNREADABLE

    assert main(["asr", "--preset", "tiny", "--input", str(user_codes), "--max-patches", "40", "--mode", "text"]) == 0
    printed = capsys.readouterr().out
    assert len(printed) > 3 and not _UNREADABLE.search(printed), repr(printed)


def test_tts_checks_its_input_and_output_before_generating(tmp_path, capsys) -> None:
    def refused(*argv: str) -> str:
        assert main(["tts", "--preset", "tiny", "--max-patches", "4", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "patches" not in captured.err, "nothing was generated"
        return captured.err

    missing = tmp_path / "missing" / "x.wav"
    assert f"the directory {missing.parent} does not exist" in refused("--text", "hi", "--out", str(missing))
    assert not missing.parent.exists()
    assert "--text is empty: give the text to speak" in refused("--text", " ", "--out", str(tmp_path / "x.wav"))
    err = refused("--text", "hi", "--out", str(tmp_path / "x.mp3"))
    assert "x.mp3: cannot write .mp3; use .wav (a 24 kHz pcm16 wav), .npy (the RVQ codes [T, 8])" in err
    assert not (tmp_path / "x.mp3").exists()
    # no --out: the audio is not kept, and the summary says so
    assert main(["tts", "--preset", "tiny", "--text", "hi", "--max-patches", "12"]) == 0
    assert "audio not kept (--out FILE.wav writes it)" in capsys.readouterr().err
    # upper-case endings are the same formats
    assert main(["tts", "--preset", "tiny", "--text", "hi", "--max-patches", "12", "--out",
                 str(tmp_path / "X.NPY")]) == 0
    assert np.load(tmp_path / "X.NPY").shape == (20, 8)
