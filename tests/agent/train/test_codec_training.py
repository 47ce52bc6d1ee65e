"""``mimo-agent train codec``: a few steps on a small corpus make an official-layout checkpoint
that the loader reads back; the same seed gives the same weights, and a resumed run the same
weights as one run straight through; a decoder fine-tune (``--init --train decoder``) leaves the
encode path, and so every code, bit-identical."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open

from agent.codec.config import preset as preset_config
from agent.codec.tokenizer import init_random_weights, load_audio_tokenizer
from agent.train.a2t import ALPHABET, A2THead, character_errors, greedy, spell, unspell
from agent.train.codec import BEST, MANIFEST, STATE, BandEnvelopeCorrelation, Trainer, TrainRecipe
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


@pytest.mark.parametrize("options", [{}, {"weight_ema": 0.9, "envelope_weight": 1.0}], ids=["plain", "ema"])
def test_an_interrupted_decoder_fine_tune_resumed_ends_bit_exact(corpus, trained, tmp_path, options):
    """With ``weight_ema`` the checkpoint holds the average, so a resume must take the optimizer's
    own weights (and the average) from the saved state, not from the checkpoint."""
    def fine(out):
        recipe = TrainRecipe(steps=4, seed=2, warmup=2, train="decoder", **options, **FAST)
        return Trainer(recipe, corpus, out, preset_config("tiny"), init=trained)

    straight = fine(tmp_path / "straight")
    straight.run(log=lambda _: None)
    fine(tmp_path / "resumed").run(stop_at=2, log=lambda _: None)
    resumed = fine(tmp_path / "resumed")
    resumed.resume()
    resumed.run(log=lambda _: None)
    assert resumed.step == 4 and _same_weights(straight.tok, resumed.tok)
    if options:
        assert straight.ema.keys() == resumed.ema.keys()
        assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    saved = [load_audio_tokenizer(t.out) for t in (straight, resumed)]
    assert _same_weights(*saved)


def test_a_run_saved_before_the_new_recipe_fields_resumes(corpus, tmp_path):
    """A state written before ``weight_ema``/``envelope_weight`` existed ran with their defaults."""
    _trainer(corpus, tmp_path, steps=2).run(stop_at=1, log=lambda _: None)
    state = torch.load(tmp_path / STATE, weights_only=False)
    del state["recipe"]["weight_ema"], state["recipe"]["envelope_weight"]
    torch.save(state, tmp_path / STATE)
    again = _trainer(corpus, tmp_path, steps=2)
    again.resume()
    assert again.step == 1


def test_the_weight_average_is_what_is_validated_and_saved(corpus, trained, tmp_path):
    """``--weight-ema D``: the checkpoint holds the exponential moving average of the optimizer's
    weights after each step (from the starting weights), not the last weights; the average does
    not steer training, so a run without it follows the same weights step by step."""
    out, decay = tmp_path / "ema", 0.5
    args = ["train", "codec", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "3",
            "--batch", "2", "--tokens", "8", "--warmup", "1", "--seed", "1", "--init", str(trained),
            "--train", "decoder", "--validate-every", "2", "--weight-ema", str(decay), "--envelope-weight", "1"]
    assert main(args) == 0
    plain = Trainer(TrainRecipe(steps=3, seed=1, warmup=1, train="decoder", envelope_weight=1.0, **FAST),
                    corpus, tmp_path / "plain", preset_config("tiny"), init=trained)
    average = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for _ in range(3):
        plain.train_step()
        for n, p in plain.named_parameters():
            average[n] = decay * average[n] + (1 - decay) * p.detach()
    saved = load_audio_tokenizer(out).state_dict()
    state = torch.load(out / STATE, weights_only=False)
    for n, p in plain.named_parameters():
        assert torch.allclose(saved[n], average[n], atol=1e-6), n
        assert torch.equal(state["weights"][n], p.detach())  # the optimizer's own, kept to resume
    assert any(not torch.equal(saved[n], p.detach()) for n, p in plain.named_parameters())
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["recipe"]["weight_ema"] == decay and "--weight-ema 0.5" in manifest["command"]
    assert manifest["recipe"]["envelope_weight"] == 1.0 and "--envelope-weight 1" in manifest["command"]
    assert "envelope" in manifest["final_losses"]
    # both are validated: the average (what is kept) and the optimizer's weights
    assert [set(v) for v in manifest["validation"]["history"]] == [{"step", "stoi", "stoi_raw"}] * 2


def test_the_band_envelope_loss_is_what_stoi_looks_at():
    """0 for the signal itself at any gain (STOI is scale-invariant per band and segment), grows
    with added noise, and gives the estimate a gradient."""
    loss = BandEnvelopeCorrelation(24000)
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(24000) / 24000
    speechy = torch.sin(2 * torch.pi * 300 * t) * (1 + torch.sin(2 * torch.pi * 4 * t)) + \
        0.3 * torch.sin(2 * torch.pi * 1800 * t) * (1 + torch.cos(2 * torch.pi * 3 * t))
    ref = speechy[None]
    assert float(loss(ref, ref)) < 1e-4 and float(loss(0.2 * ref, ref)) < 1e-4
    noisy = [float(loss(ref + level * torch.randn(ref.shape, generator=gen), ref)) for level in (0.05, 0.5, 5.0)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    estimate = (ref + 0.5 * torch.randn(ref.shape, generator=gen)).requires_grad_()
    loss(estimate, ref).backward()
    assert estimate.grad is not None and float(estimate.grad.abs().sum()) > 0


def test_a_decoder_fine_tune_needs_a_trained_codec_of_the_same_size(corpus, trained, tmp_path):
    with pytest.raises(ValueError, match="--init"):
        Trainer(TrainRecipe(train="decoder", **FAST), corpus, tmp_path, preset_config("tiny"))
    with pytest.raises(ValueError, match="not a tiny-speech codec"):
        Trainer(TrainRecipe(preset="tiny-speech", train="decoder"), corpus, tmp_path, preset_config("tiny-speech"),
                init=trained)


def test_a_fine_tune_of_every_weight_starts_from_the_checkpoint_s_codebooks(corpus, trained, tmp_path):
    """``--init DIR --train all``: the codebooks are DIR's, trained on by moving averages from
    there; they are not drawn afresh from the first batch's features, which would throw away
    what DIR learnt and every code an LM was trained on."""
    recipe = TrainRecipe(steps=1, seed=7, warmup=1, lr=1e-6, **FAST)
    fine = Trainer(recipe, corpus, tmp_path, preset_config("tiny"), init=trained)
    start = load_audio_tokenizer(trained)
    book = start.encoder.quantizer.codebook(0).clone()
    fine.train_step()
    after = fine.tok.encoder.quantizer.codebook(0)
    # one step of EMA decay 0.99 moves each used entry by about 1% of the way
    assert float((after - book).abs().mean()) < 0.05 * float(book.abs().mean())
    # the codes move only as far as that step moves the entries (this 2-step codec's features lie
    # close together, so many do); with codebooks drawn afresh almost none stay (3% here)
    fine.tok.eval()
    same = [(start.encode(a, n_q=1) == fine.tok.encode(a, n_q=1)).float().mean()
            for _, a in load_split(corpus, "held_out")]
    assert float(torch.stack(same).mean()) > 0.25


# --- the audio-to-text objective (``--a2t-weight``, ``--train head``) -------------------------------
def test_texts_are_spelled_for_ctc_and_best_paths_read_back():
    assert unspell(spell("Hello, World!  It's me.")) == "hello world it's me"
    assert all(0 < i <= len(ALPHABET) for i in spell("the red cat"))  # 0 is the blank
    with pytest.raises(ValueError, match="digits"):
        spell("what is 3 plus 4")
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 3, 3, 0, 3, 5, 5, 1, 0]), 1 + len(ALPHABET)).float()
    assert greedy(one_hot.log(), 7) == [3, 3, 5]  # repeats merged unless a blank parts them; cut at the length
    assert character_errors("the cat", "the bat") == (1, 7)
    assert character_errors("the cat", "") == (7, 7)


def _a2t(corpus, out, init=None, **options):
    recipe = TrainRecipe(**{"steps": 4, "seed": 3, "warmup": 1, "a2t_weight": 1.0, "a2t_batch": 2, **FAST, **options})
    return Trainer(recipe, corpus, out, preset_config("tiny"), init=init)


def test_the_audio_to_text_loss_reaches_the_encoder_through_the_quantizer(corpus, tmp_path):
    """The head reads the quantised first codebook; its loss's gradient passes the quantiser
    (straight through) into the encoder, the decoder gets none of it, and the loss is logged."""
    trainer = _a2t(corpus, tmp_path)
    losses = trainer.batch_losses()
    assert {"a2t", "mel", "loss"} <= set(losses) and float(losses["a2t"].detach()) > 0
    trainer.opt.zero_grad(set_to_none=True)
    losses["a2t"].backward()
    assert float(trainer.tok.encoder.conv1.weight.grad.abs().sum()) > 0
    assert float(trainer.head.conv.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in trainer.tok.decoder.parameters())
    assert trainer.LOSS_COLUMNS == ("loss", "mel", "coarse_mel", "commit", "a2t")


def test_a_head_probe_leaves_the_codec_bit_identical_and_learns_to_spell(corpus, trained, tmp_path):
    """``--train head``: only the head learns (the codec of --init is saved unchanged), its loss
    falls on the utterances it sees, and validation keeps the lowest character error rate."""
    out = tmp_path / "probe"
    args = ["train", "codec", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "30",
            "--batch", "2", "--tokens", "8", "--warmup", "1", "--lr", "0.01", "--seed", "1", "--init", str(trained),
            "--train", "head", "--a2t-weight", "1", "--a2t-batch", "4", "--validate-every", "15", "--save-every", "100"]
    assert main(args) == 0
    before, after = load_audio_tokenizer(trained).state_dict(), load_audio_tokenizer(out).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("a2t" in k for k in after)  # the official layout: no head in the checkpoint
    rows = [line.split("\t") for line in (out / "losses.tsv").read_text().splitlines()]
    assert rows[0][:4] == ["step", "seconds", "loss", "a2t"]
    assert float(rows[-1][3]) < 0.8 * float(rows[1][3])  # steps 26-30 against the mean of 1-25
    manifest = json.loads((out / MANIFEST).read_text())
    assert "--train head --seed 1" in manifest["command"] and "--a2t-weight 1 --a2t-codebooks 1" in manifest["command"]
    history = manifest["validation"]["history"]
    assert [set(v) for v in history] == [{"step", "cer"}] * 3 and all(v["cer"] >= 0 for v in history)
    assert manifest["validation"]["best"] == min(history, key=lambda v: v["cer"])
    assert manifest["trained_parameters"] == sum(p.numel() for p in A2THead(preset_config("tiny").d_model).parameters())


def test_an_interrupted_run_with_the_audio_to_text_loss_resumes_bit_exact(corpus, trained, tmp_path):
    straight = _a2t(corpus, tmp_path / "straight", init=trained)
    straight.run(save_every=100, log=lambda _: None)
    first = _a2t(corpus, tmp_path / "resumed", init=trained)
    first.run(stop_at=2, log=lambda _: None)
    resumed = _a2t(corpus, tmp_path / "resumed", init=trained)
    resumed.resume()
    resumed.run(log=lambda _: None)
    assert _same_weights(straight.tok, resumed.tok) and _same_weights(straight.head, resumed.head)
    assert not _same_weights(straight.head, first.head)


def test_audio_to_text_options_are_checked(corpus, trained, tmp_path):
    with pytest.raises(ValueError, match="--train head fine-tunes a trained codec"):
        _a2t(corpus, tmp_path, train="head")
    with pytest.raises(ValueError, match="--train head trains the audio-to-text head: give it a weight"):
        _a2t(corpus, tmp_path, init=trained, train="head", a2t_weight=0.0)
    with pytest.raises(ValueError, match=r"--a2t-codebooks 21 in 1\.\.20"):
        _a2t(corpus, tmp_path, a2t_codebooks=21)
    # a training text that cannot be spelled is refused with its file, before any step
    copy = tmp_path / "digits"
    shutil.copytree(corpus, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = next(u for u in manifest["utterances"] if u["split"] == "train")
    first["text"] = "what is 3 plus 4"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(str(copy / first["file"])) + ".*cannot spell digits"):
        _a2t(copy, tmp_path / "out")
