"""An independent speech recognizer for the built-in model's closed domain.

The quality benchmark and the semantic tests must judge what the model *said*, with something
that shares nothing with it: CMU PocketSphinx (the ``pocketsphinx`` package from PyPI ships its
en-us acoustic model and pronouncing dictionary), restricted to the domain, in one of two ways:

- free speech over the lexicon: a dictionary of just the words of
  :data:`agent.train.lexicon.WORDS` and a bigram language model estimated from sentences of the
  domain (the lexicon's own sentence generator, plus whatever texts the caller adds); for TTS of
  lexicon sentences;
- one of a closed set of phrases (``phrases=``, a JSGF grammar of alternatives): the domain's
  answers are a closed set (numbers, a few greetings, the repeatable words), so an answer is heard
  as the nearest of them; it knows every answer, not which one is right.

Restricting it is what makes a 2000s-era recognizer usable here: with the full 130k-word
dictionary and its general LM it drops most words of synthetic speech.

Measure the ceiling before trusting a score: ``mimo-agent bench-quality`` reports the word error
rate of this recognizer on the agent voice's own clean TTS and on the codec's reconstruction of it.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

#: the rate PocketSphinx's en-us acoustic model was trained at
RECOGNIZER_RATE = 16000
#: sentences of the lexicon's generator the language model is estimated from
LM_SENTENCES = 20000
LM_SEED = 1234


class RecognizerError(RuntimeError):
    """PocketSphinx missing, or a word it cannot pronounce; the message says which and what to install."""


def normalize(text: str) -> str:
    """Lower case words only: punctuation dropped, 0..20 written as words (the domain's answers
    are spoken as words; a model that writes "7" still said "seven")."""
    from agent.train.lexicon import NUMBERS

    words = re.sub(r"[^a-z0-9']+", " ", text.lower()).split()
    return " ".join(NUMBERS[int(w)] if w.isdigit() and int(w) < len(NUMBERS) else w for w in words)


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) between two texts after :func:`normalize` (jiwer's alignment)."""
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return len(hyp.split()), 0
    out = jiwer.process_words(ref, hyp or "")
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def word_error_rate(pairs: Iterable[tuple[str, str]]) -> float:
    """Corpus WER of (reference, hypothesis) pairs: all edits over all reference words."""
    edits = words = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        edits, words = edits + e, words + n
    return edits / words if words else float(edits > 0)


def word_accuracy(reference: str, hypothesis: str) -> float:
    """1 - WER of one pair, at least 0 (insertions can push a WER past 1)."""
    edits, words = word_errors(reference, hypothesis)
    return max(0.0, 1.0 - edits / words) if words else float(edits == 0)


def bigram_arpa(sentences: Iterable[str], vocabulary: Iterable[str], discount: float = 0.5,
                floor: float = 0.5) -> str:
    """A backoff bigram language model in ARPA text form (what PocketSphinx reads).

    Absolute discounting: a seen bigram keeps ``(count - discount) / count(context)``; the mass
    taken off backs off to the unigram distribution, which every vocabulary word reaches (add
    ``floor`` to each count), so any word sequence of the vocabulary can still be recognised.
    Written here because no maintained Python package writes ARPA files (SRILM/KenLM are C++
    tools with their own builds)."""
    words = sorted(set(vocabulary) | {"</s>"})
    known = set(words)
    unigrams: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    for sentence in sentences:
        tokens = ["<s>", *(w for w in normalize(sentence).split() if w in known), "</s>"]
        unigrams.update(tokens[1:])
        bigrams.update(itertools.pairwise(tokens))
    total = sum(unigrams[w] + floor for w in words)
    p_uni = {w: (unigrams[w] + floor) / total for w in words}
    context: Counter[str] = Counter()
    followers: Counter[str] = Counter()
    seen_mass: Counter[str] = Counter()
    for (v, w), c in bigrams.items():
        context[v] += c
        followers[v] += 1
        seen_mass[v] += p_uni[w]
    p_bi = {(v, w): (c - discount) / context[v] for (v, w), c in bigrams.items()}
    backoff = {v: discount * followers[v] / context[v] / (1.0 - seen_mass[v]) for v in context}

    def log(p: float) -> str:
        return f"{math.log10(p):.5f}"

    lines = ["\\data\\", f"ngram 1={len(words) + 1}", f"ngram 2={len(p_bi)}", "", "\\1-grams:",
             f"-99.00000 <s> {log(backoff['<s>'])}" if "<s>" in backoff else "-99.00000 <s>"]
    lines += [f"{log(p_uni[w])} {w}" + (f" {log(backoff[w])}" if w in backoff else "") for w in words]
    lines += ["", "\\2-grams:", *(f"{log(p)} {v} {w}" for (v, w), p in sorted(p_bi.items())), "", "\\end\\", ""]
    return "\n".join(lines)


