"""The codec's audio-to-text objective: ``mimo-agent train codec --a2t-weight W``.

The official tokenizer is trained on reconstruction and on an audio-to-text task together, so that
its first codebooks carry what was said, not only how it sounded. Here, at tiny size, a small head
reads the quantised vectors of the first ``a2t_codebooks`` codebooks (what the language model
hears: ``input_speech_codebooks``) and is trained with CTC to spell the utterance's text. The
gradient reaches the encoder through the quantiser's straight-through estimate, so the encoder
learns features whose nearest codebook entries spell the words, in any voice. The head is a
training aid: it is kept in the run's state, never in the checkpoint.

With ``--train head`` the codec is frozen and only the head learns: a probe of how well a fixed
codec's codes can be read (its held-out character error rate is the measure).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

#: the spelled alphabet; index 0 of the head's output is CTC's blank
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"


def spell(text: str) -> list[int]:
    """``text`` as alphabet indices (1-based): lower case, letters and apostrophes kept, every run
    of anything else one space. Digits are refused: the corpora spell their numbers."""
    if re.search(r"\d", text):
        raise ValueError(f"cannot spell digits in {text!r}: write numbers as words")
    words = re.sub(r"[^a-z']+", " ", text.lower()).split()
    return [ALPHABET.index(c) + 1 for c in " ".join(words)]


def unspell(ids: list[int]) -> str:
    return "".join(ALPHABET[i - 1] for i in ids)


class A2THead(nn.Module):
    """Quantised features (B, T25, d) -> log-probabilities (B, T25, 1 + len(ALPHABET))."""

    def __init__(self, d_model: int, hidden: int = 128, kernel: int = 5):
        super().__init__()
        self.conv = nn.Conv1d(d_model, hidden, kernel, padding=kernel // 2)
        self.out = nn.Linear(hidden, 1 + len(ALPHABET))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.out(h).log_softmax(-1)


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Mean over the batch of the CTC loss per target character."""
    flat = torch.tensor([c for t in targets for c in t], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    return F.ctc_loss(log_probs.transpose(0, 1), flat, lengths, target_lengths, blank=0,
                      reduction="mean", zero_infinity=True)


def greedy(log_probs: torch.Tensor, length: int) -> list[int]:
    """Best path of one sequence (T, C): repeats merged, blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()
    return [c for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1])]


def character_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(character edits, reference characters) between two spellings (jiwer's alignment)."""
    import jiwer

    out = jiwer.process_characters(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, len(reference)
