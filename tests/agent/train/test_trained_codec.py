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
#: trained on (``data-a1``, ``data-a2``): this very codec, codec C1 fine-tuned with the
#: audio-to-text objective (``train codec --init codec-one/best --train all --a2t-weight 1``)
LM_CODES_DIGEST = "28364949b0a81cb6ebb64ad07ddad6de20832f53f1b744714047c2c205858cef"


def test_the_trained_codec_loads_and_reconstructs_speech():
    tok = load_audio_tokenizer(TRAINED)
    assert tok.config.to_dict() == preset("tiny-speech").to_dict()
    manifest = json.loads((TRAINED / "training.json").read_text())
    assert manifest["recipe"]["preset"] == "tiny-speech" and manifest["steps"] > 0
    speech = load_wav(SPEECH)  # espeak-ng en-us: a voice of the training split, not a held-out one
    trained = measure(tok, speech, n_q=8)
    random = measure(load_audio_tokenizer(preset="tiny-speech"), speech, n_q=8)
    # measured: trained STOI 0.949, log-mel L1 0.601 (C1 before its audio-to-text fine-tune: 0.959 and
    # 0.559; the chain packaged before C1: 0.936 and 0.635);
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
