"""Prompts in the official layout, built patch by patch (spec 2.3 and 2.9).

A :class:`Prompt` is a run of patches: one text id per patch ``[P]`` and the patch's codes
``[P, group, channels]``. It converts to and from the official ``[channels + 1, 4P]`` layout
(text row ``[tok, -100, -100, -100]`` per patch, then one row per RVQ channel).

Segments, as the official ``InputSegment``/``StreamingInputSegment`` make them:

- text: every token is one text patch whose codes are the channels' empty ids; each string is
  tokenized on its own, exactly where the official builders split it;
- audio: ``<|sosp|>``, one speech patch per 4 frames (text ``<|empty|>``), ``<|eosp|>``;
- interleaved assistant turn: ``<|sostm|>``, then 5 text patches and 5 speech patches in turn
  (``<|eot|>`` closes the text), the leftovers, ``<|eostm|>``.

:class:`PromptBuilder` has the task prompts (dialogue, TTS, ASR, few-shot S2S, continuation ...)
and the helpers that append one turn to a conversation whose history is already in the KV cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from agent.lm.config import MiMoAudioConfig
from agent.lm.tokenizer import TextTokenizer

#: the filler of the official layout's text row in the 3 non-leading frames of a patch
LAYOUT_FILL = -100

#: user-turn templates: first of each list is the default; the official code picks one at random
ASR_TEMPLATES = {"en": "Please transcribe this audio file", "zh": "请将这段语音转换为文字"}
TTS_TEMPLATES = {"en": "Please convert this text to speech", "zh": "请将这段文字转换为语音"}
TTS_INSTRUCT_SYSTEM = "你需要根据指定的风格指令和文本内容来生成语音。"
TTS_VOICE_SYSTEM = "你需要根据指定的风格指令和文本内容来生成和语音prompt具有相同音色的语音。你的音色应该是："
DIALOGUE_VOICE_SYSTEM = "Your voice should be:"
DEFAULT_SYSTEM_PROMPT = "You are MiMo-Audio, a friendly AI assistant and your response needs to be concise."

_CJK = re.compile(r"[\u4e00-\u9fff]")


def language_of(text: str) -> str:
    """``"zh"`` if the text has a CJK ideograph, else ``"en"`` (the official template choice)."""
    return "zh" if _CJK.search(text) else "en"


def normalize_case(text: str) -> str:
    """Text written in one case only is capitalised, as the official ``preprocess_input`` does."""
    return text.capitalize() if text.isupper() or text.islower() else text


class _PatchStore:
    """Growable storage behind prompts built by appending (see :meth:`Prompt.__add__`): text ids
    and codes with room to spare, and how many patches are written."""

    def __init__(self, text_ids: torch.Tensor, codes: torch.Tensor, capacity: int) -> None:
        self.text_ids = text_ids.new_empty((capacity,))
        self.codes = codes.new_empty((capacity, *codes.shape[1:]))
        self.used = 0

    def write(self, text_ids: torch.Tensor, codes: torch.Tensor) -> None:
        end = self.used + text_ids.shape[0]
        self.text_ids[self.used : end] = text_ids
        self.codes[self.used : end] = codes
        self.used = end


@dataclass(frozen=True)
class Prompt:
    """Patches: text ids (P,) and codes (P, group, channels), int64 on the CPU.

    A value: nothing changes a prompt's patches once made. Appending (``a + b``) is amortised
    O(len(b)), not a copy of ``a``: a prompt made by appending is a prefix view of a store with
    spare room, and the next append to the store's last prompt writes into that room (earlier
    prompts see only their own prefix); any other append copies into a store twice the size.
    """

    text_ids: torch.Tensor
    codes: torch.Tensor
    _store: _PatchStore | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.text_ids.dim() != 1 or self.codes.dim() != 3 or self.codes.shape[0] != self.text_ids.shape[0]:
            raise ValueError(
                f"a prompt needs text_ids (P,) and codes (P, group, channels); got "
                f"{tuple(self.text_ids.shape)} and {tuple(self.codes.shape)}"
            )

    def __len__(self) -> int:
        return self.text_ids.shape[0]

    def __add__(self, other: Prompt) -> Prompt:
        n, m = len(self), len(other)
        store = self._store
        if store is None or store.used != n or n + m > store.text_ids.shape[0]:
            store = _PatchStore(self.text_ids, self.codes, max(16, 2 * (n + m)))
            store.write(self.text_ids, self.codes)
        store.write(other.text_ids, other.codes)
        return Prompt(store.text_ids[: n + m], store.codes[: n + m], store)

    def __getitem__(self, index: slice) -> Prompt:
        return Prompt(self.text_ids[index], self.codes[index])

    def batch(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(text_ids (1, P), codes (1, P, group, channels)) for ``embed_patches``."""
        return self.text_ids.unsqueeze(0).to(device), self.codes.unsqueeze(0).to(device)

    def to_layout(self) -> torch.Tensor:
        """The official ``[channels + 1, group * P]`` input layout."""
        P, G, C = self.codes.shape
        text = torch.full((P, G), LAYOUT_FILL, dtype=torch.int64)
        text[:, 0] = self.text_ids
        audio = self.codes.permute(2, 0, 1).reshape(C, P * G)  # (C, P*G): frame-major per channel
        return torch.cat([text.reshape(1, P * G), audio])

    @classmethod
    def from_layout(cls, ids: torch.Tensor | np.ndarray, group_size: int = 4) -> Prompt:
        """Patches of an official ``[channels + 1, T]`` layout (T a multiple of the group size)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        rows, T = ids.shape
        if T % group_size:
            raise ValueError(f"layout length {T} is not a multiple of group_size={group_size}")
        P = T // group_size
        codes = ids[1:].reshape(rows - 1, P, group_size).permute(1, 2, 0)  # (P, G, C)
        return cls(ids[0, ::group_size].clone(), codes.contiguous())


def pad_codes_to_patches(codes: torch.Tensor | np.ndarray, group_size: int = 4) -> torch.Tensor:
    """Codes (T, channels) padded to a multiple of ``group_size`` frames by repeating the last
    frame, as the official preprocessing does."""
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.int64)
    if codes.dim() != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be (T, channels) with T >= 1, got {tuple(codes.shape)}")
    short = -codes.shape[0] % group_size
    if short:
        codes = torch.cat([codes, codes[-1:].expand(short, -1)])
    return codes


class PromptBuilder:
    """Builds prompts for one model config and text tokenizer."""

    def __init__(self, tokenizer: TextTokenizer, config: MiMoAudioConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.specials = tokenizer.specials
        self.group_size = config.group_size
        self.channels = config.audio_channels
        self.empty_codes = torch.tensor(config.speech_empty_ids, dtype=torch.int64)

    # ------------------------------------------------------------------------------ segments
    def tokens(self, ids: Sequence[int]) -> Prompt:
        """One text patch per token id."""
        text = torch.tensor(list(ids), dtype=torch.int64)
        codes = self.empty_codes.expand(len(ids), self.group_size, -1).clone()
        return Prompt(text, codes)

    def text(self, text: str) -> Prompt:
        """A text segment: ``text`` tokenized on its own, one patch per token."""
        return self.tokens(self.tokenizer.encode(text))

    def speech(self, codes: torch.Tensor | np.ndarray) -> Prompt:
        """Speech patches of codes (T, channels), T a multiple of the group size; no sosp/eosp."""
        codes = self._check_codes(codes)
        P = codes.shape[0] // self.group_size
        text = torch.full((P,), self.specials.empty, dtype=torch.int64)
        return Prompt(text, codes.reshape(P, self.group_size, self.channels))

    def audio(self, codes: torch.Tensor | np.ndarray) -> Prompt:
        """An audio segment: ``<|sosp|>``, the speech patches, ``<|eosp|>``; of speech the model
        hears, only the config's ``input_speech_codebooks`` (the others are the empty ids)."""
        speech = self.speech(codes)
        n = self.config.input_speech_codebooks
        if n is not None and n < self.channels:
            heard = speech.codes.clone()  # the caller's codes stay whole
            heard[..., n:] = self.empty_codes[n:]
            speech = Prompt(speech.text_ids, heard)
        return self.tokens([self.specials.sosp]) + speech + self.tokens([self.specials.eosp])

    def interleaved(
        self, text: str, codes: torch.Tensor | np.ndarray, text_chunk: int = 5, audio_chunk: int = 5
    ) -> Prompt:
        """An assistant stream as the official ``StreamingInputSegment``: ``<|sostm|>``, then
        ``text_chunk`` text patches and ``audio_chunk`` speech patches in turn (``<|eot|>`` after
        the last text token), the leftovers in order, ``<|eostm|>``."""
        ids = self.tokenizer.encode(text)
        text_parts = [ids[i : i + text_chunk] for i in range(0, len(ids), text_chunk)] or [[]]
        text_parts[-1] = text_parts[-1] + [self.specials.eot]
        speech = self.speech(codes)
        audio_parts = [speech[i : i + audio_chunk] for i in range(0, len(speech), audio_chunk)]
        out = self.text("<|sostm|>")
        for i in range(max(len(text_parts), len(audio_parts))):
            if i < len(text_parts):
                out = out + self.tokens(text_parts[i])
            if i < len(audio_parts) and i < len(text_parts):
                out = out + audio_parts[i]
        for part in audio_parts[len(text_parts) :]:
            out = out + part
        return out + self.text("<|eostm|>")

    # --------------------------------------------------------------------------------- tasks
    def spoken_dialogue(
        self,
        user_codes: torch.Tensor | np.ndarray,
        *,
        system_prompt: str | None = None,
        voice_codes: torch.Tensor | np.ndarray | None = None,
    ) -> Prompt:
        """First turn of a spoken dialogue (``get_spoken_dialogue_sft_prompt``); ends with the
        assistant header and ``<|sostm|>``. Stops: eos, ``<|eostm|>``, ``<|im_end|>``."""
        out = self._voice_system(voice_codes)
        out = self._cat(out, self.text("<|im_start|>user\n"))
        if system_prompt:
            out = out + self.text(system_prompt) + self.text("\n\n")
        return (
            out
            + self.audio(user_codes)
            + self.text("<|im_end|>\n")
            + self.text("<|im_start|>assistant\n<|sostm|>")
        )

    def next_dialogue_turn(self, user_codes: torch.Tensor | np.ndarray) -> Prompt:
        """A later user turn, appended after the previous response (history mode: no
        ``<|im_end|>`` after the reply, as the official ``add_history``)."""
        return (
            self.text("<|im_start|>user\n")
            + self.audio(user_codes)
            + self.text("<|im_end|>\n")
            + self.text("<|im_start|>assistant\n<|sostm|>")
        )

    def spoken_dialogue_multiturn(
        self,
        messages: Sequence[dict],
        *,
        system_prompt: str | None = None,
        voice_codes: torch.Tensor | np.ndarray | None = None,
    ) -> Prompt:
        """A whole conversation (``get_spoken_dialogue_sft_multiturn_prompt``): user messages are
        ``{"role": "user", "content": codes}``, assistant ones ``{"role": "assistant", "content":
        {"text": str, "audio": codes}}``; the system prompt goes in the first message only."""
        out = self._voice_system(voice_codes)
        for i, message in enumerate(messages):
            role = message.get("role")
            if role == "user":
                out = self._cat(out, self.text("<|im_start|>user\n"))
                if system_prompt and i == 0:
                    out = out + self.text(system_prompt) + self.text("\n\n")
                out = out + self.audio(message["content"]) + self.text("<|im_end|>\n")
            elif role == "assistant":
                content = message["content"]
                out = self._cat(out, self.assistant_turn(content["text"], content["audio"]))
            else:
                raise ValueError(f"message {i}: role must be 'user' or 'assistant', got {role!r}")
        return self._cat(out, self.text("<|im_start|>assistant\n<|sostm|>"))

    def assistant_turn(self, text: str, codes: torch.Tensor | np.ndarray) -> Prompt:
        """A past assistant turn: header, interleaved stream, ``<|im_end|>``."""
        return (
            self.text("<|im_start|>assistant\n") + self.interleaved(text, codes) + self.text("<|im_end|>\n")
        )

    def tts(
        self,
        text: str,
        *,
        instruct: str | None = None,
        voice_codes: torch.Tensor | np.ndarray | None = None,
        template: str | None = None,
    ) -> Prompt:
        """Text to speech (``get_tts_sft_prompt``, read_text_only). Without ``instruct``: the user
        turn then the assistant header with ``<|sostm|>``. With it: the style system prompt
        (optionally with a voice prompt) and ``<think>\\n`` (the model thinks, then speaks).
        Stops: eos, ``<|eostm|>``, ``<|im_end|>``."""
        if template is None:
            template = TTS_TEMPLATES[language_of(text)]
        text = normalize_case(text)
        if instruct is None:
            return self.text(f"<|im_start|>user\n{template}: {text}<|im_end|>\n") + self.text(
                "<|im_start|>assistant\n<|sostm|>"
            )
        out = self.text("<|im_start|>system\n")
        if voice_codes is None:
            out = out + self.text(TTS_INSTRUCT_SYSTEM)
        else:
            out = out + self.text(TTS_VOICE_SYSTEM) + self.audio(voice_codes)
        return (
            out
            + self.text("<|im_end|>\n")
            + self.text(f"<|im_start|>user\n{template}: {text}({instruct})<|im_end|>\n")
            + self.text("<|im_start|>assistant\n<think>\n")
        )

    def asr(self, codes: torch.Tensor | np.ndarray, *, template: str = ASR_TEMPLATES["en"]) -> Prompt:
        """Speech to text (``get_asr_sft_prompt``). Stops: eos, ``<|im_end|>``."""
        return (
            self.text("<|im_start|>user\n")
            + self.audio(codes)
            + self.text(template)
            + self.text("<|im_end|>\n")
            + self.text("<|im_start|>assistant\n")
            + self.text("<think>\n\n</think>\n")
        )

    def speech_to_text_dialogue(self, codes: torch.Tensor | np.ndarray, *, thinking: bool = False) -> Prompt:
        """A spoken question answered in text (``get_s2t_dialogue_sft_prompt``)."""
        return (
            self.text("<|im_start|>user\n")
            + self.audio(codes)
            + self.text("<|im_end|>\n")
            + self.text("<|im_start|>assistant\n")
            + self._think(thinking)
        )

    def audio_understanding(
        self, codes: torch.Tensor | np.ndarray, question: str, *, thinking: bool = False
    ) -> Prompt:
        """A question about a recording (``get_audio_understanding_sft_prompt``)."""
        return (
            self.text("<|im_start|>user\n")
            + self.audio(codes)
            + self.text(question)
            + self.text("<|im_end|>\n")
            + self.text("<|im_start|>assistant\n")
            + self._think(thinking)
        )

    def in_context_s2s(
        self,
        instruction: str,
        examples: Sequence[tuple[torch.Tensor | np.ndarray, str, torch.Tensor | np.ndarray]],
        query_codes: torch.Tensor | np.ndarray,
    ) -> Prompt:
        """Few-shot speech-to-speech for the Base model (``get_in_context_learning_s2s_prompt``):
        examples are (input codes, output transcription, output codes). Stops: eos, ``<|eostm|>``."""
        out = self.text(f"[Int]:{instruction}\n")
        for in_codes, out_text, out_codes in examples:
            out = (
                out
                + self.audio(in_codes)
                + self.text("\n")
                + self.interleaved(out_text, out_codes)
                + self.text(" \n\n")
            )
        return out + self.audio(query_codes) + self.text("\n") + self.text("<|sostm|>")

    def continuation(self, codes: torch.Tensor | np.ndarray) -> Prompt:
        """Speech continuation (no official format; our choice for the Base model): an audio
        segment left open, ``<|sosp|>`` and the speech patches without ``<|eosp|>``, so the
        model goes on with speech patches. Stops: eos, ``<|eosp|>``, ``<|eostm|>``."""
        return self.tokens([self.specials.sosp]) + self.speech(codes)

    # ------------------------------------------------------------------------------ helpers
    def _voice_system(self, voice_codes: torch.Tensor | np.ndarray | None) -> Prompt | None:
        if voice_codes is None:
            return None
        return (
            self.text("<|im_start|>system\n")
            + self.text(DIALOGUE_VOICE_SYSTEM)
            + self.audio(voice_codes)
            + self.text("<|im_end|>\n")
        )

    def _think(self, thinking: bool) -> Prompt:
        return self.text("<think>\n" if thinking else "<think>\n\n</think>\n")

    @staticmethod
    def _cat(a: Prompt | None, b: Prompt) -> Prompt:
        return b if a is None else a + b

    def _check_codes(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.int64)
        if codes.dim() != 2 or codes.shape[1] != self.channels:
            raise ValueError(f"codes must be (T, {self.channels}), got {tuple(codes.shape)}")
        if codes.shape[0] == 0 or codes.shape[0] % self.group_size:
            raise ValueError(
                f"codes have {codes.shape[0]} frames; a whole number of {self.group_size}-frame patches "
                "is needed (pad_codes_to_patches repeats the last frame)"
            )
        bad = (codes < 0) | (codes >= self.empty_codes)  # the official check: below the empty id
        if bool(bad.any()):
            t, c = (int(x) for x in bad.nonzero()[0])
            limit = int(self.empty_codes[c]) - 1
            raise ValueError(f"code {int(codes[t, c])} at frame {t}, channel {c} is outside 0..{limit}")
        return codes
