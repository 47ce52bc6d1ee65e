"""Training of the audio tokenizer: ``mimo-agent train codec``.

The official architecture (``agent.codec``) at ``tiny-speech`` size, trained from scratch on a
corpus of ``mimo-agent train data`` without a discriminator: the loss is the log-mel L1 of the
reconstructed waveform at four STFT resolutions, plus the L1 of the decoder's coarse mel against
the input mel, plus the RVQ commitment. The codebooks are trained as the official quantizer's
buffers suggest (``embed_avg``, ``cluster_size``, ``inited``, ``threshold_ema_dead_code``):
initialised from encoder outputs, updated by exponential moving averages, unused entries replaced
by encoder outputs of the batch. Each item of a batch quantises with a drawn number of codebooks
(quantizer dropout), half of them with the language model's 8, so that 8 and 20 both decode well.

``--init DIR --train decoder`` fine-tunes a trained codec without changing its codes: the weights
start from ``DIR``, the encoder and the codebooks are frozen (no gradient, no EMA update, no
dead-entry restart), and only the modules after the quantizer learn (the decoder's up-samplers and
transformer, the vocoder): the modules :meth:`~agent.codec.MiMoAudioTokenizer.decode` runs after the
codebook lookup. A language model trained on the codes of ``DIR`` reads and writes the same codes
with the fine-tuned decoder. ``--validate-every`` measures STOI (8 codebooks) on the corpus'
held-out voices and keeps the best checkpoint so far in ``OUT/best`` (the initial weights count as
step 0 of a fine-tune, so ``best`` is never worse than ``DIR`` on that set).

Everything random is drawn from ``--seed``. The output directory is an official-layout checkpoint
(``config.json`` + ``model.safetensors``, read by :func:`agent.codec.load_audio_tokenizer`) with
``training.json`` (recipe, steps, losses, time) and ``train_state.pt`` (to ``--resume``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..codec.config import LM_CODEBOOKS, AudioTokenizerConfig
from ..codec.config import preset as preset_config
from ..codec.mel import htk_mel_filterbank
from ..codec.tokenizer import MiMoAudioTokenizer, init_random_weights, load_audio_tokenizer, save_audio_tokenizer
from .a2t import A2THead, character_errors, ctc_loss, greedy, spell, unspell
from .common import TrainLoop, check_resume_recipe, run_record, warmup_cosine
from .data import load_split, read_manifest
from .evaluate import measure

MANIFEST = "training.json"
STATE = "train_state.pt"
BEST = "best"
#: what ``--train`` may choose: every weight and the codebooks, the modules after the quantizer, or
#: only the audio-to-text head (:mod:`agent.train.a2t`) on a frozen codec
TRAIN_PARTS = ("all", "decoder", "head")


@dataclass
class TrainRecipe:
    preset: str = "tiny-speech"
    seed: int = 0
    steps: int = 2500
    batch: int = 8
    tokens: int = 48  # crop length in 25 Hz tokens (48 = 1.92 s)
    lr: float = 1e-3
    warmup: int = 200
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mel_weight: float = 1.0
    coarse_mel_weight: float = 0.5
    commit_weight: float = 0.25
    ema_decay: float = 0.99
    dead_code_percent: float = 10.0  # restart entries used less than this share of an even share
    lm_codebooks_share: float = 0.5  # items quantised with LM_CODEBOOKS; the rest 1..num_quantizers
    train: str = "all"  # one of TRAIN_PARTS; "decoder": encoder and codebooks frozen (codes unchanged)
    #: decay of the exponential moving average of the trained weights, which is what is validated
    #: and saved; 0: none (the optimizer's weights are saved)
    weight_ema: float = 0.0
    #: weight of the band-envelope correlation loss (:class:`BandEnvelopeCorrelation`); 0: off
    envelope_weight: float = 0.0
    #: weight of the audio-to-text (CTC) loss on the first ``a2t_codebooks`` codebooks; 0: off
    a2t_weight: float = 0.0
    a2t_codebooks: int = 1
    a2t_batch: int = 8  # whole training utterances per step for the audio-to-text loss
    #: (n_fft, hop, n_mels) of the waveform's log-mel loss
    mel_scales: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(256, 64, 32), (512, 128, 64), (960, 240, 128), (1920, 480, 128)]
    )


# --- losses --------------------------------------------------------------------------------------
class MultiScaleLogMel:
    """Log-mel spectrograms of a batch of waveforms at several STFT resolutions (differentiable)."""

    def __init__(self, scales: list[tuple[int, int, int]], sample_rate: int):
        self.scales = [
            (n_fft, hop, torch.hann_window(n_fft), htk_mel_filterbank(sample_rate, n_fft, n_mels))
            for n_fft, hop, n_mels in scales
        ]

    def __call__(self, wav: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for n_fft, hop, window, filters in self.scales:
            spec = torch.stft(wav, n_fft, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
            mag = spec.abs().clamp_min(1e-8).transpose(1, 2)  # (B, T, F)
            out.append(torch.log((mag @ filters).clamp_min(1e-5)))
        return out

    def l1(self, estimate: torch.Tensor, target_mels: list[torch.Tensor]) -> torch.Tensor:
        return sum(F.l1_loss(e, t) for e, t in zip(self(estimate), target_mels, strict=True)) / len(self.scales)


class BandEnvelopeCorrelation:
    """1 - the mean correlation of short-time third-octave band envelopes (differentiable).

    What STOI measures, without its resampling to 10 kHz, silent-frame removal and clipping: the
    magnitude spectrum (25 ms frames, 12.5 ms hop) summed into STOI's 15 third-octave bands from
    150 Hz, the envelope of each band over segments of 30 frames (384 ms), and the correlation of
    the estimate's envelopes with the reference's. The log-mel L1 weighs every frame alike, quiet
    or loud; this term follows the linear-amplitude envelope, which is what intelligibility
    tracks. Scale-invariant per band and segment; 0 for a signal against itself."""

    BANDS, MIN_FREQ, SEGMENT = 15, 150, 30

    def __init__(self, sample_rate: int):
        from pystoi.utils import thirdoct  # the band edges STOI itself uses

        self.win, self.hop, self.n_fft = sample_rate // 40, sample_rate // 80, 1024
        while self.n_fft < self.win:
            self.n_fft *= 2
        self.window = torch.hann_window(self.win)
        self.bands = torch.from_numpy(thirdoct(sample_rate, self.n_fft, self.BANDS, self.MIN_FREQ)[0]).float()

    def envelopes(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, bands, segments, SEGMENT) band amplitudes (one shorter segment when
        the crop is shorter than a segment)."""
        spec = torch.stft(wav, self.n_fft, self.hop, self.win, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, F, T)
        amp = (self.bands @ power).clamp_min(1e-10).sqrt()  # (B, bands, T)
        return amp.unfold(2, min(self.SEGMENT, amp.shape[2]), 1)

    def __call__(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        x, y = self.envelopes(reference), self.envelopes(estimate)
        x = x - x.mean(-1, keepdim=True)
        y = y - y.mean(-1, keepdim=True)
        corr = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + 1e-8)
        return 1 - corr.mean()


