"""The language model's closed-domain dialogues: ``mimo-agent train dialogue-data``.

Tasks (the answer is always what :func:`answer` computes from the question's text):

- greetings ("Hello.", "Good morning, how are you?") -> "Hello, how are you?" / "I am fine, thank you.";
- "What is A plus B?", "What is A minus B?" (0 <= A, B <= 10) -> the number in words, a negative
  one as "minus three";
- "What comes after N?" (0 <= N <= 19) -> N + 1 in words;
- "Repeat after me: WORD." over :data:`agent.train.lexicon.REPEATABLE` -> "WORD";
- follow-ups that need the previous answer: "And plus one more?" / "And minus one?" -> the last
  number answered + 1 / - 1 (2 and 3 turn dialogues);
- text to speech of lexicon sentences (MiMo's TTS template, no user audio);
- hearing only (``--asr-sentences N``): lexicon sentences in the user voices, which no dialogue
  uses; the LM's ASR examples draw from every user utterance, so these give each lexicon word many
  more hearings in many voices than the "repeat after me" questions alone.

User turns are spoken by the training voices of :mod:`agent.train.data` (never the held-out ones)
with the corpus' sox augmentation, one fresh voice and augmentation per utterance; a pool of user
utterances is synthesised once and the dialogues reuse it (a question appears alone and as the
first turn of follow-ups). The agent always speaks in one voice (``--agent-voice``, default
:data:`AGENT_VOICE`), unaugmented, so the
same answer text always has the same codes. Audio is kept as the codes of the frozen
``tiny-speech`` codec: ``codes.npz`` (``u00012`` user utterances, ``a00003`` agent utterances)
next to ``manifest.json`` (recipe, the codec's ``codes_digest``, tools, every utterance and
dialogue). A ``held_out/`` split of questions in the held-out voices (wav files and codes) is for
evaluation only.

Everything is drawn from the seed, so the same seed and tools give the same manifest and codes.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..codec.audio import load_wav
from .common import read_manifest_of
from .data import ENGINE_WEIGHTS, ESPEAK_ACCENTS, HELD_OUT_VOICES, TRAIN_VOICES, AugmentRecipe
from .lexicon import GREETINGS, NUMBERS, REPEATABLE, SentenceGenerator
from .voices import Augmentation, VoiceError, split_voice, synthesize, synthesize_raw, tool_versions

MANIFEST = "manifest.json"
CODES = "codes.npz"
FORMAT = "mimo-agent dialogue corpus"
#: the agent's one voice (``--agent-voice``): of the installed voices, the one the benchmark's
#: recognizer hears best through the codec (on the domain's 181 answers, 16% WER through codec A2T
#: against flite:kal16's 27%, the default until 2026-12-06; BENCHMARKS.md "Run W")
AGENT_VOICE = "flite:awb"
#: the codec the codes are made with (frozen; the LM reads and writes its codes)
DEFAULT_CODEC = str(Path(__file__).resolve().parent.parent / "presets" / "tiny-speech-codec")

#: follow-up question -> what it adds to the previous number
FOLLOW_UPS = {"And plus one more?": 1, "And minus one?": -1}
GREETING_ANSWER = "Hello, how are you?"
HOW_ARE_YOU_ANSWER = "I am fine, thank you."
TENS = {20: "twenty", 30: "thirty"}

#: espeak-ng variants outside the codec corpus' list, none a relative of a held-out one (no f4,
#: m6 or steph*) and none a whisper or a robot
WIDE_ESPEAK_VARIANTS = (
    "Alex", "Alicia", "Andrea", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky",
    "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "Storm", "adam", "anika", "announcer", "antonio", "aunty",
    "boris", "caleb", "ed", "edward2", "fast", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4",
    "john", "klatt2", "klatt3", "klatt4", "m8", "marcelo", "max", "michel", "miguel", "norbert", "pablo", "pedro",
    "rob", "sandro", "shelby",
)
#: ``--voices wide``: every accent with those variants, and the one installed flite voice the codec
#: corpus leaves out (every other non-held-out flite and festival voice Debian has is already in)
WIDE_VOICES = (*(f"espeak-ng:{a}+{v}" for a in ESPEAK_ACCENTS for v in WIDE_ESPEAK_VARIANTS), "flite:awb_time")
#: ``--voices wide``: more of the engines whose held-out voices are heard worst
WIDE_ENGINE_WEIGHTS = {"espeak-ng": 0.5, "flite": 0.3, "festival": 0.2}


def number_words(n: int) -> str:
    """``7`` -> "seven", ``-3`` -> "minus three", ``21`` -> "twenty one" (|n| < 40)."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < len(NUMBERS):
        return NUMBERS[n]
    tens, unit = divmod(n, 10)
    if tens * 10 not in TENS:
        raise ValueError(f"{n} is outside the numbers this domain says")
    return TENS[tens * 10] + ("" if unit == 0 else " " + NUMBERS[unit])


