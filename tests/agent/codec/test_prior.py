"""The streaming decode's calibrated GroupNorm prior (``streaming_prior.json`` next to a codec
checkpoint): written by ``mimo-agent calibrate-codec``, loaded with the tokenizer, the default
schedule's when present; absent, the decode is exactly the running-statistics one it always was."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.checkpoint import CheckpointError
from agent.codec import DecodeSchedule, load_audio_tokenizer, load_wav, save_audio_tokenizer
from agent.codec.mel import snr_db
from agent.codec.prior import PRIOR_NAME, StreamingPrior, calibrate, load_streaming_prior, save_streaming_prior
from agent.codec.streaming import stream_decode
from streaming.cli import main
from streaming.protocol.session_config import CodecSchedule
from streaming.server import codec_schedule_factory

from .conftest import DATA

TESTS_DATA = Path(__file__).resolve().parents[2] / "data"
PACKAGED = Path(__file__).resolve().parents[3] / "agent" / "presets" / "tiny-speech-codec"
#: human recordings (tests/data/real_speech_*.wav, the same as ../shared/data's): the packaged
#: codec's default stream is this much closer to its offline decode with its prior than without.
#: Measured (8 codebooks): en_m 20.3 -> 21.6 dB, en_w 15.6 -> 19.6 dB (BENCHMARKS.md). Codec C1 before
#: its audio-to-text fine-tune: 16.4 -> 18.9 and 18.8 -> 24.7; the codec before C1: 18.4 -> 22.7 and
#: 20.1 -> 26.3. The fine-tuned codec's running statistics alone do better on en_m, so less is left to gain.
MIN_PRIOR_GAIN_DB = 1.0


@pytest.fixture()
def checkpoint(tiny, tmp_path) -> Path:
    """The tiny preset written as a checkpoint, without a prior."""
    return save_audio_tokenizer(tiny, tmp_path / "codec")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_wav(DATA / "speech_en.wav")


def files_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_the_prior_file_round_trips_and_becomes_the_default_schedules(tiny, checkpoint, speech):
    prior = calibrate(tiny, [speech], n_q=8, tokens=7, calibration={"command": "by hand"})
    official = files_digest(checkpoint)
    path = save_streaming_prior(checkpoint, prior)
    assert path.name == PRIOR_NAME
    assert {k: v for k, v in files_digest(checkpoint).items() if k != PRIOR_NAME} == official  # untouched
    tok = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    assert tok.streaming_prior == prior and tok.streaming_prior.calibration == {"command": "by hand"}
    # the default schedule runs exactly the explicit prior schedule with the file's statistics and weight
    codes = tok.encode(speech)
    explicit = DecodeSchedule(norm="prior", prior=prior.statistics, prior_tokens=7)
    assert tok.new_decode_stream().schedule == explicit
    np.testing.assert_array_equal(stream_decode(tok, codes, DecodeSchedule())[0],
                                  stream_decode(tok, codes, explicit)[0])
    # and it is a different decode from the running statistics (the prior is used, not just read)
    running = stream_decode(tok, codes, DecodeSchedule(norm="running"))[0]
    assert np.abs(stream_decode(tok, codes, DecodeSchedule())[0] - running).max() > 1e-4


def test_without_the_file_the_default_stream_is_the_running_statistics_one(tiny, checkpoint, speech):
    tok = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    assert tok.streaming_prior is None
    assert tok.new_decode_stream().schedule == DecodeSchedule(norm="running")
    codes = tok.encode(speech)
    default = stream_decode(tok, codes, DecodeSchedule())[0]
    np.testing.assert_array_equal(default, stream_decode(tok, codes, DecodeSchedule(norm="running"))[0])
    # the same with the file present but turned off at load
    save_streaming_prior(checkpoint, calibrate(tok, [speech], n_q=8))
    off = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu", streaming_prior=False)
    assert off.streaming_prior is None
    np.testing.assert_array_equal(stream_decode(off, codes, DecodeSchedule())[0], default)


def test_every_schedule_serving_builds_resolves_the_checkpoints_prior(tiny, checkpoint, speech):
    """One mechanism: a stream resolves norm "checkpoint" when it starts, so a session's own
    schedule (``session.mimo.codec``), the engine's default and the benchmarks' all get the prior;
    ``norm="running"`` (or ``frozen``, or an explicit prior) is left as it is."""
    save_streaming_prior(checkpoint, calibrate(tiny, [speech], n_q=8, tokens=5))
    tok = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    session = codec_schedule_factory(tok)(CodecSchedule(first_chunk_patches=2, right_holdback_patches=1))
    stream = tok.new_decode_stream(session)
    assert stream.schedule.norm == "prior" and stream.schedule.prior_tokens == 5
    assert stream.schedule.first_chunk_patches == 2 and stream.schedule.holdback_tokens == 4
    for norm in ("running", "frozen"):
        assert tok.new_decode_stream(DecodeSchedule(norm=norm)).schedule.norm == norm
    mine = replace(DecodeSchedule(), norm="prior", prior=tok.streaming_prior.statistics, prior_tokens=50)
    assert tok.new_decode_stream(mine).schedule == mine


def corrupt(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def norm(name: str, **change):
    return lambda d: d["norms"][f"decoder.{name}.norm"].update(change)


CORRUPTIONS = {
    "format": (lambda d: d.update(format="something else"), "'format'"),
    "version": (lambda d: d.update(version=2), "'version'"),
    "tokens": (lambda d: d.update(prior_tokens=0), "'prior_tokens'"),
    "norm missing": (lambda d: d["norms"].pop("decoder.dconv2.norm"), "'norms'"),
    "groups": (norm("dconv1", num_groups=2), "'norms.decoder.dconv1.norm.num_groups'"),
    "negative var": (norm("dconv2", var=[-1.0]), "'norms.decoder.dconv2.norm.var'"),
    "nan mean": (norm("dconv2", mean=[float("nan")]), "'norms.decoder.dconv2.norm.mean'"),
    "two means": (norm("dconv1", mean=[0.0, 1.0]), "'norms.decoder.dconv1.norm.mean'"),
    "other weights": (lambda d: d.update(checkpoint_fingerprint="0123456789abcdef"), "'checkpoint_fingerprint'"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_bad_prior_file_is_refused_naming_the_file_and_field(tiny, checkpoint, speech, case):
    path = save_streaming_prior(checkpoint, calibrate(tiny, [speech], n_q=8))
    change, field = CORRUPTIONS[case]
    corrupt(path, change)
    with pytest.raises(CheckpointError) as exc:
        load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    assert str(path) in str(exc.value) and field in str(exc.value)


def test_a_prior_of_other_weights_or_not_json_is_refused(tiny, checkpoint, speech, tmp_path):
    path = save_streaming_prior(checkpoint, calibrate(tiny, [speech], n_q=8))
    path.write_text('{"format": "mimo-agent streaming prior", ')
    with pytest.raises(CheckpointError, match=f"{PRIOR_NAME} is not valid JSON"):
        load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    # the weights changed after calibrating (a fine-tune saved over the checkpoint): named, not used
    save_streaming_prior(checkpoint, calibrate(tiny, [speech], n_q=8))
    other = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    with torch.no_grad():
        other.decoder.dconv2.conv.weight.mul_(1.5)
    saved = tmp_path / "saved"
    save_audio_tokenizer(other, saved)
    shutil.copy(path, saved / PRIOR_NAME)
    with pytest.raises(CheckpointError, match=r"checkpoint_fingerprint.*calibrated on other weights"):
        load_streaming_prior(saved, other)


def test_a_prior_for_a_decoder_whose_norm_has_more_groups_is_refused(tiny, checkpoint, speech):
    """Streams keep one (mean, var) per norm: a file listing one value per group of a 2-group norm
    must not be read as its first group's."""
    path = save_streaming_prior(checkpoint, calibrate(tiny, [speech], n_q=8))
    corrupt(path, norm("dconv2", num_groups=2, mean=[0.1, 0.2], var=[1.0, 2.0]))
    tok = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu", streaming_prior=False)
    channels = tok.decoder.dconv2.norm.num_channels
    tok.decoder.dconv2.norm = torch.nn.GroupNorm(2, channels)
    with pytest.raises(CheckpointError, match=r"'norms'.*decoder\.dconv2\.norm has 2 groups"):
        load_streaming_prior(checkpoint, tok)
    with pytest.raises(ValueError, match=r"decoder\.dconv2\.norm has 2 groups"):
        calibrate(tok, [speech], n_q=8)