def domain_sentences(n: int = LM_SENTENCES, seed: int = LM_SEED) -> list[str]:
    """What the language model is estimated from: ``n`` sentences of the lexicon's generator."""
    from agent.train.lexicon import SentenceGenerator

    return SentenceGenerator(seed).sentences(n)


class Recognizer:
    """PocketSphinx restricted to ``vocabulary`` (default: the lexicon) with a domain bigram LM,
    or to one of ``phrases``.

    ``extra_sentences`` (the questions and answers a benchmark expects, say) are added to the LM's
    text, ten times each, so their word sequences are likely but not forced; their words join the
    vocabulary (each must be in CMUdict). With ``phrases`` the recognizer hears exactly one of them
    (normalised) or nothing. One decoder, reused: build it
    once (about a second) and call :meth:`transcribe` per utterance (about 0.1 s of CPU for 3 s
    of speech)."""

    def __init__(self, vocabulary: Iterable[str] | None = None, extra_sentences: Sequence[str] = (),
                 phrases: Sequence[str] = ()) -> None:
        try:
            import pocketsphinx
        except ImportError:
            raise RecognizerError("the recognizer needs pocketsphinx: pip install 'mimo-voice-agent[quality]' "
                                  "(or pip install pocketsphinx)") from None
        from agent.train.lexicon import WORDS

        self.phrases = tuple(dict.fromkeys(p for p in map(normalize, phrases) if p))
        if self.phrases:
            self.vocabulary = frozenset(w for p in self.phrases for w in p.split())
        else:
            base = frozenset(vocabulary if vocabulary is not None else WORDS)
            self.vocabulary = base | {w for s in extra_sentences for w in normalize(s).split()}
        model = Path(pocketsphinx.get_model_path()) / "en-us"
        pronunciations = _pronunciations(model / "cmudict-en-us.dict", self.vocabulary)
        self._dir = tempfile.TemporaryDirectory(prefix="mimo-recognizer-")
        directory = Path(self._dir.name)
        (directory / "domain.dict").write_text(pronunciations)
        if self.phrases:
            search = directory / "phrases.gram"
            search.write_text("#JSGF V1.0;\ngrammar phrases;\npublic <phrase> = " + " | ".join(self.phrases) + ";\n")
            kind = "jsgf"
        else:
            lm_text = [*domain_sentences(), *(s for s in extra_sentences for _ in range(10))]
            search = directory / "domain.arpa"
            search.write_text(bigram_arpa(lm_text, self.vocabulary))
            kind = "lm"
        self._decoder = pocketsphinx.Decoder(hmm=str(model / "en-us"), dict=str(directory / "domain.dict"),
                                             loglevel="FATAL", **{kind: str(search)})

    def transcribe(self, audio: np.ndarray, sample_rate: int = 24000) -> str:
        """The words heard in mono ``audio`` (float in [-1, 1] or int16) at ``sample_rate``; "" for silence."""
        from agent.codec.audio import as_mono_float, resample

        samples = resample(as_mono_float(np.asarray(audio)), sample_rate, RECOGNIZER_RATE)
        if samples.size == 0:
            return ""
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def transcribe_file(self, path: str | os.PathLike) -> str:
        from agent.codec.audio import read_audio_file

        audio, rate = read_audio_file(path)
        return self.transcribe(audio, rate)


def _pronunciations(dictionary: Path, words: Iterable[str]) -> str:
    """The lines of CMUdict for ``words`` (every variant: ``word``, ``word(2)`` ...)."""
    wanted = set(words)
    lines = []
    found = set()
    with open(dictionary, encoding="utf-8") as f:
        for line in f:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            word = head.split("(")[0]
            if word in wanted:
                lines.append(line.rstrip("\n"))
                found.add(word)
    missing = wanted - found
    if missing:
        raise RecognizerError(f"no pronunciation in {dictionary.name} for: {', '.join(sorted(missing)[:10])}")
    return "\n".join(lines) + "\n"
