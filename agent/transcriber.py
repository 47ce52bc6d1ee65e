"""Input transcription: the user's audio turned into text by the model's own ASR task.

OpenAI's ``audio.input.transcription`` gives the listener's side of the transcript. MiMo-Audio has
no separate ASR model, but it is one: the official ASR prompt (spec 2.9: the audio, "Please
transcribe this audio file", the assistant header with an empty think block) makes the same
weights write the transcript, greedily, until ``<|im_end|>``.

The pass runs in its own small one-slot KV cache so it never disturbs a session's conversation,
one patch per engine tick, after the tick's real work, and only while no response waits for its
first audio: transcripts are for display, first audio is what the listener waits for. Items are
transcribed one at a time, in commit order. A pass that raises fails its own item
(:class:`TranscriptionFailed`) and the next item goes on.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from agent.lm.generation import GenerationControls, Mode, task_stop_ids
from agent.lm.model import MiMoAudioLM
from agent.lm.prompts import PromptBuilder
from agent.lm.sampling import GREEDY, ChannelSampling
from agent.lm.session import LMSession, Patch
from agent.lm.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

#: text patches allowed per second of audio (fast speech is about 4 tokens/s), plus a margin
PATCHES_PER_SECOND = 8
MIN_PATCHES = 16


@dataclass(frozen=True)
class TranscriptionDelta:
    item_id: str
    text: str


@dataclass(frozen=True)
class TranscriptionDone:
    item_id: str
    transcript: str


@dataclass(frozen=True)
class TranscriptionFailed:
    item_id: str
    message: str


@dataclass
class _Job:
    sid: int
    item_id: str
    codes: torch.Tensor  # (T, 8), T a multiple of 4
    emit: Callable[[TranscriptionDelta | TranscriptionDone], None]
    patches: Iterator[Patch] | None = None
    text: str = ""
    detok: object = None


class Transcriber:
    """A FIFO of user audio items to transcribe; :meth:`step` makes one patch of the head item."""

    def __init__(self, lm: MiMoAudioLM, tokenizer: TextTokenizer, builder: PromptBuilder,
                 *, max_positions: int = 1024) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.builder = builder
        self.max_positions = min(max_positions, lm.config.max_position_embeddings)
        self._session: LMSession | None = None  # allocated on first use
        self._jobs: collections.deque[_Job] = collections.deque()
        self._stops = task_stop_ids("asr", tokenizer.specials)

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def add(self, sid: int, item_id: str, codes: torch.Tensor, emit: Callable) -> None:
        self._jobs.append(_Job(sid, item_id, codes, emit))

    def forget(self, sid: int, item_id: str | None = None) -> None:
        """Drop a session's items (all, or one): closed sessions and deleted items get no transcript."""
        self._jobs = collections.deque(j for j in self._jobs
                                       if not (j.sid == sid and (item_id is None or j.item_id == item_id)))

    def step(self) -> None:
        """One patch of the head item's transcript (the first call of an item prefills its prompt)."""
        if not self._jobs:
            return
        job = self._jobs[0]
        try:
            self._step(job)
        except Exception as exc:  # this item's pass failed: the next one starts on a reset cache
            log.exception("transcription of item %s failed", job.item_id)
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()
            job.emit(TranscriptionFailed(job.item_id, f"{type(exc).__name__}: {exc}"))

    def _step(self, job: _Job) -> None:
        if job.patches is None:
            prompt = self.builder.asr(job.codes)
            seconds = len(job.codes) / 25
            budget = min(MIN_PATCHES + int(PATCHES_PER_SECOND * seconds), self.max_positions - len(prompt) - 1)
            if budget < 1:  # the turn does not fit the pass's context: say so with an empty transcript
                self._jobs.popleft()
                job.emit(TranscriptionDone(job.item_id, ""))
                return
            session = self._lm_session()
            session.reset()
            session.feed(prompt)
            controls = GenerationControls(mode=Mode.TEXT, stop_ids=self._stops, max_patches=budget)
            job.patches = session.generate(controls, ChannelSampling(GREEDY, GREEDY))
            job.detok = self.tokenizer.detokenizer()
        patch = next(job.patches, None)
        if patch is not None and not patch.stop:
            delta = job.detok.push(patch.text_id)
            if delta:
                job.text += delta
                job.emit(TranscriptionDelta(job.item_id, delta))
            return
        if patch is not None:  # the stop patch: the generator ends on the next call; end it now
            job.patches.close()
        tail = job.detok.flush()
        if tail:
            job.text += tail
            job.emit(TranscriptionDelta(job.item_id, tail))
        self._jobs.popleft()
        job.emit(TranscriptionDone(job.item_id, job.text.strip()))

    def _lm_session(self) -> LMSession:
        if self._session is None:
            cache = self.lm.allocate_cache(1, self.max_positions)
            self._session = LMSession(self.lm, cache, 0, self.tokenizer.specials)
        return self._session