def test_calibrate_codec_writes_the_prior_and_its_recipe_next_to_the_untouched_checkpoint(checkpoint, tmp_path,
                                                                                        capsys):
    # a corpus of `train data`'s layout: the draw is seeded, from the split asked for
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    names = ["speech_yes.wav", "speech_stop.wav", "speech_hello_padded.wav"]
    for name in names:
        shutil.copy(TESTS_DATA / name, corpus / "train" / name)
    entries = [{"file": f"train/{n}", "split": "train", "voice": "espeak-ng:en-us", "seconds": 1.0} for n in names]
    entries.append({"file": "held_out/x.wav", "split": "held_out", "voice": "v", "seconds": 1.0})
    (corpus / "manifest.json").write_text(json.dumps({"format": "mimo-agent speech corpus", "utterances": entries}))
    official = files_digest(checkpoint)
    argv = ["calibrate-codec", "--checkpoint", str(checkpoint), "--data", str(corpus), "--utterances", "2",
            "--seed", "3", "--audio", str(DATA / "speech_en.wav"), "--prior-tokens", "12"]
    assert main(argv) == 0
    assert "weighted as 12 tokens; 3 utterances" in capsys.readouterr().out
    written = files_digest(checkpoint)
    assert {k: v for k, v in written.items() if k != PRIOR_NAME} == official
    data = json.loads((checkpoint / PRIOR_NAME).read_text())
    cal = data["calibration"]
    assert data["prior_tokens"] == 12 and cal["utterances"] == 3 and cal["codebooks"] == 8 and cal["seed"] == 3
    assert len(set(cal["files"][:2]) & {f"train/{n}" for n in names}) == 2 and cal["files"][2].endswith("speech_en.wav")
    # the recorded command makes the same file again
    assert cal["command"].startswith("mimo-agent calibrate-codec --checkpoint")
    assert main(cal["command"].split()[1:]) == 0
    assert files_digest(checkpoint) == written
    tok = load_audio_tokenizer(checkpoint, dtype="fp32", device="cpu")
    assert isinstance(tok.streaming_prior, StreamingPrior) and tok.streaming_prior.tokens == 12


