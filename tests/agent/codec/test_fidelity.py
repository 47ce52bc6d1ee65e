"""Our tokenizer against outputs of the official implementation (tests/data/codec/README.md)."""

from __future__ import annotations

import numpy as np
import torch

from agent.codec.config import AudioTokenizerConfig
from agent.codec.mel import MelFrontEnd


def test_mel_matches_official_front_end(golden):
    _, tok, expected = golden
    audio = expected["audio"].numpy()
    mel = tok.mel(audio)
    assert mel.shape == expected["audio_mel"].shape == (1 + audio.size // 240, tok.config.n_mels)
    torch.testing.assert_close(mel, expected["audio_mel"], rtol=0, atol=1e-5)


def test_mel_with_shipped_128_bins_matches_official(golden):
    _, _, expected = golden
    mel = MelFrontEnd(AudioTokenizerConfig())(expected["audio"])
    torch.testing.assert_close(mel, expected["audio_mel128"], rtol=0, atol=1e-5)


def test_encoder_codes_match_official_exactly(golden):
    _, tok, expected = golden
    mel = expected["mel"]
    codes = tok.encoder.encode(mel[None], torch.tensor([mel.shape[0]]))[0]
    assert torch.equal(codes, expected["codes"].T)


def test_end_to_end_encode_matches_official_exactly(golden):
    _, tok, expected = golden
    n_q = expected["audio_codes"].shape[0]
    codes = tok.encode(expected["audio"].numpy(), n_q=n_q, pad_to_group=False)
    assert torch.equal(codes, expected["audio_codes"].T)
    # the LM view: the first 8 codebooks, padded to whole patches by repeating the last frame
    lm = tok.encode(expected["audio"].numpy())
    T = codes.shape[0]
    assert lm.shape == (-(-T // 4) * 4, 8)
    assert torch.equal(lm[:T], codes[:, :8])
    assert (lm[T:] == codes[-1, :8]).all()


def test_decode_matches_official(golden):
    _, tok, expected = golden
    wav = tok.decode(expected["codes"][:8].T)
    assert wav.dtype == np.float32 and wav.shape == expected["wav"].shape
    np.testing.assert_allclose(wav, expected["wav"].numpy(), rtol=0, atol=1e-4)
    # and not trivially: the waveform is far from silence
    assert np.abs(wav).max() > 1e-2


def test_codebooks_stay_fp32_when_the_model_is_cast(golden):
    _, tok, _ = golden
    half = type(tok)(tok.config)
    half.load_state_dict(tok.state_dict())
    half = half.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    for q in range(tok.config.num_quantizers):
        book = half.encoder.quantizer.codebook(q)
        assert book.dtype == torch.float32
        assert torch.equal(book, tok.encoder.quantizer.codebook(q))