# --- the quantizer in training -------------------------------------------------------------------
class EmaQuantizer:
    """Trains the codebooks of ``tok.encoder.quantizer`` in place (EMA k-means, dead-code restarts).

    Fresh codebooks (``trained=False``) start as features of the first batch; trained ones (a
    fine-tune) are kept, each entry credited with an even share of that batch."""

    def __init__(self, tok: MiMoAudioTokenizer, decay: float, threshold: float, trained: bool = False):
        self.q = tok.encoder.quantizer
        self.decay, self.threshold, self.eps, self.trained = decay, threshold, 1e-5, trained
        self.cluster_size = [torch.zeros(k) for k in self.q.codebook_sizes]
        self.embed_avg = [self.q.codebook(i).clone() for i in range(self.q.num_quantizers)]
        self.inited = False

    def state_dict(self) -> dict:
        return {"cluster_size": self.cluster_size, "embed_avg": self.embed_avg, "inited": self.inited}

    def load_state_dict(self, state: dict) -> None:
        self.cluster_size, self.embed_avg, self.inited = state["cluster_size"], state["embed_avg"], state["inited"]

    def __call__(
        self, x: torch.Tensor, n_q: torch.Tensor, gen: torch.Generator, update: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) features, n_q (N,) codebooks per row -> (straight-through quantized x, commitment loss)."""
        residual = x.detach().float()
        total = torch.zeros_like(residual)
        for i in range(self.q.num_quantizers):
            active = n_q > i
            if not bool(active.any()):
                break
            book = self.q.codebook(i)
            if update and not self.inited:
                if not self.trained:
                    book.copy_(_sample_rows(residual[active], book.shape[0], gen))
                share = int(active.sum()) / book.shape[0]
                self.embed_avg[i] = book * share
                self.cluster_size[i].fill_(share)
            idx = self.q.vq.layers[i]._codebook.quantize(residual)
            chosen = book[idx] * active[:, None]  # the entries as they were when chosen
            if update:
                self._update(i, residual[active], idx[active], gen)
            total = total + chosen
            residual = residual - chosen
        self.inited = self.inited or update
        commit = F.mse_loss(x.float(), total)
        if not x.requires_grad:  # a frozen encoder: the decoder gets the entries exactly, as in decode()
            return total, commit
        return x + (total - x).detach(), commit

    @torch.no_grad()
    def _update(self, i: int, r: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> None:
        book, K = self.q.codebook(i), self.q.codebook_sizes[i]
        counts = torch.bincount(idx, minlength=K).float()
        sums = torch.zeros_like(book).index_add_(0, idx, r)
        d = self.decay
        self.cluster_size[i].mul_(d).add_(counts, alpha=1 - d)
        self.embed_avg[i].mul_(d).add_(sums, alpha=1 - d)
        size = self.cluster_size[i]
        n = size.sum()
        smoothed = (size + self.eps) / (n + K * self.eps) * n
        book.copy_(self.embed_avg[i] / smoothed[:, None])
        # An entry is dead when its average use per batch falls below ``threshold`` percent of an
        # even share (the official threshold counts uses per batch, for batches far larger than
        # these); it restarts on a residual of this batch, credited with an even share.
        share = r.shape[0] / K
        dead = size < self.threshold / 100 * share
        if bool(dead.any()):
            fresh = _sample_rows(r, int(dead.sum()), gen)
            book[dead] = fresh
            self.embed_avg[i][dead] = fresh * share
            self.cluster_size[i][dead] = share


def _sample_rows(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] >= n:
        return x[torch.randperm(x.shape[0], generator=gen)[:n]].clone()
    return x[torch.randint(x.shape[0], (n,), generator=gen)].clone()


# --- the loop --------------------------------------------------------------------------------------
class Trainer(TrainLoop):
    LOSS_COLUMNS: tuple[str, ...] = ("loss", "mel", "coarse_mel", "commit")

    def __init__(self, recipe: TrainRecipe, corpus: str | Path, out: str | Path, config: AudioTokenizerConfig,
                 *, init: str | Path | None = None):
        self.recipe, self.corpus, self.out, self.config = recipe, Path(corpus), Path(out), config
        if recipe.train not in TRAIN_PARTS:
            raise ValueError(f"train={recipe.train!r}: choose one of {', '.join(TRAIN_PARTS)}")
        if recipe.train in ("decoder", "head") and init is None:
            raise ValueError(f"--train {recipe.train} fine-tunes a trained codec: give its checkpoint with --init")
        if recipe.train == "head" and not recipe.a2t_weight:
            raise ValueError("--train head trains the audio-to-text head: give it a weight with --a2t-weight")
        if recipe.a2t_weight < 0 or not 1 <= recipe.a2t_codebooks <= config.num_quantizers or recipe.a2t_batch < 1:
            raise ValueError(f"--a2t-weight {recipe.a2t_weight:g} must be >= 0, --a2t-codebooks {recipe.a2t_codebooks} "
                             f"in 1..{config.num_quantizers}, --a2t-batch {recipe.a2t_batch} >= 1")
        torch.manual_seed(recipe.seed)
        self.tok = init_random_weights(MiMoAudioTokenizer(config), recipe.seed)
        self.init = None if init is None else Path(init)
        if self.init is not None:
            start = load_audio_tokenizer(self.init, dtype=torch.float32, device="cpu")
            if start.config.to_dict() != config.to_dict():
                raise ValueError(f"--init {self.init} is not a {recipe.preset} codec (its config.json differs)")
            self.tok.load_state_dict(start.state_dict())
        self.frozen = self.tok.encoder if recipe.train in ("decoder", "head") else None
        #: the audio-to-text head (a training aid: in the run's state, not in the checkpoint)
        self.head = A2THead(config.d_model) if recipe.a2t_weight else None
        self.train_mode()
        self.quant = EmaQuantizer(self.tok, recipe.ema_decay, recipe.dead_code_percent, trained=init is not None)
        self.opt = torch.optim.AdamW(
            list(self.parameters()), lr=recipe.lr, betas=(0.8, 0.99), weight_decay=recipe.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.mels = MultiScaleLogMel(recipe.mel_scales, config.sampling_rate)
        self.envelope = BandEnvelopeCorrelation(config.sampling_rate) if recipe.envelope_weight else None
        if self.envelope is not None:
            self.LOSS_COLUMNS = (*Trainer.LOSS_COLUMNS, "envelope")
        if self.head is not None:
            self.LOSS_COLUMNS = ("loss", "a2t") if recipe.train == "head" else (*self.LOSS_COLUMNS, "a2t")
        if not 0 <= recipe.weight_ema < 1:
            raise ValueError(f"weight_ema={recipe.weight_ema}: a decay in [0, 1), 0 for none")
        #: the moving average of each trained weight (by name), from the starting weights
        self.ema: dict[str, torch.Tensor] | None = None
        if recipe.weight_ema:
            self.ema = {n: p.detach().clone() for n, p in self.named_parameters()}
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.command: str | None = None  # the command line that made the run, for the manifest
        self.step = 0
        self.seconds = 0.0  # training wall time over all runs (resumes add up)
        self.history: list[dict[str, float]] = []
        self.validation: list[dict[str, float]] = []  # {"step", "stoi"} of each validation
        self.best: dict[str, float] | None = None
        self._held_out: list[tuple[dict, np.ndarray]] | None = None  # the validation set, read on first use
        train = load_split(self.corpus, "train", config.sampling_rate)
        if not train:
            raise ValueError(f"{self.corpus} has no training utterances")
        self.stream = torch.from_numpy(np.concatenate([a for _, a in train]))
        #: (spelling, audio) of each training utterance, for the audio-to-text loss (views of the stream)
        ends = np.cumsum([len(a) for _, a in train]).tolist()
        self.spoken = [] if self.head is None else [(_spelling(self.corpus, u), self.stream[end - len(a) : end])
                                                    for (u, a), end in zip(train, ends, strict=True)]
        self.crop = recipe.tokens * config.samples_per_token
        if self.stream.numel() <= self.crop:
            raise ValueError(f"{self.corpus}: {self.stream.numel()} training samples, need more than {self.crop}")

    def train_mode(self) -> None:
        """Training mode, but a frozen encoder stays in eval mode with no gradient (and with
        ``--train head``, the whole codec)."""
        self.tok.train()
        if self.recipe.train == "head":
            self.tok.eval().requires_grad_(False)
        elif self.frozen is not None:
            self.frozen.eval().requires_grad_(False)
        if self.head is not None:
            self.head.train()

    def _lr_factor(self, step: int) -> float:
        r = self.recipe
        return warmup_cosine(step, r.warmup, r.steps, r.final_lr_fraction)

    def batch(self) -> torch.Tensor:
        starts = torch.randint(self.stream.numel() - self.crop, (self.recipe.batch,), generator=self.gen)
        return torch.stack([self.stream[s : s + self.crop] for s in starts.tolist()])

    def draw_n_q(self, n: int) -> torch.Tensor:
        full = torch.randint(1, self.config.num_quantizers + 1, (n,), generator=self.gen)
        lm = torch.rand(n, generator=self.gen) < self.recipe.lm_codebooks_share
        return torch.where(lm, torch.full_like(full, LM_CODEBOOKS), full)

    def losses(self, wav: torch.Tensor, update: bool = True) -> dict[str, torch.Tensor]:
        r, tok = self.recipe, self.tok
        B, N = wav.shape
        with torch.no_grad():
            mel = torch.stack([tok.front_end(w) for w in wav])  # (B, T_mel, n_mels)
            targets = self.mels(wav)
        lengths = torch.full((B,), mel.shape[1])
        with torch.set_grad_enabled(self.frozen is None):
            feats, len25 = tok.encoder(mel, lengths)  # (B, T25, d)
        T25 = feats.shape[1]
        n_q = self.draw_n_q(B)[:, None].expand(B, T25).reshape(-1)
        quantized, commit = self.quant(feats.reshape(B * T25, -1), n_q, self.gen, update and self.frozen is None)
        dec = tok.decoder
        x, len50 = dec.dconv1(quantized.view(B, T25, -1), len25)
        coarse, len100 = dec.dconv2(dec.transform(x, len50), len50)
        out = dec.vocoder(coarse, len100)[:, :N]
        coarse_l1 = F.l1_loss(coarse[:, : mel.shape[1]], mel)
        mel_l1 = self.mels.l1(out, targets)
        total = r.mel_weight * mel_l1 + r.coarse_mel_weight * coarse_l1 + r.commit_weight * commit
        losses = {"loss": total, "mel": mel_l1, "coarse_mel": coarse_l1, "commit": commit}
        if self.envelope is not None:
            losses["envelope"] = self.envelope(out, wav)
            losses["loss"] = total + r.envelope_weight * losses["envelope"]
        return losses

    def batch_losses(self) -> dict[str, torch.Tensor]:
        losses = {} if self.recipe.train == "head" else self.losses(self.batch())
        if self.head is not None:
            picks = torch.randint(len(self.spoken), (self.recipe.a2t_batch,), generator=self.gen).tolist()
            texts, wavs = zip(*(self.spoken[i] for i in picks), strict=True)
            log_probs, lengths = self.a2t_forward(list(wavs))
            losses["a2t"] = ctc_loss(log_probs, lengths, list(texts))
            losses["loss"] = losses.get("loss", 0) + self.recipe.a2t_weight * losses["a2t"]
        return losses

    def a2t_forward(self, wavs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole utterances -> the head's log-probabilities (B, T25, C) and lengths (B,), from the
        straight-through quantised features of the first ``a2t_codebooks`` codebooks (the entries
        themselves when the encoder is frozen)."""
        tok = self.tok
        with torch.no_grad():
            mels = [tok.front_end(w) for w in wavs]
        lengths = torch.tensor([m.shape[0] for m in mels])
        with torch.set_grad_enabled(self.frozen is None and torch.is_grad_enabled()):
            feats, len25 = tok.encoder(torch.nn.utils.rnn.pad_sequence(mels, batch_first=True), lengths)
        B, T, D = feats.shape
        n_q = torch.full((B * T,), self.recipe.a2t_codebooks)
        quantized, _ = self.quant(feats.reshape(B * T, D), n_q, self.gen, update=False)
        return self.head(quantized.view(B, T, D)), len25

    def parameters(self):
        """The trained weights: all of them, or (``train="decoder"``) the decoder's, or (``"head"``)
        the audio-to-text head's; the head's learn in every mode that has one."""
        return (p for _, p in self.named_parameters())

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained weights with their names in the tokenizer's state dict (the head's under
        ``a2t_head.``, a name the tokenizer does not have)."""
        head = [] if self.head is None else [(f"a2t_head.{n}", p) for n, p in self.head.named_parameters()]
        if self.recipe.train == "head":
            return head
        if self.frozen is not None:
            return [(f"decoder.{n}", p) for n, p in self.tok.decoder.named_parameters()] + head
        return list(self.tok.named_parameters()) + head

    def train_step(self) -> dict[str, float]:
        row = super().train_step()
        if self.ema is not None:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    self.ema[name].lerp_(p, 1 - self.recipe.weight_ema)
        return row

    @contextmanager
    def averaged_weights(self):
        """The moving average of the weights in place of the optimizer's while in the block (a
        no-op without ``weight_ema``): what is validated and saved."""
        if self.ema is None:
            yield
            return
        raw = {n: p.detach().clone() for n, p in self.named_parameters()}
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self.ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.copy_(raw[name])

    def run(self, *, save_every: int = 250, log_every: int = 25, stop_at: int | None = None,
            max_seconds: float | None = None, validate_every: int | None = None, log=print) -> Path:
        """Train to ``recipe.steps``, or stop early (saved, resumable) at step ``stop_at`` or once this
        call has run ``max_seconds``; with ``validate_every``, measure the held-out voices every that
        many steps (and before the first step of a fine-tune) and keep the best in ``OUT/best``."""
        if validate_every and self.step == 0 and self.init is not None:
            self.validate(log)

        def after_step() -> None:
            if validate_every and self.step % validate_every == 0:
                self.validate(log)

        return self.train(self.save, log_every=log_every, stop_at=stop_at, max_seconds=max_seconds,
                          save_every=save_every, log=log, after_step=after_step)

    def validate(self, log=print) -> float:
        """Mean STOI with the LM's codebooks over the corpus' held-out voices (not with ``--train
        head``: the codec does not change) and, with the audio-to-text head, its character error
        rate there; a new best (highest STOI, or with the head lowest error rate) is saved."""
        if self._held_out is None:
            self._held_out = load_split(self.corpus, "held_out", self.config.sampling_rate)
        if not self._held_out:
            raise ValueError(f"{self.corpus} has no held-out utterances to validate on")
        entry: dict[str, float] = {"step": self.step}
        key = "stoi" if self.head is None else "cer"
        with self.averaged_weights():
            if self.recipe.train != "head":
                entry["stoi"] = self._held_out_stoi()
            if self.head is not None:
                entry["cer"] = self._held_out_cer()
            score = entry[key]
            better = self.best is None or (score > self.best[key] if key == "stoi" else score < self.best[key])
            if better:
                self.best = dict(entry)
                self.write_checkpoint(self.out / BEST)
        note = ""
        if self.ema is not None and "stoi" in entry:  # the optimizer's own weights too: what the average adds
            entry["stoi_raw"] = self._held_out_stoi()
            note = f" (the optimizer's weights: {entry['stoi_raw']:.4f})"
        self.validation.append(entry)
        measured = ", ".join(f"{'STOI' if k == 'stoi' else 'character error rate'} {entry[k]:.4f}"
                             for k in ("stoi", "cer") if k in entry)
        log(f"validation at step {self.step}: held-out {measured}" + (" (best)" if better else "") + note)
        return score

    def _held_out_stoi(self) -> float:
        self.tok.eval()
        score = round(float(np.mean([measure(self.tok, a, LM_CODEBOOKS)["stoi"] for _, a in self._held_out])), 5)
        self.train_mode()
        return score

    def _held_out_cer(self, batch: int = 8) -> float:
        """Character error rate of the head's best path over the held-out utterances' spellings."""
        self.tok.eval()
        self.head.eval()
        edits = chars = 0
        with torch.no_grad():
            for start in range(0, len(self._held_out), batch):
                part = self._held_out[start : start + batch]
                log_probs, lengths = self.a2t_forward([torch.from_numpy(a) for _, a in part])
                for (u, _), lp, n in zip(part, log_probs, lengths.tolist(), strict=True):
                    e, c = character_errors(unspell(spell(u["text"])), unspell(greedy(lp, n)))
                    edits, chars = edits + e, chars + c
        self.train_mode()
        return round(edits / chars, 5)

    def write_checkpoint(self, directory: Path) -> None:
        """The loadable checkpoint (official layout) and its ``training.json``."""
        self.tok.eval()
        save_audio_tokenizer(self.tok, directory)
        self.train_mode()
        corpus = read_manifest(self.corpus)
        manifest = {
            "format": "mimo-agent codec training",
            "command": self.command,
            "recipe": asdict(self.recipe),
            "parameters": sum(p.numel() for p in self.tok.parameters()),
            "trained_parameters": sum(p.numel() for p in self.parameters()),
            "corpus": {"path": str(self.corpus), "seed": corpus["recipe"]["seed"], "minutes": corpus["minutes"],
                       "held_out_voices": corpus["recipe"]["held_out_voices"]},
            "init": None if self.init is None else {"path": str(self.init), "training": _training_of(self.init)},
            **run_record(self.step, self.history, self.seconds),
            "validation": {"set": "the corpus' held-out voices, STOI with the LM's 8 codebooks"
                           + ("" if self.head is None else f"; character error rate of the audio-to-text head "
                              f"reading codebooks 1..{self.recipe.a2t_codebooks} (best: the lowest)"),
                           "best": self.best, "history": self.validation},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    def save(self) -> None:
        with self.averaged_weights():
            self.write_checkpoint(self.out)
        averaged = {} if self.ema is None else {  # the checkpoint holds the average: keep the optimizer's
            "weight_ema": self.ema, "weights": {n: p.detach().clone() for n, p in self.named_parameters()}}
        torch.save({**averaged, "step": self.step, "seconds": self.seconds, "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "quantizer": self.quant.state_dict(),
                    "generator": self.gen.get_state(), "history": self.history, "recipe": asdict(self.recipe),
                    "a2t_head": None if self.head is None else self.head.state_dict(),
                    "init": None if self.init is None else str(self.init),
                    "validation": self.validation, "best": self.best},
                   self.out / STATE)

    def resume(self) -> None:
        state = torch.load(self.out / STATE, weights_only=False)
        check_resume_recipe(state["recipe"], self.recipe, self.out / STATE)
        loaded = load_audio_tokenizer(self.out, dtype=torch.float32)
        self.tok.load_state_dict(loaded.state_dict())
        if self.ema is not None:
            self.ema = state["weight_ema"]
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.copy_(state["weights"][name])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.quant.load_state_dict(state["quantizer"])
        if self.head is not None:
            self.head.load_state_dict(state["a2t_head"])
        self.gen.set_state(state["generator"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.validation, self.best = state.get("validation", []), state.get("best")
        if state.get("init") is not None:
            self.init = Path(state["init"])


def _spelling(corpus: Path, utterance: dict) -> list[int]:
    """The utterance's text spelled for the audio-to-text loss; a text that cannot be is named with its file."""
    try:
        return spell(utterance["text"])
    except ValueError as e:
        raise ValueError(f"{corpus / utterance['file']}: {e}") from None


