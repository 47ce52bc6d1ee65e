"""Training of the language model: ``mimo-agent train lm``.

The official architecture at ``tiny-speech`` size (:data:`SIZES`: real codebook sizes, delays,
4-frame patches, bidirectional patch encoder), trained from scratch on a corpus of
``mimo-agent train dialogue-data`` with a byte-level BPE text tokenizer trained on the domain's
text (:func:`train_tokenizer`; the MiMo special tokens follow its vocabulary in the official
order, as in Qwen2's).

Every training sequence is built by the code that builds what the server feeds the model: a
dialogue is a list of :class:`agent.conversation.Item` rendered by the engine's
:class:`~agent.conversation.ConversationRenderer` (the default instructions in the first user
turn, each user turn's speech, each assistant turn as the patches the model generates: the
official 5:5 text/speech interleave after ``<|sostm|>``, ``<|eot|>`` closing the text,
``<|eostm|>`` the stream, then the history as the engine appends it); a share of the user turns is
typed instead (the question's text in the user turn, as the engine renders a typed ``input_text``
item, sometimes in lower case, without its final punctuation or with digits: :func:`typed_text`),
so that typed questions get the answers spoken ones do; TTS and ASR examples come
from :class:`~agent.lm.prompts.PromptBuilder` (``tts``, ``asr``: what the offline commands and
the transcriber use). The losses are on the patches the model generates and nothing else: text
cross-entropy on their text ids (``<|empty|>`` for a speech patch), and the patch decoder's
cross-entropy on their codes, teacher-forced through the delay pattern exactly as
:func:`agent.lm.patch_decoder.run_patch` samples them (each channel's empty id excluded).

Everything random is drawn from ``--seed``; ``--resume`` continues a run bit for bit; ``--init``
starts from a previous run's weights and tokenizer (fine-tuning). ``--validate-every`` measures,
teacher-forced, the answers to the corpus' held-out questions (held-out voices, spoken and typed)
and keeps the best checkpoint so far in ``best/`` (the one to ship, rather than the last). The output
directory is an official-layout checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``; :func:`agent.checkpoint.load_lm` reads it) with ``training.json`` (recipe,
command, steps, losses, time), ``losses.tsv`` and ``train_state.pt`` (to resume).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import save_lm
from ..conversation import ConversationRenderer, Item, Role
from ..lm.config import MiMoAudioConfig
from ..lm.model import MiMoAudioLM
from ..lm.prompts import ASR_TEMPLATES, DEFAULT_SYSTEM_PROMPT, TTS_TEMPLATES, Prompt, PromptBuilder
from ..lm.tokenizer import MIMO_ADDED_TOKENS, REQUIRED_TOKENS, TextTokenizer
from .common import LOSS_LOG, TrainLoop, check_resume_recipe, run_record, warmup_cosine
from .dialogue import check_same_codec, read_corpora
from .lexicon import NUMBERS, SentenceGenerator

MANIFEST = "training.json"
STATE = "train_state.pt"
#: the best checkpoint by validation, under the run's directory
BEST = "best"
FORMAT = "mimo-agent lm training"

#: model sizes: the official architecture (8 channels, codebooks 1025/129, delays 0..7, groups of 4,
#: bidirectional patch encoder) at CPU widths
SIZES: dict[str, dict] = {
    "tiny-speech": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=32, local_dim=64, local_layers=2, local_attn_heads=4,
                        local_ffn_dim=256, input_local_layers=1, input_local_dim=64, input_full_attention=True,
                        max_position_embeddings=2048, rope_theta=10000.0),
    # for tests: a few steps in seconds
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, local_dim=32, local_layers=1, local_attn_heads=2,
                  local_ffn_dim=64, input_local_layers=1, input_local_dim=32, input_full_attention=True,
                  max_position_embeddings=1024, rope_theta=10000.0),
}


def trained_agent_voice(model: str | Path) -> str | None:
    """The voice the model in ``model`` (a ``train lm`` checkpoint) was trained to speak in, from its
    ``training.json``'s corpora; None without that record (a preset, an official checkpoint)."""
    path = Path(model) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8")).get("data") or []
    voices = {(c.get("recipe") or {}).get("agent_voice") for c in data} - {None}
    return voices.pop() if len(voices) == 1 else None


# --- the text tokenizer ---------------------------------------------------------------------------
def tokenizer_texts(manifest: dict, seed: int) -> list[str]:
    """The text the tokenizer is trained on: every prompt string, question, answer and sentence of
    the corpus, and more lexicon sentences (so TTS of a new sentence still finds its words)."""
    texts = [DEFAULT_SYSTEM_PROMPT, TTS_TEMPLATES["en"] + ": ", ASR_TEMPLATES["en"], "user\n", "assistant\n",
             "system\n", "\n\n", "<think>\n\n</think>\n", "Your voice should be:"]
    texts += [u["text"] for u in manifest["users"]] + [a["text"] for a in manifest["agents"]]
    return texts + SentenceGenerator(seed * 2 + 11).sentences(3000)


