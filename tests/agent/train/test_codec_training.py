"""``mimo-agent train codec``: a few steps on a small corpus make an official-layout checkpoint
that the loader reads back; the same seed gives the same weights, and a resumed run the same
weights as one run straight through; a decoder fine-tune (``--init --train decoder``) leaves the
encode path, and so every code, bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from agent.codec.config import preset as preset_config
from agent.codec.tokenizer import init_random_weights, load_audio_tokenizer
from agent.train.codec import BEST, MANIFEST, Trainer, TrainRecipe
from agent.train.data import load_split
from streaming.cli import main

#: a few seconds of training on the tiny preset
FAST = {"preset": "tiny", "batch": 2, "tokens": 8}


def _trainer(corpus, out, steps, seed=0):
    recipe = TrainRecipe(steps=steps, seed=seed, warmup=2, **FAST)
    return Trainer(recipe, corpus, out, preset_config(recipe.preset))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_writes_a_checkpoint_the_loader_reads(corpus, tmp_path):
    out = tmp_path / "codec"
    args = ["train", "codec", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "3",
            "--batch", "2", "--tokens", "8", "--save-every", "2", "--seed", "5"]
    assert main(args) == 0
    tok = load_audio_tokenizer(out)
    # what was trained is what is loaded: the run's own weights, not the seed's initialisation
    again = Trainer(TrainRecipe(steps=3, seed=5, **FAST), corpus, tmp_path / "again", preset_config("tiny"))
    again.run(log=lambda _: None)
    assert _same_weights(tok, again.tok.eval())
    assert not _same_weights(tok, init_random_weights(type(tok)(tok.config), 5))
    # the official layout: config.json of the official class, the training buffers present
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mimo_audio_tokenizer" and config["d_model"] == preset_config("tiny").d_model
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "encoder.quantizer.vq.layers.0._codebook.embed_avg" in keys
    assert "decoder.vocoder.head.istft.window" in keys
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["steps"] == 3 and manifest["recipe"]["seed"] == 5
    assert manifest["command"].startswith("mimo-agent train codec --data")
    assert set(manifest["final_losses"]) == {"loss", "mel", "coarse_mel", "commit"}
    assert manifest["train_seconds"] > 0 and manifest["corpus"]["held_out_voices"]
    # and the loaded codec runs: speech in, codes and audio out
    audio = torch.randn(24000).numpy() * 0.1
    codes = tok.encode(audio)
    assert codes.shape == (28, 8) and tok.decode(codes).shape == (28 * 960,)


def test_an_interrupted_run_resumed_ends_with_the_weights_of_a_run_straight_through(corpus, tmp_path):
    """Two processes with the same seed end equal (the run is reproducible) even when one of them
    stopped half-way and resumed from its saved state."""
    straight = _trainer(corpus, tmp_path / "straight", steps=4)
    straight.run(save_every=100, log=lambda _: None)
    first = _trainer(corpus, tmp_path / "resumed", steps=4)
    first.run(stop_at=2, log=lambda _: None)  # interrupted half-way
    resumed = _trainer(corpus, tmp_path / "resumed", steps=4)
    resumed.resume()
    assert resumed.step == 2
    resumed.run(log=lambda _: None)
    assert _same_weights(straight.tok, resumed.tok)
    assert not _same_weights(straight.tok, first.tok)


def test_resume_refuses_another_recipe(corpus, tmp_path):
    _trainer(corpus, tmp_path, steps=1).run(log=lambda _: None)
    with pytest.raises(ValueError, match="changed: steps"):
        _trainer(corpus, tmp_path, steps=2).resume()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A codec trained a few steps on every weight: what a decoder fine-tune starts from."""
    out = tmp_path_factory.mktemp("trained")
    _trainer(corpus, out, steps=2).run(log=lambda _: None)
    return out


def _encode_path(tok) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tok.state_dict().items() if k.startswith("encoder.")}


def test_a_decoder_fine_tune_changes_the_decoder_and_not_one_bit_of_the_codes(corpus, trained, tmp_path):
    """``--init DIR --train decoder``: the encoder and the codebooks stay bit-identical to DIR, so
    every code is the same (an LM trained on DIR's codes still fits), while the decoder learns."""
    out = tmp_path / "fine"
    args = ["train", "codec", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "3",
            "--batch", "2", "--tokens", "8", "--warmup", "1", "--seed", "1", "--init", str(trained),
            "--train", "decoder", "--validate-every", "2", "--lm-codebooks-share", "1"]
    assert main(args) == 0
    before, after = load_audio_tokenizer(trained), load_audio_tokenizer(out)
    frozen, tuned = _encode_path(before), _encode_path(after)
    assert frozen.keys() == tuned.keys() and all(torch.equal(frozen[k], tuned[k]) for k in frozen)
    decoder = {k for k in after.state_dict() if k.startswith("decoder.")}
    changed = {k for k in decoder if not torch.equal(before.state_dict()[k], after.state_dict()[k])}
    assert {k for k in decoder if ".vocoder." in k} & changed and {k for k in decoder if ".layers." in k} & changed
    with safe_open(trained / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        names = a.keys()
        buffers = [k for k in names if "_codebook." in k]  # embed, embed_avg, cluster_size, inited
        assert buffers and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in buffers)
    for _, audio in load_split(corpus, "held_out"):
        assert torch.equal(before.encode(audio, n_q=20), after.encode(audio, n_q=20))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["recipe"]["train"] == "decoder" and "--init" in manifest["command"]
    assert manifest["recipe"]["lm_codebooks_share"] == 1.0 and "--lm-codebooks-share 1" in manifest["command"]
    assert manifest["init"]["path"] == str(trained) and manifest["init"]["training"]["steps"] == 2
    assert manifest["trained_parameters"] == sum(p.numel() for p in after.decoder.parameters())
    # validated before the first step (the starting point) and at step 2; the best is loadable
    assert [v["step"] for v in manifest["validation"]["history"]] == [0, 2]
    best = json.loads((out / BEST / MANIFEST).read_text())
    assert best["validation"]["best"] == manifest["validation"]["best"]
    assert best["steps"] == manifest["validation"]["best"]["step"]
    assert _encode_path(load_audio_tokenizer(out / BEST)).keys() == frozen.keys()


def test_an_interrupted_decoder_fine_tune_resumed_ends_bit_exact(corpus, trained, tmp_path):
    def fine(out):
        recipe = TrainRecipe(steps=4, seed=2, warmup=2, train="decoder", **FAST)
        return Trainer(recipe, corpus, out, preset_config("tiny"), init=trained)

    straight = fine(tmp_path / "straight")
    straight.run(log=lambda _: None)
    fine(tmp_path / "resumed").run(stop_at=2, log=lambda _: None)
    resumed = fine(tmp_path / "resumed")
    resumed.resume()
    resumed.run(log=lambda _: None)
    assert resumed.step == 4 and _same_weights(straight.tok, resumed.tok)


def test_a_decoder_fine_tune_needs_a_trained_codec_of_the_same_size(corpus, trained, tmp_path):
    with pytest.raises(ValueError, match="--init"):
        Trainer(TrainRecipe(train="decoder", **FAST), corpus, tmp_path, preset_config("tiny"))
    with pytest.raises(ValueError, match="not a tiny-speech codec"):
        Trainer(TrainRecipe(preset="tiny-speech", train="decoder"), corpus, tmp_path, preset_config("tiny-speech"),
                init=trained)
