"""Attention masks, the blockwise sliding window and the decoder's KV cache."""

from __future__ import annotations

import pytest
import torch

from agent.codec.decoder import valid_mask
from agent.codec.transformer import LayerKV, sliding_window_attention


def _explicit_window_attention(q, k, v, left, right, lengths):
    B, _, T, D = q.shape
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j >= i - left) & (j <= i + right)
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(lengths[b])
        att = (q[b, :, :n] @ k[b, :, :n].transpose(-1, -2)) / D**0.5
        att = att.masked_fill(~allowed[:n, :n], float("-inf")).softmax(-1)
        out[b, :, :n] = att @ v[b, :, :n]
    return out


@pytest.mark.parametrize(("T", "block"), [(7, 128), (130, 32), (301, 64), (64, 64)])
def test_sliding_window_equals_explicit_masked_attention(T, block):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(3, 2, T, 8, generator=g) for _ in range(3))
    lengths = torch.tensor([T, max(1, T - 5), max(1, T // 3)])
    got = sliding_window_attention(q, k, v, 40, 10, lengths, block=block)
    want = _explicit_window_attention(q, k, v, 40, 10, lengths)
    for b in range(3):
        n = int(lengths[b])
        torch.testing.assert_close(got[b, :, :n], want[b, :, :n], rtol=1e-5, atol=1e-6)
    # a sliding window really is narrower than full attention
    full = _explicit_window_attention(q, k, v, T, T, lengths)
    if T > 51:
        assert not torch.allclose(got[0], full[0], atol=1e-3)


@pytest.mark.parametrize("chunks", [[1] * 9, [2, 2, 2, 3], [5, 4], [3, 1, 5]])
def test_kv_cached_decoder_transformer_equals_full_pass(tiny, chunks):
    dec = tiny.decoder
    T = sum(chunks)
    g = torch.Generator().manual_seed(len(chunks))
    x = torch.randn(1, T, tiny.config.d_model, generator=g)
    full = dec.transform(x, torch.tensor([T]))
    heads = tiny.config.decoder_attention_heads
    hd = tiny.config.d_model // heads
    caches = [LayerKV(torch.zeros(1, heads, 0, hd), torch.zeros(1, heads, 0, hd)) for _ in dec.layers]
    outs, past = [], 0
    for n in chunks:
        outs.append(dec.transform(x[:, past : past + n], torch.tensor([n]), caches, torch.tensor([past])))
        past += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert caches[0].k.shape[2] == T


def test_batched_kv_cache_with_different_past_lengths(tiny):
    """Rows with different cached lengths and new lengths, padded into one batch."""
    dec = tiny.decoder
    d = tiny.config.d_model
    heads, hd = tiny.config.decoder_attention_heads, d // tiny.config.decoder_attention_heads
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, n, d, generator=g) for n in (7, 4)]
    past = [5, 2]
    new = [2, 2]
    full = [dec.transform(x, torch.tensor([x.shape[1]])) for x in xs]
    # caches after the first `past` frames, per row
    own = []
    for x, p in zip(xs, past, strict=True):
        c = [LayerKV(torch.zeros(1, heads, 0, hd), torch.zeros(1, heads, 0, hd)) for _ in dec.layers]
        dec.transform(x[:, :p], torch.tensor([p]), c, torch.tensor([0]))
        own.append(c)
    P = max(past)
    batched = [
        LayerKV(
            torch.cat([torch.nn.functional.pad(c[i].k, (0, 0, 0, P - c[i].k.shape[2])) for c in own]),
            torch.cat([torch.nn.functional.pad(c[i].v, (0, 0, 0, P - c[i].v.shape[2])) for c in own]),
        )
        for i in range(len(dec.layers))
    ]
    x_new = torch.cat([x[:, p : p + n] for x, p, n in zip(xs, past, new, strict=True)])
    out = dec.transform(x_new, torch.tensor(new), batched, torch.tensor(past))
    for b in range(2):
        want = full[b][0, past[b] : past[b] + new[b]]
        torch.testing.assert_close(out[b, : new[b]], want, rtol=1e-5, atol=1e-5)


def test_dconv2_chunked_with_previous_frame_equals_full_convolution(tiny):
    conv = tiny.decoder.dconv2
    T = 11
    x = torch.randn(1, T, tiny.config.d_model, generator=torch.Generator().manual_seed(2))
    full, _ = conv.upsample(x, torch.tensor([T]))
    prev = torch.zeros(1, 1, x.shape[2])
    pieces = []
    for a, b in ((0, 4), (4, 5), (5, 11)):
        y, _ = conv.upsample(torch.cat([prev, x[:, a:b]], dim=1), torch.tensor([b - a + 1]))
        pieces.append(y[:, 2 : 2 + 2 * (b - a)])
        prev = x[:, b - 1 : b]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full[:, : 2 * T], rtol=1e-5, atol=1e-6)


def test_vocoder_window_with_full_receptive_field_is_exact(tiny):
    """A vocoder window with >= lookback frames of history and >= lookahead of future reproduces the
    full pass: the window is exactly as wide as the vocoder's receptive field."""
    voc = tiny.decoder.vocoder
    back, ahead = voc.lookback_frames, voc.lookahead_frames
    T = back + ahead + 200
    mel = torch.randn(1, T, tiny.config.n_mels, generator=torch.Generator().manual_seed(4))
    full = voc.hidden(mel, torch.tensor([T]))
    a, b = back + 30, back + 90  # frames to check
    window = mel[:, a - back : b + ahead]
    part = voc.hidden(window, torch.tensor([window.shape[1]]))
    torch.testing.assert_close(part[:, back : back + (b - a)], full[:, a:b], rtol=1e-4, atol=1e-5)
    # with half the look-ahead the last frames change: the look-ahead is not negligible
    cut = b + ahead // 2
    short = voc.hidden(mel[:, a - back : cut], torch.tensor([cut - a + back]))
    assert (short[0, back + (b - a) - 1] - full[0, b - 1]).abs().max() > 1e-4


def test_valid_mask():
    assert valid_mask(torch.tensor([0, 2, 3]), 3).tolist() == [[False] * 3, [True, True, False], [True] * 3]