@pytest.mark.parametrize("name", ["real_speech_en_m.wav", "real_speech_en_w.wav"])
def test_the_packaged_codecs_prior_brings_its_stream_closer_to_the_offline_decode(name):
    """The shipped ``streaming_prior.json`` (calibrated on the training corpus) against running
    statistics alone, on a human recording: SNR of the default stream to the offline decode of the
    same codes."""
    tok = load_audio_tokenizer(PACKAGED, dtype="fp32", device="cpu")
    assert tok.streaming_prior is not None and tok.streaming_prior.tokens == 10
    assert tok.streaming_prior.calibration["command"].startswith("mimo-agent calibrate-codec")
    codes = tok.encode(load_wav(TESTS_DATA / name), n_q=8)
    offline = torch.from_numpy(tok.decode(codes))
    snr = {norm: float(snr_db(offline, torch.from_numpy(stream_decode(tok, codes, DecodeSchedule(norm=norm))[0])))
           for norm in ("checkpoint", "running")}
    assert snr["checkpoint"] >= snr["running"] + MIN_PRIOR_GAIN_DB, snr


def test_serving_loads_the_packaged_prior_and_no_codec_prior_turns_it_off():
    from agent.presets import is_packaged
    from agent.runtime import load_runtime
    from streaming.cli import build_parser

    assert is_packaged("tiny-speech")  # the default model, whose codec ships its prior
    assert load_runtime(threads=1, device="cpu").codec.streaming_prior.tokens == 10
    args = build_parser("serve").parse_args(["--no-codec-prior"])
    assert args.codec_prior is False and build_parser("serve").parse_args([]).codec_prior is True
    assert load_runtime(threads=1, device="cpu", codec_prior=args.codec_prior).codec.streaming_prior is None


def test_serve_names_a_bad_prior_file_in_one_line_and_says_what_streams_start_from(tmp_path, speech, capsys):
    from agent.codec.prior import describe_streaming
    from tests.agent.test_model_card import save_tiny_checkpoint

    lm, codec = save_tiny_checkpoint(tmp_path)
    tok = load_audio_tokenizer(codec, dtype="fp32", device="cpu")
    path = save_streaming_prior(codec, calibrate(tok, [speech], n_q=8))
    corrupt(path, lambda d: d.update(prior_tokens="ten"))
    capsys.readouterr()
    assert main(["serve", "--model", str(lm), "--tokenizer", str(codec), "--device", "cpu", "--no-warmup"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimo-agent serve: ") and str(path) in err and "'prior_tokens'" in err
    assert "\n" not in err and "Traceback" not in err
    assert "running GroupNorm statistics only" in describe_streaming(None)
    assert "10 tokens' weight, 60 utterances" in describe_streaming(load_audio_tokenizer(PACKAGED).streaming_prior)