@dataclass(frozen=True)
class Question:
    """A user turn: its text and kind, and the number its answer is (None for non-numbers)."""

    kind: str
    text: str
    value: int | None = None  # the numeric answer, or the follow-up's step
    answer_text: str | None = None  # the answer of a non-numeric question


def questions() -> dict[str, list[Question]]:
    """Every question of the domain, by kind (follow-ups are answered from the history)."""
    out: dict[str, list[Question]] = {"greeting": [], "plus": [], "minus": [], "after": [], "repeat": [],
                                      "follow_up": []}
    for g in GREETINGS:
        cap = g[0].upper() + g[1:]
        out["greeting"].append(Question("greeting", f"{cap}.", answer_text=GREETING_ANSWER))
        out["greeting"].append(Question("greeting", f"{cap}, how are you?", answer_text=HOW_ARE_YOU_ANSWER))
    out["greeting"].append(Question("greeting", "How are you?", answer_text=HOW_ARE_YOU_ANSWER))
    for a in range(11):
        for b in range(11):
            out["plus"].append(Question("plus", f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", a + b))
            out["minus"].append(Question("minus", f"What is {NUMBERS[a]} minus {NUMBERS[b]}?", a - b))
    for n in range(20):
        out["after"].append(Question("after", f"What comes after {NUMBERS[n]}?", n + 1))
    for word in REPEATABLE:
        out["repeat"].append(Question("repeat", f"Repeat after me: {word}.", answer_text=word))
    for text, step in FOLLOW_UPS.items():
        out["follow_up"].append(Question("follow_up", text, step))
    return out


def answer(question: Question, previous: int | None = None) -> tuple[str, int | None]:
    """(answer text, the number it is or None) of ``question``; a follow-up needs ``previous``."""
    if question.kind == "follow_up":
        if previous is None:
            raise ValueError(f"{question.text!r} needs a previous number")
        value = previous + int(question.value or 0)
        return number_words(value), value
    if question.value is not None:
        return number_words(question.value), question.value
    assert question.answer_text is not None
    return question.answer_text, None


@dataclass
class DialogueRecipe:
    seed: int = 0
    #: user utterances synthesised per kind of question (the pool the dialogues draw from)
    utterances: dict[str, int] = field(default_factory=lambda: {
        "greeting": 120, "plus": 700, "minus": 700, "after": 240, "repeat": 500, "follow_up": 240})
    #: dialogues of 2 and 3 turns whose later turns may need the earlier answers
    multi_turn: int = 900
    #: lexicon sentences for the TTS task
    tts_sentences: int = 400
    #: lexicon sentences in the user voices for the ASR task only (drawn last, from their own
    #: stream: the rest of the corpus is the same seed's without them)
    asr_sentences: int = 0
    #: held-out questions per held-out voice (evaluation only)
    held_out_per_voice: int = 12
    agent_voice: str = AGENT_VOICE
    held_out_voices: tuple[str, ...] = HELD_OUT_VOICES
    augment: AugmentRecipe = field(default_factory=AugmentRecipe)
    codec: str = DEFAULT_CODEC
    sample_rate: int = 24000
    #: user voices on top of the codec corpus' :data:`TRAIN_VOICES` (``--voices wide``: :data:`WIDE_VOICES`)
    extra_voices: tuple[str, ...] = ()
    #: share of user utterances per engine (absent from corpora made before it: the default)
    engine_weights: dict[str, float] = field(default_factory=lambda: dict(ENGINE_WEIGHTS))

    def user_voices(self) -> dict[str, list[str]]:
        """The training voices by engine, less the agent's own and any held-out voice."""
        out = {engine: [v for v in voices if v != self.agent_voice and v not in self.held_out_voices]
               for engine, voices in TRAIN_VOICES.items()}
        for voice in self.extra_voices:
            if voice in self.held_out_voices:
                raise ValueError(f"extra voice {voice} is a held-out voice")
            engine = split_voice(voice)[0]
            if voice != self.agent_voice and voice not in out.setdefault(engine, []):
                out[engine].append(voice)
        return out

    def draw_voice(self, rng: random.Random) -> str:
        """A user voice: an engine by :attr:`engine_weights` (espeak-ng has far more voices, but
        few speakers), then one of its voices."""
        voices = self.user_voices()
        engines = [e for e in self.engine_weights if voices.get(e)]
        return rng.choice(voices[rng.choices(engines, [self.engine_weights[e] for e in engines])[0]])


class _Speaker:
    """Synthesises utterances (two at a time: the tools are separate processes) into a scratch
    directory and encodes them with the codec."""

    def __init__(self, recipe: DialogueRecipe, scratch: Path):
        from ..codec import load_audio_tokenizer

        self.recipe, self.scratch = recipe, scratch
        self.codec = load_audio_tokenizer(recipe.codec, dtype="fp32", device="cpu")

    def speak(self, jobs: list[tuple[str, str, str, Augmentation]], keep: Path | None = None) -> list[np.ndarray]:
        """Codes (T, 8) int16 of each (key, voice, text, augmentation); wavs kept under ``keep``."""
        def one(job: tuple[str, str, str, Augmentation]) -> Path:
            key, voice, text, augment = job
            path = (keep or self.scratch) / f"{key}.wav"
            synthesize(voice, text, path, augment, self.recipe.sample_rate)
            return path

        with ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(one, jobs))
        wavs = [load_wav(p, self.recipe.sample_rate) for p in paths]
        codes = []
        for start in range(0, len(wavs), 32):
            codes += [c.numpy().astype(np.int16) for c in self.codec.encode_batch(wavs[start : start + 32])]
        if keep is None:
            for p in paths:
                p.unlink()
        return codes


def generate(out: str | Path, recipe: DialogueRecipe, *, command: str = "", log=print) -> dict:
    """Write the dialogue corpus of ``recipe`` under ``out`` (manifest.json, codes.npz, held_out/)."""
    out = Path(out)
    (out / "held_out").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rng = random.Random(f"{recipe.seed}/dialogues")
    by_kind = questions()

    # the pool of user utterances: a question, a voice and an augmentation each
    users: list[dict] = []

    def add_user(kind: str, text: str, draw: random.Random) -> None:
        users.append({"key": f"u{len(users):05d}", "kind": kind, "text": text, "voice": recipe.draw_voice(draw),
                      "augment": recipe.augment.draw(draw).to_dict()})

    for kind, count in recipe.utterances.items():
        for _ in range(count):
            add_user(kind, rng.choice(by_kind[kind]).text, rng)
    held_out: list[dict] = []
    for voice in recipe.held_out_voices:
        for i in range(recipe.held_out_per_voice):
            kind = ("plus", "minus", "after", "repeat", "greeting", "follow_up")[i % 6]
            q = rng.choice(by_kind[kind])
            expected = None if kind == "follow_up" else answer(q)[0]  # a follow-up's depends on the history
            held_out.append({"key": f"h{len(held_out):05d}", "kind": kind, "text": q.text, "voice": voice,
                             "answer": expected, "file": f"held_out/h{len(held_out):05d}.wav"})
    texts = {q.text: q for qs in by_kind.values() for q in qs}

    # dialogues: every non-follow-up utterance alone, then multi-turn ones over the pool
    dialogues: list[dict] = []
    pool = {kind: [u for u in users if u["kind"] == kind] for kind in by_kind}
    numeric = pool["plus"] + pool["minus"] + pool["after"]
    for u in users:
        if u["kind"] != "follow_up":
            dialogues.append({"task": "dialogue", "turns": [_turn(u, texts, None)[0]]})
    for _ in range(recipe.multi_turn):
        first = rng.choice(numeric if rng.random() < 0.8 else pool["greeting"] + pool["repeat"])
        turn, previous = _turn(first, texts, None)
        turns = [turn]
        for _ in range(rng.choice((1, 1, 2))):
            if previous is not None and rng.random() < 0.7:
                drawn = rng.sample(pool["follow_up"], min(4, len(pool["follow_up"])))
                candidates = [u for u in drawn if -10 <= previous + int(texts[u["text"]].value or 0) <= 21]
                nxt = candidates[0] if candidates else rng.choice(numeric)
            else:
                nxt = rng.choice(numeric + pool["greeting"] + pool["repeat"])
            turn, value = _turn(nxt, texts, previous)
            previous = value if value is not None else previous
            turns.append(turn)
        dialogues.append({"task": "dialogue", "turns": turns})
    sentences = SentenceGenerator(recipe.seed * 2 + 7)
    for _ in range(recipe.tts_sentences):
        dialogues.append({"task": "tts", "text": sentences.statement()})
    heard, heard_rng = SentenceGenerator(recipe.seed * 2 + 8), random.Random(f"{recipe.seed}/asr-sentences")
    for _ in range(recipe.asr_sentences):
        add_user("sentence", heard.sentence(), heard_rng)
    # the agent's utterances: one per distinct answer text
    agent_texts = sorted({t["answer"] for d in dialogues for t in d.get("turns", [])}
                         | {d["text"] for d in dialogues if d["task"] == "tts"})
    agents = [{"key": f"a{i:05d}", "text": t, "voice": recipe.agent_voice} for i, t in enumerate(agent_texts)]
    agent_key = {a["text"]: a["key"] for a in agents}
    for d in dialogues:
        if d["task"] == "tts":
            d["agent"] = agent_key[d["text"]]
        for t in d.get("turns", []):
            t["agent"] = agent_key[t["answer"]]

    codes: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="mimo-dialogue-") as scratch:
        speaker = _Speaker(recipe, Path(scratch))
        codec_digest = speaker.codec.codes_digest()
        # a batch's wavs are held in memory until encoded; the agent's batch is a multiple of the
        # codec's 32, so its codes are those of the corpora made when it was one batch
        for name, entries, batch in (("user", users, 200), ("agent", agents, 192)):
            for start in range(0, len(entries), batch):
                chunk = entries[start : start + batch]
                jobs = [(e["key"], e["voice"], e["text"], Augmentation(**e.get("augment", {}))) for e in chunk]
                for e, c in zip(chunk, speaker.speak(jobs), strict=True):
                    codes[e["key"]], e["frames"] = c, len(c)
                log(f"{name} utterances: {start + len(chunk)}/{len(entries)} ({time.monotonic() - started:.0f} s)")
        jobs = [(h["key"], h["voice"], h["text"], Augmentation()) for h in held_out]  # held out: unaugmented
        for h, c in zip(held_out, speaker.speak(jobs, keep=out / "held_out"), strict=True):
            codes[h["key"]], h["frames"] = c, len(c)
    np.savez_compressed(out / CODES, **codes)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "command": command,
        "recipe": asdict(recipe),
        # which codes these are: corpora of different codecs cannot train one LM (read_corpora)
        "codec_digest": codec_digest,
        "tools": tool_versions(),
        "counts": {"user_utterances": len(users), "agent_utterances": len(agents), "dialogues": len(dialogues),
                   "held_out": len(held_out)},
        "minutes": {"user": round(sum(u["frames"] for u in users) / 25 / 60, 2),
                    "agent": round(sum(a["frames"] for a in agents) / 25 / 60, 2)},
        "seconds": round(time.monotonic() - started, 1),
        "users": users,
        "agents": agents,
        "dialogues": dialogues,
        "held_out": held_out,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"wrote {len(dialogues)} dialogues ({len(users)} user and {len(agents)} agent utterances, "
        f"{len(held_out)} held out) to {out} in {manifest['seconds']:.0f} s")
    return manifest