def train_tokenizer(texts: list[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE of ``vocab_size`` ids in all: merges learnt from ``texts``, then the chat
    and MiMo special tokens after them in the official order (as Qwen2's vocabulary has them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [*REQUIRED_TOKENS, *MIMO_ADDED_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return TextTokenizer(tok, source="trained BPE")


def lm_config(size: str, tokenizer: TextTokenizer, input_codebooks: int | None = None) -> MiMoAudioConfig:
    """The config of ``size`` for ``tokenizer`` (its vocabulary rounded up to a multiple of 64),
    hearing ``input_codebooks`` of the user's speech (None: all)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    vocab = -(-tokenizer.vocab_size // 64) * 64
    return MiMoAudioConfig(vocab_size=vocab, empty_token_id=tokenizer.specials.empty,
                           input_speech_codebooks=input_codebooks, **SIZES[size])


# --- sequences -------------------------------------------------------------------------------------
_NUMBER_WORD = re.compile(r"\b(" + "|".join(sorted(NUMBERS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def typed_text(text: str, rng: random.Random) -> str:
    """``text`` as someone might type it: each of lower case, no final punctuation and (outside
    "repeat after me", whose word is the answer) digits for number words, a third of the time."""
    if rng.random() < 1 / 3 and not text.lower().startswith("repeat after me"):
        text = _NUMBER_WORD.sub(lambda m: str(NUMBERS.index(m.group(1).lower())), text)
    if rng.random() < 1 / 3:
        text = text.lower()
    if rng.random() < 1 / 3:
        text = text.rstrip(".?!")
    return text


@dataclass
class Sequence:
    """A training sequence: its patches and which of them the model generates (the loss targets)."""

    prompt: Prompt
    generated: torch.Tensor  # (P,) bool


class SequenceBuilder:
    """Training sequences from corpus entries, with the server's own prompt code.

    ``noise``: the share of the user's speech codes replaced by random codes (each channel's
    range), drawn per example from the ``rng`` given, so that the model cannot recognise an
    utterance it has seen by a few of its codes and has to learn what was said."""

    def __init__(self, builder: PromptBuilder, codes: dict[str, np.ndarray], noise: float = 0.0):
        self.builder, self.codes, self.noise = builder, codes, noise
        self.renderer = ConversationRenderer(builder)
        self._opening = len(self.renderer.assistant_open(True))
        self._limits = np.asarray(builder.config.speech_empty_ids)

    def user(self, key: str, rng: random.Random | None) -> torch.Tensor:
        """The codes of user utterance ``key``, with the noise drawn from ``rng`` (None: none)."""
        codes = self.codes[key]
        if self.noise and rng is not None:
            draw = np.random.default_rng(rng.getrandbits(64))
            codes = np.where(draw.random(codes.shape) < self.noise, draw.integers(0, self._limits, codes.shape), codes)
        return torch.from_numpy(codes)

    def stream(self, text: str, key: str) -> Prompt:
        """An assistant's speech stream as the model generates it: the official interleave after
        ``<|sostm|>`` (which the prompt ends with), up to and including ``<|eostm|>``."""
        return self.builder.interleaved(text, self.codes[key])[1:]

    def dialogue(self, turns: list[dict], instructions: str | None, rng: random.Random | None = None,
                 typed: list[bool] | None = None) -> Sequence:
        """The conversation as the engine renders it once every turn is answered; the user turns
        ``typed`` marks are the question's text (varied by :func:`typed_text` with ``rng``), as the
        engine renders a typed item, the others its speech."""
        items, streams = [], {}
        for i, turn in enumerate(turns):
            if typed and typed[i]:
                text = turn["text"] if rng is None else typed_text(turn["text"], rng)
                items.append(Item(f"u{i}", Role.USER, text=text))
            else:
                items.append(Item(f"u{i}", Role.USER, codes=self.user(turn["user"], rng)))
            streams[f"a{i}"] = self.stream(turn["answer"], turn["agent"])
            items.append(Item(f"a{i}", Role.ASSISTANT, patches=streams[f"a{i}"], complete=True))
        rendering = self.renderer.render(items, instructions=instructions)
        generated = torch.zeros(len(rendering), dtype=torch.bool)
        for item_id, stream in streams.items():
            start = rendering.spans[item_id][0] + self._opening
            generated[start : start + len(stream)] = True
        return Sequence(rendering.prompt, generated)

    def tts(self, text: str, key: str) -> Sequence:
        return self._answer(self.builder.tts(text), self.stream(text, key))

    def asr(self, key: str, transcript: str, rng: random.Random | None = None) -> Sequence:
        reply = self.builder.text(transcript) + self.builder.tokens([self.builder.specials.im_end])
        return self._answer(self.builder.asr(self.user(key, rng)), reply)

    @staticmethod
    def _answer(prompt: Prompt, reply: Prompt) -> Sequence:
        generated = torch.cat([torch.zeros(len(prompt), dtype=torch.bool), torch.ones(len(reply), dtype=torch.bool)])
        return Sequence(prompt + reply, generated)


def collate(sequences: list[Sequence], builder: PromptBuilder, rng: random.Random,
            max_decoded: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: text_ids (B, P), codes (B, P, G, C), generated (B, P), and decoded
    (B, P): the generated speech patches whose codes are learnt, at most ``max_decoded`` of them
    drawn with ``rng`` (the patch decoder's work per speech patch is ~11 backbone positions')."""
    P = max(len(s.prompt) for s in sequences)
    pad = builder.tokens([builder.specials.endoftext] * P)
    text = torch.stack([torch.cat([s.prompt.text_ids, pad.text_ids[len(s.prompt) :]]) for s in sequences])
    codes = torch.stack([torch.cat([s.prompt.codes, pad.codes[len(s.prompt) :]]) for s in sequences])
    generated = torch.stack([torch.cat([s.generated, torch.zeros(P - len(s.prompt), dtype=torch.bool)])
                             for s in sequences])
    decoded = generated & (text == builder.specials.empty)
    where = decoded.nonzero().tolist()
    if max_decoded is not None and len(where) > max_decoded:
        decoded = torch.zeros_like(decoded)
        for b, p in rng.sample(where, max_decoded):
            decoded[b, p] = True
    lengths = torch.tensor([len(s.prompt) for s in sequences])
    return {"text_ids": text, "codes": codes, "generated": generated, "decoded": decoded, "lengths": lengths}


# --- the model's training forward -------------------------------------------------------------------
def embed_speech_patches(lm: MiMoAudioLM, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """:func:`agent.lm.patch_encoder.embed_patches`, with the patch encoder run on the speech
    patches only (its output for the others is zero there, so the result is the same at a
    fraction of the work)."""
    cfg = lm.config
    is_speech = text_ids == cfg.empty_token_id  # (B, P)
    text = lm.model.embed_tokens(text_ids).masked_fill(is_speech.unsqueeze(-1), 0.0)
    if not bool(is_speech.any()):
        return text
    patches = codes[is_speech]  # (S, G, C)
    frames = sum(table(patches[..., c]).masked_fill((patches[..., c] == empty).unsqueeze(-1), 0.0)
                 for c, (table, empty) in enumerate(zip(lm.speech_embeddings, cfg.speech_empty_ids, strict=True)))
    encoded = lm.input_local_transformer(frames, causal=not cfg.input_full_attention)  # (S, G, D)
    speech = lm.speech_group_downcast(encoded.reshape(encoded.shape[0], -1))  # (S, hidden)
    return text.masked_scatter(is_speech.unsqueeze(-1), speech)


def length_groups(lengths: list[int]) -> list[list[int]]:
    """The rows of a right-padded batch split in two by length, so that running each part trimmed
    to its longest row computes the fewest positions (left whole unless that saves a fifth). A
    batch mixes short ASR examples with long dialogues: padded to the longest, about 45% of a
    training batch's backbone positions are padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ranked = [lengths[i] for i in order]
    n = len(ranked)
    if n < 2:
        return [order]
    # the first k rows padded to the k-th length, the rest to the longest
    cost, k = min((k * ranked[k - 1] + (n - k) * ranked[-1], k) for k in range(1, n))
    # a second forward costs its own launches: split only where it saves a fifth of the positions
    return [order[:k], order[k:]] if cost <= 0.8 * n * ranked[-1] else [order]


def backbone_hidden(lm: MiMoAudioLM, text_ids: torch.Tensor, codes: torch.Tensor,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Backbone hidden states (B, P, hidden) of whole sequences: the patch encoder, then causal
    attention at positions 0..P-1 (what prefill computes for a slot with no history). With the
    rows' ``lengths`` (the padding is on the right), the rows run in :func:`length_groups`, each
    trimmed to its longest: the same states at every position of a row (attention is causal, so
    no position sees the padding after it), and zeros past a group's end."""
    if lengths is None:
        return lm.model(embed_speech_patches(lm, text_ids, codes), causal=True)
    P = text_ids.shape[1]
    parts, rows = [], []
    for group in length_groups(lengths.tolist()):
        index = torch.tensor(group)
        n = int(lengths[index].max())
        h = lm.model(embed_speech_patches(lm, text_ids[index, :n], codes[index, :n]), causal=True)
        parts.append(F.pad(h, (0, 0, 0, P - n)))
        rows += group
    return torch.cat(parts)[torch.argsort(torch.tensor(rows))]  # back in the batch's order


def patch_decoder_logits(lm: MiMoAudioLM, h: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
    """The patch decoder teacher-forced on ``codes`` (N, G, C): step 0 reads the backbone state h
    (N, hidden), step t+1 the embeddings of the codes step t emits, as :func:`run_patch` feeds
    its own samples. Returns, per step and channel of the schedule, the logits (N, vocab) with the
    channel's empty id at -inf (it is never sampled)."""
    sched = lm.schedule
    inputs = [lm.hidden_states_downcast(h)]
    for t in range(sched.steps - 1):
        inputs.append(sum(lm.speech_embeddings[c](codes[:, f, c])
                          for c, f in zip(sched.channels[t], sched.frames[t], strict=True)))
    out = lm.local_transformer(torch.stack(inputs, dim=1), causal=True)  # (N, steps, D)
    logits = []
    for t in range(sched.steps):
        for c in sched.channels[t]:
            step = lm.local_transformer_lm_heads[c](out[:, t])
            logits.append(step.index_fill(1, torch.tensor([sched.empty_ids[c]]), float("-inf")))
    return logits


def patch_decoder_targets(lm: MiMoAudioLM, codes: torch.Tensor) -> list[torch.Tensor]:
    """The codes (N,) each entry of :func:`patch_decoder_logits` predicts."""
    sched = lm.schedule
    return [codes[:, f, c] for t in range(sched.steps) for c, f in zip(sched.channels[t], sched.frames[t],
                                                                       strict=True)]


def losses(lm: MiMoAudioLM, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text CE on every generated patch's text id, patch-decoder CE on every generated speech
    patch's codes; nothing on the prompt's positions. Also the accuracy of the text ids that are
    not ``<|empty|>`` (the words of the answers), which is what a listener reads."""
    text_ids, codes, generated = batch["text_ids"], batch["codes"], batch["generated"]
    h = backbone_hidden(lm, text_ids, codes, batch.get("lengths"))
    target = generated[:, 1:]
    decoded = batch["decoded"][:, 1:][target]  # (N,): the speech patches the patch decoder learns from
    hidden = h[:, :-1][target]  # (N, hidden): the state each generated patch is predicted from
    want = text_ids[:, 1:][target]  # (N,)
    text_logits = lm.lm_head(hidden)
    text = F.cross_entropy(text_logits, want)
    words = want != lm.config.empty_token_id
    word_acc = (text_logits[words].argmax(-1) == want[words]).float().mean() if bool(words.any()) else text * 0
    speech_rows = ~words & decoded
    if bool(speech_rows.any()):
        patch = codes[:, 1:][target][speech_rows]  # (M, G, C)
        pairs = zip(patch_decoder_logits(lm, hidden[speech_rows], patch), patch_decoder_targets(lm, patch),
                    strict=True)
        per_code = [F.cross_entropy(lg, tg) for lg, tg in pairs]
        speech = torch.stack(per_code).mean()
        channels = [c for t in range(lm.schedule.steps) for c in lm.schedule.channels[t]]
        channel0 = torch.stack([x for x, c in zip(per_code, channels, strict=True) if c == 0]).mean()
    else:
        speech = channel0 = text * 0
    return {"loss": text + speech, "text": text, "speech": speech, "speech_c0": channel0,
            "word_acc": word_acc.detach()}


def init_training_weights(lm: MiMoAudioLM, seed: int) -> None:
    """GPT-2 style: weights and embeddings N(0, 0.02), the residual outputs scaled by
    1/sqrt(2 layers), biases 0, norms 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    stack = lm.model if name.startswith("model.") else (
                        lm.local_transformer if name.startswith("local_") else lm.input_local_transformer)
                    std /= math.sqrt(2 * len(stack.layers))
                p.normal_(0.0, std, generator=gen)


# --- the run ---------------------------------------------------------------------------------------
@dataclass
class LMRecipe:
    size: str = "tiny-speech"
    seed: int = 0
    steps: int = 6000
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    vocab_size: int = 1024
    #: speech patches per batch whose codes the patch decoder learns from (drawn among the batch's)
    max_decoded: int = 64
    #: share of examples that are the ASR task (the transcriber's prompt) over the user utterances
    asr_share: float = 0.1
    #: a schedule for it: ``asr_share_from`` until step ``asr_ramp[0]``, then linearly to
    #: ``asr_share`` at step ``asr_ramp[1]`` and after (a low share first learns the task from
    #: dialogues, a high one later learns hearing); None: ``asr_share`` throughout
    asr_share_from: float | None = None
    asr_ramp: tuple[int, int] = (0, 0)
    #: share of examples that are the TTS task over the corpora's lexicon sentences; None: as
    #: often as the corpora hold them among their dialogues (1200 of 10680, so ~4.5% of the
    #: examples at asr_share 0.6: too few for the speech of new sentences to be learnt)
    tts_share: float | None = None
    #: share of the user's speech codes replaced by random ones (see :class:`SequenceBuilder`)
    user_code_noise: float = 0.15
    #: share of dialogues without the default instructions in the first user turn
    no_instructions_share: float = 0.1
    #: share of user turns typed rather than spoken (see :meth:`SequenceBuilder.dialogue`)
    text_user_share: float = 0.25
    #: codebooks of the user's speech the model reads (the config's ``input_speech_codebooks``,
    #: which the server applies too); None: all
    input_codebooks: int | None = None
    instructions: str = DEFAULT_SYSTEM_PROMPT
    extra: dict = field(default_factory=dict)


class LMTrainer(TrainLoop):
    LOSS_COLUMNS = ("loss", "text", "speech", "speech_c0", "word_acc")

    def __init__(self, recipe: LMRecipe, corpora: list[str | Path], out: str | Path, *,
                 tokenizer: TextTokenizer | None = None, init: str | Path | None = None):
        self.recipe, self.corpora, self.out = recipe, [Path(c) for c in corpora], Path(out)
        self.manifest, codes = read_corpora(self.corpora)
        self.init = None if init is None else Path(init)
        if self.init is not None:
            tokenizer = tokenizer or TextTokenizer.from_dir(self.init)
            # the weights read and write the codes of the corpora they were trained on
            trained = self.init / MANIFEST
            known = json.loads(trained.read_text()).get("data", []) if trained.is_file() else []
            check_same_codec([*(dict(c, path=f"{c['path']} (--init {self.init}'s corpus)") for c in known),
                              *self.manifest["corpora"]])
        self.tokenizer = tokenizer or train_tokenizer(tokenizer_texts(self.manifest, recipe.seed), recipe.vocab_size)
        self.config = lm_config(recipe.size, self.tokenizer, recipe.input_codebooks)
        torch.manual_seed(recipe.seed)
        self.lm = MiMoAudioLM(self.config)
        init_training_weights(self.lm, recipe.seed)
        if self.init is not None:
            from ..checkpoint import load_lm

            self.lm.load_state_dict(load_lm(self.init, dtype="fp32", device="cpu", tokenizer=self.tokenizer)[0]
                                    .state_dict())
        self.lm.requires_grad_(True).train()
        self.builder = PromptBuilder(self.tokenizer, self.config)
        self.sequences = SequenceBuilder(self.builder, codes, recipe.user_code_noise)
        decay = [p for n, p in self.lm.named_parameters() if p.dim() == 2 and "embed" not in n]
        other = [p for n, p in self.lm.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.rng = random.Random(recipe.seed)
        self.command: str | None = None
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict[str, float]] = []
        #: every validation ({"step", "spoken_acc", ...}) and the best one, whose weights are in best/
        self.validation: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.dialogues = self.manifest["dialogues"]
        self.users = self.manifest["users"]
        if not self.dialogues:
            raise ValueError(f"{', '.join(map(str, self.corpora))}: no dialogues")
        self.tts_dialogues = [d for d in self.dialogues if d["task"] == "tts"]
        self.conversations = [d for d in self.dialogues if d["task"] != "tts"]
        for name, share in (("asr_share", recipe.asr_share), ("asr_share_from", recipe.asr_share_from)):
            if share is not None and not 0 <= share <= 1:
                raise ValueError(f"{name} {share:g} must be in 0..1")
        start, end = recipe.asr_ramp
        if not 0 <= start <= end:
            raise ValueError(f"asr_ramp {start}..{end}: the steps must be 0 <= start <= end")
        most = max(recipe.asr_share, recipe.asr_share_from or 0.0)
        if recipe.tts_share is not None:
            if not 0 <= recipe.tts_share <= 1 - most:
                raise ValueError(f"tts_share {recipe.tts_share:g} must be in 0..{1 - most:g} "
                                 f"(1 - the largest ASR share: the rest are dialogues)")
            if recipe.tts_share and not self.tts_dialogues:
                raise ValueError(f"tts_share {recipe.tts_share:g}: {', '.join(map(str, self.corpora))} "
                                 "have no TTS sentences")

    def _lr_factor(self, step: int) -> float:
        r = self.recipe
        return warmup_cosine(step, r.warmup, r.steps, r.final_lr_fraction)

    def asr_share(self, step: int) -> float:
        """The share of ASR examples at ``step`` (see :attr:`LMRecipe.asr_ramp`)."""
        r = self.recipe
        start, end = r.asr_ramp
        if r.asr_share_from is None or step >= end:
            return r.asr_share
        if step < start:
            return r.asr_share_from
        return r.asr_share_from + (r.asr_share - r.asr_share_from) * (step - start) / (end - start)

    def example(self) -> Sequence:
        r, rng = self.recipe, self.rng
        asr_share = self.asr_share(self.step)
        if rng.random() < asr_share:
            user = rng.choice(self.users)
            return self.sequences.asr(user["key"], user["text"], rng)
        if r.tts_share is None:  # the corpora's own mix
            d = rng.choice(self.dialogues)
        else:  # of what is not ASR, the TTS share (of all examples) is drawn from the sentences
            tts = rng.random() * (1 - asr_share) < r.tts_share
            d = rng.choice(self.tts_dialogues if tts else self.conversations)
        if d["task"] == "tts":
            return self.sequences.tts(d["text"], d["agent"])
        instructions = None if rng.random() < r.no_instructions_share else r.instructions
        typed = [rng.random() < r.text_user_share for _ in d["turns"]] if r.text_user_share else None
        return self.sequences.dialogue(d["turns"], instructions, rng, typed)

    def validation_sets(self) -> dict[str, list[Sequence]]:
        """The corpus' held-out questions (held-out voices, never trained on) with their answers,
        as single-turn dialogues with the default instructions: spoken, and typed as written."""
        agent = {a["text"]: a["key"] for a in self.manifest["agents"]}
        turns = [{"user": h["key"], "text": h["text"], "answer": h["answer"], "agent": agent[h["answer"]]}
                 for h in self.manifest["held_out"] if h.get("answer") in agent]
        if not turns:
            raise ValueError(f"{', '.join(map(str, self.corpora))}: no held-out questions to validate on")
        return {kind: [self.sequences.dialogue([t], self.recipe.instructions, typed=[kind == "typed"]) for t in turns]
                for kind in ("spoken", "typed")}

    @torch.no_grad()
    def validate(self, batch: int = 32) -> dict[str, float]:
        """Teacher-forced, per set: the text loss of the answers and the share of answers whose
        every text id (the words, ``<|eot|>``, ``<|eostm|>``) is the model's most likely one."""
        if not hasattr(self, "_validation"):
            self._validation = self.validation_sets()
        self.lm.eval()
        out: dict[str, float] = {}
        for kind, sequences in self._validation.items():
            loss = right = 0.0
            for start in range(0, len(sequences), batch):
                b = collate(sequences[start : start + batch], self.builder, random.Random(0))
                h = backbone_hidden(self.lm, b["text_ids"], b["codes"], b["lengths"])[:, :-1]
                want, target = b["text_ids"][:, 1:], b["generated"][:, 1:]
                logits = self.lm.lm_head(h)
                words = target & (want != self.config.empty_token_id)
                loss += float(F.cross_entropy(logits[target], want[target])) * len(want)
                wrong = words & (logits.argmax(-1) != want)
                right += float((~wrong.any(1)).sum())
            out[f"{kind}_text"] = round(loss / len(sequences), 5)
            out[f"{kind}_acc"] = round(right / len(sequences), 5)
        self.lm.train()
        return out

    def batch(self) -> dict[str, torch.Tensor]:
        return collate([self.example() for _ in range(self.recipe.batch)], self.builder, self.rng,
                       self.recipe.max_decoded)

    def batch_losses(self) -> dict[str, torch.Tensor]:
        return losses(self.lm, self.batch())

    def parameters(self):
        return self.lm.parameters()

    def run(self, *, log_every: int = 25, save_minutes: float = 10.0, stop_at: int | None = None,
            max_seconds: float | None = None, publish: str | Path | None = None, validate_every: int | None = None,
            log=print) -> Path:
        """Train to ``recipe.steps`` (or stop, saved and resumable, at ``stop_at`` / after
        ``max_seconds``), saving every ``save_minutes``; each save is also published to
        ``publish`` (a symlink switched atomically to a complete checkpoint). Every
        ``validate_every`` steps (and at ``recipe.steps``), :meth:`validate` and keep the best in ``best/``."""
        def after_step() -> None:
            if validate_every and (self.step % validate_every == 0 or self.step == self.recipe.steps):
                self.check(log)

        return self.train(lambda: self.save(publish), log_every=log_every, stop_at=stop_at,
                          max_seconds=max_seconds, save_minutes=save_minutes, log=log, after_step=after_step)

    def check(self, log=print) -> None:
        """Validate now; better than the best so far (the answers right, spoken and typed counted
        alike, since the model serves both; then the lower spoken text loss), its weights and
        manifest go to ``best/``."""
        result = {"step": self.step, **self.validate()}
        self.validation.append(result)

        def rank(v: dict[str, float]) -> tuple[float, float]:
            return v["spoken_acc"] + v["typed_acc"], -v["spoken_text"]

        better = self.best is None or rank(result) > rank(self.best)
        if better:
            self.best = result
            self.lm.eval()
            save_lm(self.lm, self.out / BEST, tokenizer=self.tokenizer)
            self.lm.train()
            self.write_manifest(self.out / BEST)
        log("validation " + " ".join(f"{k} {v}" for k, v in result.items()) + (" (best)" if better else ""))

    def save(self, publish: str | Path | None = None) -> None:
        self.lm.eval()
        save_lm(self.lm, self.out, tokenizer=self.tokenizer)
        self.lm.train()
        torch.save({"step": self.step, "seconds": self.seconds, "model": self.lm.state_dict(),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "rng": self.rng.getstate(), "history": self.history, "recipe": asdict(self.recipe),
                    "validation": self.validation, "best": self.best},
                   self.out / STATE)
        self.write_manifest()
        if publish is not None:
            publish_checkpoint(self.out, Path(publish), self.step)

    def write_manifest(self, directory: Path | None = None) -> None:
        params = sum(p.numel() for p in self.lm.parameters())
        manifest = {
            "format": FORMAT,
            "command": self.command,
            "recipe": asdict(self.recipe),
            "model": {"size": self.recipe.size, "parameters": params, "config": SIZES[self.recipe.size],
                      "text_vocab": self.tokenizer.vocab_size, "weights_dtype": "fp32"},
            "data": self.manifest["corpora"],
            "init": None if self.init is None else {"path": str(self.init), "training": _training_of(self.init)},
            **run_record(self.step, self.history, self.seconds),
            "validation": {"set": "the corpora's held-out questions (held-out voices), spoken and typed, "
                                  "teacher-forced", "best": self.best, "history": self.validation},
        }
        (directory or self.out).mkdir(parents=True, exist_ok=True)
        (directory or self.out).joinpath(MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    def resume(self) -> None:
        state = torch.load(self.out / STATE, weights_only=False)
        check_resume_recipe(state["recipe"], self.recipe, self.out / STATE)
        self.lm.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.validation, self.best = state.get("validation", []), state.get("best")


def _training_of(checkpoint: Path) -> dict | None:
    """The ``training.json`` of a checkpoint a run starts from (its recipe is part of this one's)."""
    path = checkpoint / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


#: what a published checkpoint holds (the loadable files, not the training state)
PUBLISHED = ("config.json", "model.safetensors", "tokenizer.json", MANIFEST, LOSS_LOG)


def publish_checkpoint(out: Path, link: Path, step: int) -> Path:
    """Copy the loadable files of ``out`` to ``<link>.d/step-N`` and point the symlink ``link`` at
    it atomically, so a reader of ``link`` always finds a whole checkpoint; the copies other than
    this one and the one ``link`` pointed at until now (a reader may be loading it) are removed."""
    store = link.parent / f"{link.name}.d"
    target = store / f"step-{step:06d}"
    tmp = store / f".tmp-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in PUBLISHED:
        shutil.copy2(out / name, tmp / name)
    previous = link.resolve() if link.is_symlink() else None
    if target.resolve() == previous:  # republished at the same step: switch through a fresh name
        target = store / f"step-{step:06d}-{time.monotonic_ns()}"
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    new_link = link.parent / f".{link.name}.new"
    if new_link.is_symlink() or new_link.exists():
        new_link.unlink()
    new_link.symlink_to(target.resolve())
    os.replace(new_link, link)
    for old in store.glob("step-*"):
        if old.resolve() not in (target.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)
    return target


def add_arguments(parser) -> None:
    d = LMRecipe()
    parser.add_argument("--data", required=True, nargs="+",
                        help="dialogue corpora made by `mimo-agent train dialogue-data` (one or more)")
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint's weights and tokenizer (a previous run; default: none, "
                             "seeded random weights and a tokenizer trained on the corpora's text)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (official layout)")
    parser.add_argument("--size", default=d.size, choices=sorted(SIZES), help=f"model size (default {d.size})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"weights, tokenizer text and batches (default {d.seed})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default {d.batch})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help=f"steps of linear warm-up, then a cosine to {d.final_lr_fraction:g} x lr "
                             f"(default {d.warmup})")
    parser.add_argument("--log-every", type=int, default=25, help="steps per line of losses.tsv (default 25)")
    parser.add_argument("--user-code-noise", type=float, default=d.user_code_noise,
                        help=f"user speech codes replaced by random ones, a share (default {d.user_code_noise:g})")
    parser.add_argument("--text-user-share", type=float, default=d.text_user_share,
                        help=f"user turns typed (their text in the user turn) rather than spoken, a share "
                             f"(default {d.text_user_share:g})")
    parser.add_argument("--asr-share", type=float, default=d.asr_share,
                        help=f"examples that are the ASR task over the user utterances, a share "
                             f"(default {d.asr_share:g})")
    parser.add_argument("--asr-share-from", type=float, default=None,
                        help="the ASR share at the start, held until the first step of --asr-ramp and then "
                             "moved linearly to --asr-share by its second (default: --asr-share throughout)")
    parser.add_argument("--asr-ramp", type=int, nargs=2, default=d.asr_ramp, metavar=("START", "END"),
                        help="the steps between which the ASR share moves from --asr-share-from to --asr-share "
                             "(default: %(default)s)")
    parser.add_argument("--tts-share", type=float, default=d.tts_share,
                        help="examples that are the TTS task over the corpora's lexicon sentences, a share (at "
                             "most 1 - the ASR share; default: as often as the corpora hold them among their "
                             "dialogues, ~4.5%% of the examples at --asr-share 0.6)")
    parser.add_argument("--input-codebooks", type=int, default=d.input_codebooks,
                        help="codebooks of the user's speech the model reads, the coarse ones first (written to "
                             "config.json as input_speech_codebooks, which serving applies too; default: all)")
    parser.add_argument("--validate-every", type=int, default=None,
                        help="steps between validations on the corpora's held-out questions; the best checkpoint "
                             "is kept in OUT/best (default: none)")
    parser.add_argument("--save-minutes", type=float, default=10.0,
                        help="minutes between checkpoints (default 10; one is always written at the end)")
    parser.add_argument("--publish", default=None,
                        help="also publish each checkpoint as this symlink (to a complete copy), for readers "
                             "that load it while training goes on (default: none)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (saved, resumable) after this many minutes of this invocation (default: none)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop (saved, resumable) at this step (default: run to --steps)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy 2-core machine)")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = LMRecipe(size=args.size, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
                      warmup=args.warmup, user_code_noise=args.user_code_noise, text_user_share=args.text_user_share,
                      asr_share=args.asr_share, asr_share_from=args.asr_share_from, asr_ramp=tuple(args.asr_ramp),
                      tts_share=args.tts_share, input_codebooks=args.input_codebooks)
    tokenizer = None
    if args.resume:
        tokenizer = TextTokenizer.from_dir(args.out)
    trainer = LMTrainer(recipe, args.data, args.out, tokenizer=tokenizer, init=args.init)
    trainer.command = (f"mimo-agent train lm --data {' '.join(args.data)} --out {args.out} --size {args.size} "
                       + (f"--init {args.init} " if args.init else "") +
                       f"--seed {args.seed} --steps {args.steps} --batch {args.batch} --lr {args.lr:g} "
                       f"--warmup {args.warmup} --user-code-noise {args.user_code_noise:g}"
                       + f" --text-user-share {args.text_user_share:g} --asr-share {args.asr_share:g}"
                       + (f" --asr-share-from {args.asr_share_from:g} --asr-ramp {' '.join(map(str, args.asr_ramp))}"
                          if args.asr_share_from is not None else "")
                       + (f" --tts-share {args.tts_share:g}" if args.tts_share is not None else "")
                       + (f" --input-codebooks {args.input_codebooks}" if args.input_codebooks else "")
                       + (f" --validate-every {args.validate_every}" if args.validate_every else "")
                       + (f" --threads {args.threads}" if args.threads else ""))
    if args.resume:
        trainer.resume()
        print(f"resumed {args.out} at step {trainer.step}", flush=True)
    max_seconds = None if args.max_minutes is None else args.max_minutes * 60
    trainer.run(log_every=args.log_every, save_minutes=args.save_minutes, max_seconds=max_seconds,
                stop_at=args.stop_at, publish=args.publish, validate_every=args.validate_every,
                log=lambda m: print(m, flush=True))
    print(f"wrote {os.fspath(args.out)}: {trainer.final_losses()}")
    return 0
