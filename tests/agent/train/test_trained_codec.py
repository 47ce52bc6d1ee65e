"""The trained ``tiny-speech`` codec committed under ``agent/presets/``: it loads through the
official-layout loader and reconstructs speech far better than the same architecture at random."""

from __future__ import annotations

import json
from pathlib import Path

from agent.codec.audio import load_wav
from agent.codec.config import preset
from agent.codec.tokenizer import load_audio_tokenizer
from agent.train.evaluate import measure

TRAINED = Path(__file__).resolve().parents[3] / "agent" / "presets" / "tiny-speech-codec"
SPEECH = Path(__file__).resolve().parents[2] / "data" / "codec" / "speech_en.wav"
#: ``codes_digest`` of the codec whose codes the packaged LM (``agent/presets/tiny-speech``) was
#: trained on (``data-c1``, ``data-c2``): this very codec, one ``train codec`` run (no ``init``)
LM_CODES_DIGEST = "f80af21120d98d6cd36c4dab9180fedda6aa52c9283f72304739b27ef3f54c0b"


def test_the_trained_codec_loads_and_reconstructs_speech():
    tok = load_audio_tokenizer(TRAINED)
    assert tok.config.to_dict() == preset("tiny-speech").to_dict()
    manifest = json.loads((TRAINED / "training.json").read_text())
    assert manifest["recipe"]["preset"] == "tiny-speech" and manifest["steps"] > 0
    speech = load_wav(SPEECH)  # espeak-ng en-us: a voice of the training split, not a held-out one
    trained = measure(tok, speech, n_q=8)
    random = measure(load_audio_tokenizer(preset="tiny-speech"), speech, n_q=8)
    # measured: trained STOI 0.959, log-mel L1 0.559 (the chain packaged before it: 0.936 and 0.635);
    # random weights about 0.35 and 2.7
    assert trained["stoi"] > 0.8 and random["stoi"] < 0.5
    assert trained["log_mel_l1"] < 1.2 < random["log_mel_l1"]


def test_the_packaged_codec_makes_the_codes_the_packaged_lm_was_trained_on():
    """Only the decoder side may change (``train codec --init --train decoder``): the encode path
    (:meth:`codes_digest`) is the one the LM's corpora were encoded with."""
    digest = load_audio_tokenizer(TRAINED, dtype="fp32", device="cpu").codes_digest()
    assert digest == LM_CODES_DIGEST
    corpora = json.loads((TRAINED.parent / "tiny-speech" / "training.json").read_text())["data"]
    # where the corpora recorded it (a corpus made before the digest existed has none, or null)
    assert {c.get("codec_digest") or digest for c in corpora} == {digest}