def _turn(user: dict, texts: dict[str, Question], previous: int | None) -> tuple[dict, int | None]:
    """A dialogue turn for a user utterance: {"user": key, "text", "answer"} and the answer's number."""
    q = texts[user["text"]]
    if q.kind == "follow_up" and previous is None:
        previous = 0
    text, value = answer(q, previous)
    return {"user": user["key"], "text": user["text"], "answer": text}, value


# --- reading ---------------------------------------------------------------------------------------
def read_corpus(corpus: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, codes by key) of a dialogue corpus."""
    manifest = read_manifest_of(Path(corpus) / MANIFEST, FORMAT, f"mimo-agent train dialogue-data --out {corpus}")
    with np.load(Path(corpus) / CODES) as z:
        codes = {k: z[k].astype(np.int64) for k in z.files}
    return manifest, codes


def read_corpora(corpora: list[str | Path]) -> tuple[dict, dict[str, np.ndarray]]:
    """Several corpora as one: their users, agents, dialogues and held-out questions, keys
    prefixed by the corpus' index (``1:u00012``), and ``corpora`` (each one's path, command,
    recipe and counts)."""
    merged: dict = {"users": [], "agents": [], "dialogues": [], "held_out": [], "corpora": []}
    codes: dict[str, np.ndarray] = {}
    for i, corpus in enumerate(corpora):
        manifest, own = read_corpus(corpus)

        def key(k: str, i: int = i) -> str:
            return f"{i}:{k}"

        codes.update({key(k): v for k, v in own.items()})
        for name in ("users", "agents", "held_out"):
            merged[name] += [dict(e, key=key(e["key"])) for e in manifest[name]]
        for d in manifest["dialogues"]:
            d = dict(d, turns=[dict(t, user=key(t["user"]), agent=key(t["agent"])) for t in d.get("turns", [])])
            if "agent" in d:
                d["agent"] = key(d["agent"])
            merged["dialogues"].append(d)
        merged["corpora"].append({"path": str(corpus), **{k: manifest.get(k) for k in
                                                          ("command", "recipe", "codec_digest", "counts", "minutes")}})
    check_same_codec(merged["corpora"])
    check_same_agent_voice(merged["corpora"])
    return merged, codes


def check_same_agent_voice(corpora: list[dict]) -> None:
    """Refuse corpora whose agent speaks in different voices, naming two of them: the model learns
    to speak in one voice."""
    voices = [(c["path"], (c.get("recipe") or {}).get("agent_voice")) for c in corpora]
    for path, voice in voices[1:]:
        if voice != voices[0][1]:
            raise ValueError(f"{path}'s agent speaks in {voice} and {voices[0][0]}'s in {voices[0][1]}: the model "
                             f"speaks in one voice; make the corpora with the same `train dialogue-data "
                             f"--agent-voice`")


def check_same_codec(corpora: list[dict]) -> None:
    """Refuse corpora (``read_corpora``'s ``corpora`` entries: path, recipe, codec_digest) whose codes
    come from different codecs, naming two of them. A corpus made before the digest was recorded
    cannot be checked and passes."""
    known = [c for c in corpora if c.get("codec_digest")]
    for c in known[1:]:
        if c["codec_digest"] != known[0]["codec_digest"]:
            a, b = known[0], c
            raise ValueError(
                f"{b['path']} and {a['path']} hold the codes of different codecs (codec_digest "
                f"{b['codec_digest'][:12]}... from {b['recipe'].get('codec')}, {a['codec_digest'][:12]}... from "
                f"{a['recipe'].get('codec')}): one LM reads and writes one codec's codes; make the corpora "
                f"with the same `train dialogue-data --codec`")


def scaled(recipe: DialogueRecipe, scale: float) -> DialogueRecipe:
    """The recipe with every count multiplied by ``scale`` (at least 1 each): small corpora for tests."""
    recipe.utterances = {k: max(1, round(v * scale)) for k, v in recipe.utterances.items()}
    recipe.multi_turn = max(1, round(recipe.multi_turn * scale))
    recipe.tts_sentences = max(1, round(recipe.tts_sentences * scale))
    recipe.held_out_per_voice = max(1, round(recipe.held_out_per_voice * scale))
    return recipe


#: ``--formant-share``'s default: the share of user utterances whose formants move
FORMANT_SHARE = 0.7


def add_arguments(parser) -> None:
    d = DialogueRecipe()
    parser.add_argument("--out", required=True, help="corpus directory to write (manifest.json, codes.npz, held_out/)")
    parser.add_argument("--seed", type=int, default=0, help="draws questions, voices and augmentation (default 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"multiply every count (default 1: {sum(d.utterances.values())} user utterances, "
                             f"{d.multi_turn} multi-turn dialogues, {d.tts_sentences} TTS sentences, "
                             f"{d.held_out_per_voice} held-out questions per held-out voice)")
    parser.add_argument("--codec", default=DEFAULT_CODEC, help="audio tokenizer checkpoint (default: the shipped "
                                                               "tiny-speech codec)")
    parser.add_argument("--agent-voice", default=AGENT_VOICE,
                        help=f"the one voice the agent speaks in, unaugmented (default {AGENT_VOICE}); never a "
                             "held-out voice; it leaves the user voices and the default joins them")
    parser.add_argument("--voices", choices=("codec", "wide"), default="codec",
                        help="user voices: 'codec' (default) the codec corpus' training voices; 'wide' adds "
                             f"{len(WIDE_VOICES)} more (espeak-ng variants, flite:awb_time) and draws more flite "
                             "and festival utterances")
    parser.add_argument("--tts-sentences", type=int, default=None,
                        help="lexicon sentences for the TTS task (default: the scaled recipe's)")
    parser.add_argument("--asr-sentences", type=int, default=0,
                        help="lexicon sentences spoken by the user voices for the ASR task only: more hearings "
                             "of the lexicon's words in many voices (default 0)")
    parser.add_argument("--formant-shift", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="move the formants of --formant-share of the user utterances by a factor drawn from "
                             "LO..HI (0.5..2; e.g. 0.85 1.18): other vocal-tract lengths at the same pitch, "
                             "more speakers than the installed voices (default: none)")
    parser.add_argument("--formant-share", type=float, default=None,
                        help=f"share of user utterances whose formants move, with --formant-shift "
                             f"(default {FORMANT_SHARE})")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--tts-only", action="store_true",
                      help="only the TTS task (agent voice): no user utterances, dialogues or held-out questions")
    only.add_argument("--asr-only", action="store_true",
                      help="only the --asr-sentences: no questions, dialogues, TTS or held-out questions")


def recipe_of(args) -> DialogueRecipe:
    """The recipe the command line asks for (every choice lands in the manifest's recipe)."""
    recipe = scaled(DialogueRecipe(seed=args.seed, codec=args.codec), args.scale)
    if args.agent_voice in recipe.held_out_voices:
        raise ValueError(f"--agent-voice {args.agent_voice} is a held-out voice: the benchmark's questions are "
                         "asked in it, so the agent cannot speak in it")
    try:
        split_voice(args.agent_voice)
    except VoiceError as exc:
        raise ValueError(f"--agent-voice: {exc}") from None
    recipe.agent_voice = args.agent_voice
    if args.voices == "wide":
        recipe.extra_voices, recipe.engine_weights = WIDE_VOICES, dict(WIDE_ENGINE_WEIGHTS)
    if args.tts_sentences is not None:
        if args.tts_sentences < 0:
            raise ValueError(f"--tts-sentences {args.tts_sentences} must be >= 0")
        recipe.tts_sentences = args.tts_sentences
    if args.asr_sentences < 0:
        raise ValueError(f"--asr-sentences {args.asr_sentences} must be >= 0")
    recipe.asr_sentences = args.asr_sentences
    if args.formant_shift is None and args.formant_share is not None:
        raise ValueError("--formant-share needs --formant-shift LO HI: without it no formant moves")
    if args.formant_shift is not None:
        low, high = args.formant_shift
        share = FORMANT_SHARE if args.formant_share is None else args.formant_share
        if not 0.5 <= low <= high <= 2.0:
            raise ValueError(f"--formant-shift {low:g} {high:g} must be LO <= HI within 0.5..2")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"--formant-share {share:g} must be in (0, 1]")
        recipe.augment = replace(recipe.augment, formant_probability=share, formant_shift=(low, high))
    if args.asr_only and not args.asr_sentences:
        raise ValueError("--asr-only needs --asr-sentences N (N > 0): the corpus would be empty")
    if args.tts_only or args.asr_only:
        recipe.utterances = {k: 0 for k in recipe.utterances}
        recipe.multi_turn = recipe.held_out_per_voice = 0
    if args.asr_only:
        if args.tts_sentences:
            raise ValueError("--asr-only makes no TTS sentences: drop --tts-sentences or --asr-only")
        recipe.tts_sentences = 0
    return recipe


def run(args) -> int:
    recipe = recipe_of(args)
    command = (f"mimo-agent train dialogue-data --out {args.out} --seed {args.seed} --scale {args.scale:g}"
               + ("" if args.codec == DEFAULT_CODEC else f" --codec {args.codec}")
               + f" --agent-voice {recipe.agent_voice}"  # always: the default has changed once already
               + ("" if args.voices == "codec" else f" --voices {args.voices}")
               + ("" if args.tts_sentences is None else f" --tts-sentences {args.tts_sentences}")
               + (f" --asr-sentences {args.asr_sentences}" if args.asr_sentences else "")
               + ("" if args.formant_shift is None else " --formant-shift {:g} {:g} --formant-share {:g}".format(
                   *recipe.augment.formant_shift, recipe.augment.formant_probability))
               + (" --tts-only" if args.tts_only else "") + (" --asr-only" if args.asr_only else ""))
    with tempfile.TemporaryDirectory() as probe:  # a voice the engine lacks fails now, not after the user utterances
        try:
            synthesize_raw(recipe.agent_voice, "hello", Path(probe) / "agent.wav")
        except VoiceError as exc:
            raise ValueError(f"--agent-voice {recipe.agent_voice}: {exc}") from None
    generate(args.out, recipe, command=command)
    return 0