def _training_of(checkpoint: Path) -> dict | None:
    """The ``training.json`` of the checkpoint a fine-tune starts from (its history is this run's)."""
    path = checkpoint / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def add_arguments(parser) -> None:
    d = TrainRecipe()
    parser.add_argument("--data", required=True, help="corpus directory made by `mimo-agent train data`")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (official layout)")
    parser.add_argument("--preset", default=d.preset, help=f"tokenizer size to train (default {d.preset})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"weights, crops and quantizer draws (default {d.seed})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"crops per step (default {d.batch})")
    parser.add_argument("--tokens", type=int, default=d.tokens,
                        help=f"crop length in 25 Hz tokens (default {d.tokens})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help=f"steps of linear warm-up, then a cosine to {d.final_lr_fraction:g} x lr "
                             f"(default {d.warmup})")
    parser.add_argument("--init", default=None,
                        help="start from this codec checkpoint's weights (default: seeded random weights)")
    parser.add_argument("--train", default=d.train, choices=TRAIN_PARTS,
                        help="what learns: all (encoder, codebooks, decoder), decoder (the modules after the "
                             "quantizer; encoder and codebooks frozen, so the codes of --init stay the same; "
                             "needs --init) or head (only the audio-to-text head, on the frozen codec of --init: "
                             f"how well its codes can be read; needs --a2t-weight) (default {d.train})")
    parser.add_argument("--lm-codebooks-share", type=float, default=d.lm_codebooks_share,
                        help=f"share of crops quantised with the LM's {LM_CODEBOOKS} codebooks, the rest with 1..all "
                             f"(default {d.lm_codebooks_share:g})")
    parser.add_argument("--weight-ema", type=float, default=d.weight_ema,
                        help="decay of an exponential moving average of the trained weights (0.999, say), "
                             "validated and saved in place of the optimizer's weights "
                             f"(default {d.weight_ema:g}: none)")
    parser.add_argument("--envelope-weight", type=float, default=d.envelope_weight,
                        help="weight of a loss on the correlation of short-time third-octave band envelopes "
                             f"(what STOI measures) added to the log-mel L1 (default {d.envelope_weight:g}: off)")
    parser.add_argument("--a2t-weight", type=float, default=d.a2t_weight,
                        help="weight of an audio-to-text loss: a small head spells each utterance's text (CTC) "
                             "from the quantised first --a2t-codebooks codebooks, so that they carry what was said "
                             f"in any voice, as the official tokenizer's training does (default {d.a2t_weight:g}: off)")
    parser.add_argument("--a2t-codebooks", type=int, default=d.a2t_codebooks,
                        help=f"codebooks the audio-to-text head reads (default {d.a2t_codebooks}: the one the "
                             "built-in LM hears)")
    parser.add_argument("--a2t-batch", type=int, default=d.a2t_batch,
                        help=f"whole training utterances per step for the audio-to-text loss (default {d.a2t_batch})")
    parser.add_argument("--validate-every", type=int, default=None,
                        help="steps between STOI measurements on the corpus' held-out voices; the best "
                             "checkpoint is kept in OUT/best (default: none)")
    parser.add_argument("--save-every", type=int, default=250, help="steps between checkpoints (default 250)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (saved, resumable) after this many minutes of this invocation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = TrainRecipe(preset=args.preset, seed=args.seed, steps=args.steps, batch=args.batch, tokens=args.tokens,
                         lr=args.lr, warmup=args.warmup, train=args.train, lm_codebooks_share=args.lm_codebooks_share,
                         weight_ema=args.weight_ema, envelope_weight=args.envelope_weight, a2t_weight=args.a2t_weight,
                         a2t_codebooks=args.a2t_codebooks, a2t_batch=args.a2t_batch)
    trainer = Trainer(recipe, args.data, args.out, preset_config(args.preset), init=args.init)
    trainer.command = (f"mimo-agent train codec --data {args.data} --out {args.out} --preset {args.preset} "
                       + (f"--init {args.init} --train {args.train} " if args.init else "") +
                       f"--seed {args.seed} --steps {args.steps} --batch {args.batch} --tokens {args.tokens} "
                       f"--lr {args.lr:g} --warmup {args.warmup} --lm-codebooks-share {args.lm_codebooks_share:g}"
                       + (f" --weight-ema {args.weight_ema:g}" if args.weight_ema else "")
                       + (f" --envelope-weight {args.envelope_weight:g}" if args.envelope_weight else "")
                       + (f" --a2t-weight {args.a2t_weight:g} --a2t-codebooks {args.a2t_codebooks} "
                          f"--a2t-batch {args.a2t_batch}" if args.a2t_weight else "")
                       + (f" --validate-every {args.validate_every}" if args.validate_every else "")
                       + (f" --threads {args.threads}" if args.threads else ""))
    if args.resume:
        trainer.resume()
        print(f"resumed {args.out} at step {trainer.step}", flush=True)
    max_seconds = None if args.max_minutes is None else args.max_minutes * 60
    trainer.run(save_every=args.save_every, max_seconds=max_seconds, validate_every=args.validate_every,
                log=lambda m: print(m, flush=True))
    print(f"wrote {os.fspath(args.out)}: {trainer.final_losses()}")
    return 0
