"""Streaming generation for one session: patches out one at a time, history kept in the KV cache.

:class:`LMSession` owns a slot of a shared :class:`KVCache`, its seeded generators and the
patches it has produced but not yet fed back (the last patch of a response is only fed when the
next turn starts, exactly where the official history mode would re-prefill it). A turn is
``session.feed(prompt)`` (new positions only: the history stays cached) followed by iterating
``session.generate(controls, sampling)``, which yields each :class:`Patch` as soon as it exists
and stops at the response's end, at a ``cancel()``, or when the consumer stops iterating.

The batched engine uses the model's functional API directly; this class is the batch-1 path of
the offline CLI and of tests, built on the same calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from agent.lm.generation import ControlState, GenerationControls, mask_text_logits
from agent.lm.kv_cache import KVCache
from agent.lm.model import MiMoAudioLM
from agent.lm.prompts import Prompt
from agent.lm.sampling import ChannelSampling, SamplingBatch, draw_uniform, sample
from agent.lm.tokenizer import SpecialTokens, TextTokenizer

#: patches per prefill call: bounds the attention mask and activations of one call
DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Patch:
    """One generated patch: a text token, and for a speech patch its codes."""

    index: int  # position in the response, from 0
    text_id: int
    codes: torch.Tensor  # (group, channels) int64 on the CPU; the empty ids for a text patch
    is_speech: bool
    stop: bool  # the text token is a stop token: the patch ends the response and has no content


@dataclass
class LMSession:
    """One conversation on one KV-cache slot; see the module docstring."""

    lm: MiMoAudioLM
    cache: KVCache
    slot: int
    specials: SpecialTokens
    seed: int = 0
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    #: why the last response ended: "stop_token", "max_patches" or "cancelled" (None while running)
    stop_reason: str | None = field(default=None, init=False)
    _pending: Prompt | None = field(default=None, init=False, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache.reset(self.slot)
        device = self.lm.device
        # separate streams so a text-only response does not shift the speech codes' randomness
        self.text_generator = torch.Generator(device=device).manual_seed(self.seed)
        self.speech_generator = torch.Generator(device=device).manual_seed(self.seed + 1)

    @classmethod
    def create(
        cls, lm: MiMoAudioLM, tokenizer: TextTokenizer, *, max_positions: int = 4096, seed: int = 0
    ) -> LMSession:
        """A session with its own one-slot cache (the offline path)."""
        max_positions = min(max_positions, lm.config.max_position_embeddings)
        return cls(lm, lm.allocate_cache(1, max_positions), 0, tokenizer.specials, seed=seed)

    # ------------------------------------------------------------------------------ history
    @property
    def length(self) -> int:
        """Positions of the conversation so far: cached plus pending."""
        return self.cache.length(self.slot) + (0 if self._pending is None else len(self._pending))

    def feed(self, prompt: Prompt) -> None:
        """Queue prompt patches; they are prefilled when the next response starts."""
        self._pending = prompt if self._pending is None else self._pending + prompt

    def rollback(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (e.g. what the user never heard)."""
        cached = self.cache.length(self.slot)
        if length <= cached:
            self.cache.rollback(self.slot, length)
            self._pending = None
        elif self._pending is not None and length <= self.length:
            self._pending = self._pending[: length - cached]
        else:
            raise ValueError(f"cannot roll back to {length}: the session holds {self.length} positions")

    def reset(self) -> None:
        """Start a new conversation on the same slot."""
        self.cache.reset(self.slot)
        self._pending = None

    def cancel(self) -> None:
        """Stop the running response at the next patch boundary (thread-safe)."""
        self._cancel.set()

    # --------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self, controls: GenerationControls, sampling: ChannelSampling | None = None
    ) -> Iterator[Patch]:
        """Yield the response's patches one by one as they are produced."""
        if self._pending is None or len(self._pending) == 0:
            raise ValueError("nothing to respond to: feed a prompt first")
        self._cancel.clear()
        self.stop_reason = None
        sampling = sampling or ChannelSampling()
        lm, device = self.lm, self.lm.device
        text_params = SamplingBatch.from_params([sampling.text], device)
        speech_params = SamplingBatch.from_params([sampling.speech], device)
        state = ControlState(controls, eot_id=self.specials.eot)
        empty_codes = torch.tensor(lm.config.speech_empty_ids).expand(lm.config.group_size, -1)
        empty_id = lm.config.empty_token_id

        h = self._flush_pending()
        while True:
            logits = mask_text_logits(lm.text_logits(h), [state], empty_id)
            uniform = None if text_params.all_greedy else draw_uniform([self.text_generator], 1, (), device)
            text_id = int(sample(logits, text_params, uniform))  # the one host sync: text or speech?
            is_speech = text_id == empty_id
            if is_speech:
                codes = lm.decode_patch(h, speech_params, [self.speech_generator])[0].cpu()
            else:
                codes = empty_codes.clone()
            finished = state.advance(text_id)
            # not fed yet: fed on the next step, or at the next turn's start if this one ends here
            self._pending = Prompt(torch.tensor([text_id]), codes.unsqueeze(0))
            self.stop_reason = "cancelled"  # unless the loop goes on or ends by itself below
            yield Patch(state.generated - 1, text_id, codes, is_speech, text_id in controls.stop_ids)
            if finished:
                self.stop_reason = state.stop_reason
                return
            if self._cancel.is_set():
                return
            self.stop_reason = None
            h = self._flush_pending()

    def _flush_pending(self) -> torch.Tensor:
        """Prefill the pending patches (in chunks); return the last backbone hidden state (1, hidden)."""
        assert self._pending is not None
        pending, self._pending = self._pending, None
        lm, device = self.lm, self.lm.device
        h = None
        for start in range(0, len(pending), self.prefill_chunk):
            chunk = pending[start : start + self.prefill_chunk]
            emb = lm.embed_patches(
                chunk.text_ids.unsqueeze(0).to(device), chunk.codes.unsqueeze(0).to(device)
            )
            if len(chunk) == 1 and self.cache.length(self.slot) > 0:
                h = lm.decode_step(self.cache, [self.slot], emb)
            else:
                h = lm.prefill(self.cache, self.slot, emb)
        assert h is not None
        return h


