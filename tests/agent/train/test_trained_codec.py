"""The trained ``tiny-speech`` codec committed under ``agent/presets/``: it loads through the
official-layout loader and reconstructs speech far better than the same architecture at random."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from agent.codec.audio import load_wav
from agent.codec.config import preset
from agent.codec.tokenizer import load_audio_tokenizer
from agent.train.evaluate import measure

TRAINED = Path(__file__).resolve().parents[3] / "agent" / "presets" / "tiny-speech-codec"
SPEECH = Path(__file__).resolve().parents[2] / "data" / "codec" / "speech_en.wav"
#: the encode path (encoder and RVQ codebooks) of the codec whose codes the packaged LM
#: (``agent/presets/tiny-speech``) was trained on: the 2500-step run of ``training.json``'s ``init``
LM_CODES_ENCODE_PATH_SHA256 = "32f0294469de760ff6da577d050582f9181dd023ba551d27e5d85ac3153ce999"


def test_the_trained_codec_loads_and_reconstructs_speech():
    tok = load_audio_tokenizer(TRAINED)
    assert tok.config.to_dict() == preset("tiny-speech").to_dict()
    manifest = json.loads((TRAINED / "training.json").read_text())
    assert manifest["recipe"]["preset"] == "tiny-speech" and manifest["steps"] > 0
    speech = load_wav(SPEECH)  # espeak-ng en-us: a voice of the training split, not a held-out one
    trained = measure(tok, speech, n_q=8)
    random = measure(load_audio_tokenizer(preset="tiny-speech"), speech, n_q=8)
    # measured: trained STOI 0.936, log-mel L1 0.635 (before the decoder fine-tunes 0.873 and 0.842);
    # random weights about 0.35 and 2.7
    assert trained["stoi"] > 0.8 and random["stoi"] < 0.5
    assert trained["log_mel_l1"] < 1.2 < random["log_mel_l1"]


def test_the_packaged_codec_makes_the_codes_the_packaged_lm_was_trained_on():
    """Only the decoder side may change (``train codec --init --train decoder``): every tensor of
    the encode path, stored as the file stores it, hashes to the one the LM's codes came from."""
    digest = hashlib.sha256()
    with safe_open(TRAINED / "model.safetensors", "pt") as f:
        names = sorted(k for k in f.keys() if k.startswith("encoder."))  # noqa: SIM118 (not a dict)
        assert any("_codebook.embed" in k for k in names)
        for name in names:
            t = f.get_tensor(name).contiguous()
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
            digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == LM_CODES_ENCODE_PATH_SHA256