class ResponseCollector:
    """Text and audio of one response, parsed as the official output parsing does (spec 3.5).

    Text: the text patches' tokens decoded as readable text, special tokens dropped (the official
    parser writes out those other than ``<|empty|>``/``<|eot|>``/``<|eostm|>``; the stop-token
    patch adds nothing; the official parser drops the last patch even when the
    budget, not a stop token, ended the response). Audio: the speech patches after the first
    generated ``<|sostm|>`` (all of them if there is none) and before the first ``<|eostm|>``.
    """

    def __init__(self, tokenizer: TextTokenizer, audio_channels: int = 8) -> None:
        self._channels = audio_channels
        self._detok = tokenizer.detokenizer()
        self._specials = tokenizer.specials
        self._text: list[str] = []
        self._speech: list[tuple[int, torch.Tensor]] = []  # (patch index, codes)
        self._sostm: int | None = None
        self._eostm: int | None = None
        self.patches = 0

    def add(self, patch: Patch) -> str:
        """Record a patch; return the text it adds (possibly empty)."""
        self.patches += 1
        if patch.is_speech:
            self._speech.append((patch.index, patch.codes))
            return ""
        if patch.text_id == self._specials.sostm and self._sostm is None:
            self._sostm = patch.index
        if patch.text_id == self._specials.eostm and self._eostm is None:
            self._eostm = patch.index
        if patch.stop:
            return ""
        delta = self._detok.push(patch.text_id)
        self._text.append(delta)
        return delta

    def finish(self) -> str:
        """The text still held back (a character cut off at the end)."""
        delta = self._detok.flush()
        self._text.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def speech_patches(self) -> int:
        return len(self._speech)

    def codes(self) -> np.ndarray:
        """The response audio as RVQ codes [frames, channels] (int64)."""
        start = -1 if self._sostm is None else self._sostm
        end = self.patches if self._eostm is None else self._eostm
        kept = [c for i, c in self._speech if start < i < end]
        if not kept:
            return np.zeros((0, self._channels), dtype=np.int64)
        return torch.cat(kept).numpy()
