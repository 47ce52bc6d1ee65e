"""``mimo-agent bench-quality``: does the built-in model answer right, judged by an independent ear?

On voices the model never heard in training (:data:`agent.train.data.HELD_OUT_VOICES`), questions
of its domain (:func:`agent.train.dialogue.questions`) are spoken with the synthesiser, sent to a
real server (spawned with ``serve``'s model options, or ``--url``) over the Realtime protocol, one
session per question, a follow-up ("And plus one more?") after each numeric answer in the same
session. Reported:

- **text-channel answer accuracy**: the response's transcript equals the expected answer (after
  :func:`agent.quality.recognize.normalize`); follow-ups (memory across turns) separately;
- **typed questions**: the same conversations typed (``input_text`` items, as the demo page's
  example prompts send them), the same accuracies;
- **spoken-answer word accuracy**: the response's audio, transcribed by the recognizer
  (:class:`~agent.quality.recognize.Recognizer`, PocketSphinx, nothing shared with the model)
  restricted to the domain's closed set of answers (:func:`domain_answers`: it knows every answer,
  not which is right), against the expected answer (1 - WER over all answers), and against the
  model's own text;
- **TTS WER**: lexicon sentences spoken by the model through the offline TTS path (the official
  TTS template, :func:`agent.offline.respond`), transcribed by the recognizer over the lexicon
  (its bigram LM of the domain's sentences, not of these);
- **the recognizer's ceiling**: its WER on the agent voice's own clean synthesis of the same
  answers and sentences, and on the codec's reconstruction of it (what a perfect model could score);
- **human recordings** (``--recordings``): each one's transcript before and after the codec, and
  the model's answer to it: out of the training domain, reported, not promised.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.quality.recognize import Recognizer, normalize, word_accuracy, word_error_rate

#: the kinds of question asked in turn on each voice (a numeric one is followed by a follow-up)
KINDS = ("plus", "minus", "after", "repeat", "greeting")
TARGETS = {"text_accuracy": 0.90, "spoken_word_accuracy": 0.80, "tts_wer": 0.20}
#: the "voice" of a typed question: its text is sent as an ``input_text`` item
TYPED = "typed"


@dataclass
class Turn:
    """One question of a conversation, what the model answered and what the recognizer heard."""

    voice: str
    kind: str
    question: str
    expected: str
    text: str = ""  # the response's text channel
    heard: str = ""  # the recognizer on the response's audio
    status: str = ""
    audio_s: float = 0.0
    audio: np.ndarray | None = field(default=None, repr=False)

    @property
    def text_correct(self) -> bool:
        return normalize(self.text) == normalize(self.expected)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "audio"}
        return {**out, "text_correct": self.text_correct, "spoken_accuracy": word_accuracy(self.expected, self.heard)}


def domain_answers() -> list[str]:
    """Every answer the domain has: the fixed ones and each number a follow-up can reach."""
    from agent.train.dialogue import answer, number_words, questions

    fixed = {answer(q)[0] for kind, qs in questions().items() if kind != "follow_up" for q in qs}
    return sorted(fixed | {number_words(n) for n in range(-11, 22)})


def typed(conversations: list[list[Turn]]) -> list[list[Turn]]:
    """The same conversations, typed."""
    return [[replace(t, voice=TYPED) for t in c] for c in conversations]


def plan(voices: list[str], per_voice: int, seed: int) -> list[list[Turn]]:
    """The conversations: ``per_voice`` questions per voice, the kinds in turn, each numeric one
    followed by a drawn follow-up whose answer needs it."""
    from agent.train.dialogue import answer, questions

    rng = random.Random(seed)
    by_kind = questions()
    conversations = []
    for voice in voices:
        for i in range(per_voice):
            q = rng.choice(by_kind[KINDS[i % len(KINDS)]])
            text, value = answer(q)
            conversation = [Turn(voice, q.kind, q.text, text)]
            if value is not None:
                f = rng.choice(by_kind["follow_up"])
                conversation.append(Turn(voice, f.kind, f.text, answer(f, value)[0]))
            conversations.append(conversation)
    return conversations


class Speaker:
    """Synthesised speech of (voice, text), made once each (24 kHz float32)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mimo-quality-")
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, voice: str, text: str) -> np.ndarray:
        from agent.codec.audio import load_wav
        from agent.train.voices import Augmentation, synthesize

        key = (voice, text)
        if key not in self._cache:
            path = Path(self._dir.name) / f"{len(self._cache)}.wav"
            synthesize(voice, text, path, Augmentation())
            self._cache[key] = load_wav(path)
        return self._cache[key]


async def ask(url: str, conversations: list[list[Turn]], speech: dict[int, np.ndarray], timeout: float,
              api_key: str | None = None, progress=None) -> None:
    """Each conversation in its own session over WebSocket: each turn's speech committed by hand
    (no VAD: the question is the whole clip), a response asked for and collected."""
    from streaming.client import connect

    for conversation in conversations:
        async with await connect(url, api_key=api_key, audio={"input": {"turn_detection": None}}) as client:
            for turn in conversation:
                if turn.voice == TYPED:
                    await client.send_text(turn.question)
                else:
                    await client.send_audio(speech[id(turn)])
                    await client.commit()
                await client.create_response()
                result = await client.collect_response(timeout=timeout)
                turn.text, turn.status = result.transcript or result.text, result.status or ""
                turn.audio, turn.audio_s = result.audio, len(result.audio) / 24000
                if progress:
                    progress(turn)


def tts(runtime: Any, sentences: list[str], max_patches: int = 250, seed: int = 0) -> list[np.ndarray]:
    """The model's speech for each sentence through the offline TTS path (official template)."""
    from agent.lm.generation import GenerationControls, Mode, task_stop_ids
    from agent.lm.prompts import PromptBuilder
    from agent.lm.sampling import task_sampling
    from agent.offline import respond

    builder = PromptBuilder(runtime.tokenizer, runtime.lm.config)
    controls = GenerationControls(mode=Mode.FREE, stop_ids=task_stop_ids("tts", runtime.tokenizer.specials),
                                  max_patches=max_patches)
    out = []
    for i, sentence in enumerate(sentences):
        response, _ = respond(runtime.lm, runtime.tokenizer, builder.tts(sentence), controls, task_sampling("tts"),
                              seed=seed + i)
        codes = response.codes()
        out.append(runtime.codec.decode(codes) if len(codes) else np.zeros(0, np.float32))
    return out


def reconstruct(codec: Any, audio: np.ndarray) -> np.ndarray:
    """``audio`` through the codec (encode, decode): what the model hears and says at best."""
    import torch

    with torch.no_grad():
        return codec.decode(codec.encode(audio))


def summarize(conversations: list[list[Turn]], tts_pairs: list[tuple[str, str]],
              ceiling: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """The figures; ``ceiling`` maps "answers_clean", "answers_codec", "tts_clean", "tts_codec"
    to (text, heard) pairs of the agent voice's own speech. Typed conversations are scored apart
    (``typed``: their text-channel accuracies), the spoken answer's measures are on spoken ones."""
    turns = [t for c in conversations for t in c if t.voice != TYPED]
    typed_turns = [t for c in conversations for t in c if t.voice == TYPED]
    return {
        **_accuracies(turns),
        "typed": _accuracies(typed_turns) if typed_turns else None,
        "spoken_word_accuracy": max(0.0, 1 - word_error_rate((t.expected, t.heard) for t in turns)),
        "spoken_vs_own_text_accuracy": max(0.0, 1 - word_error_rate((t.text, t.heard) for t in turns if t.text)),
        "tts_wer": word_error_rate(tts_pairs) if tts_pairs else None,
        "ceiling_wer": {name: word_error_rate(pairs) for name, pairs in ceiling.items()},
    }


def _accuracies(turns: list[Turn]) -> dict[str, Any]:
    """Text-channel accuracies of ``turns``: first questions (all, by kind) and follow-ups."""
    first = [t for t in turns if t.kind != "follow_up"]
    follow = [t for t in turns if t.kind == "follow_up"]

    def share(ts: list[Turn]) -> float | None:
        return sum(t.text_correct for t in ts) / len(ts) if ts else None

    return {"questions": len(first), "follow_ups": len(follow), "text_accuracy": share(first),
            "text_accuracy_by_kind": {k: share([t for t in first if t.kind == k]) for k in KINDS},
            "follow_up_accuracy": share(follow)}


def report(summary: dict[str, Any], conversations: list[list[Turn]], tts_pairs: list[tuple[str, str]],
           recordings: list[dict[str, Any]], header: str) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    s = summary
    lines = [header, "",
             "recognizer ceiling, WER on the agent voice saying the same texts (clean / through the codec): "
             f"answers {pct(s['ceiling_wer'].get('answers_clean'))} / {pct(s['ceiling_wer'].get('answers_codec'))}, "
             f"sentences {pct(s['ceiling_wer'].get('tts_clean'))} / {pct(s['ceiling_wer'].get('tts_codec'))}",
             f"text-channel answer accuracy: {pct(s['text_accuracy'])} of {s['questions']} questions "
             f"(target >= {pct(TARGETS['text_accuracy'])}); "
             + ", ".join(f"{k} {pct(v)}" for k, v in s["text_accuracy_by_kind"].items()),
             f"follow-ups (memory of the previous answer): {pct(s['follow_up_accuracy'])} of {s['follow_ups']}",
             *([] if not s.get("typed") else [
                 f"typed questions (the same, sent as text): {pct(s['typed']['text_accuracy'])} of "
                 f"{s['typed']['questions']}; " + ", ".join(f"{k} {pct(v)}" for k, v in
                                                           s["typed"]["text_accuracy_by_kind"].items())
                 + f"; follow-ups {pct(s['typed']['follow_up_accuracy'])} of {s['typed']['follow_ups']}"]),
             f"spoken-answer word accuracy (recognizer vs the expected answer): {pct(s['spoken_word_accuracy'])} "
             f"(target >= {pct(TARGETS['spoken_word_accuracy'])}); vs the model's own text "
             f"{pct(s['spoken_vs_own_text_accuracy'])}",
             f"TTS of {len(tts_pairs)} lexicon sentences: WER {pct(s['tts_wer'])} "
             f"(target <= {pct(TARGETS['tts_wer'])})",
             "", "wrong answers (voice | question | expected | text | heard):"]
    wrong = [t for c in conversations for t in c if not t.text_correct]
    lines += [f"  {t.voice} | {t.question} | {t.expected} | {t.text!r} | {t.heard!r}" for t in wrong[:20]]
    if len(wrong) > 20:
        lines.append(f"  ... and {len(wrong) - 20} more (--json has them all)")
    if not wrong:
        lines.append("  none")
    if recordings:
        lines += ["", "human recordings (out of the training domain; recognizer restricted to the lexicon):"]
        for r in recordings:
            lines.append(f"  {r['file']}: heard {r['heard']!r}; through the codec {r['heard_codec']!r} "
                         f"(agreement {pct(r['codec_agreement'])}); the model answered {r['answer']!r}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from agent.train.data import HELD_OUT_VOICES
    from streaming.server import add_model_arguments

    w = parser.add_argument_group("workload")
    w.add_argument("--url", help="a running server's realtime URL (default: spawn `serve` with the model options)")
    w.add_argument("--api-key", default=None, help="the server's API key (--url)")
    w.add_argument("--voices", nargs="+", default=list(HELD_OUT_VOICES),
                   help="voices that ask (default: the held-out voices, never in training)")
    w.add_argument("--per-voice", type=int, default=10, help="questions per voice (default 10; numeric ones get "
                                                             "a follow-up)")
    w.add_argument("--typed", action=argparse.BooleanOptionalAction, default=True,
                   help="also type every conversation (input_text items, as the page's example prompts) and score "
                        "those answers apart (default: yes)")
    w.add_argument("--tts", type=int, default=20, help="lexicon sentences for the TTS measure (default 20)")
    w.add_argument("--recordings", nargs="*", default=[], help="human recordings to report on (wav; default none)")
    w.add_argument("--seed", type=int, default=0, help="draws the questions and sentences (default 0)")
    w.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one response (default 120)")
    parser.add_argument("--json", help="write the summary and every answer to this file")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        result, text = measure(args)
    except Exception as exc:  # a missing synthesiser, recognizer or checkpoint: one clear line
        print(f"mimo-agent bench-quality: {exc}", file=sys.stderr)
        return 2
    from streaming.bench.report import publish

    publish(text, result, args.json)
    return 0


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from agent.runtime import load_runtime
    from agent.train.dialogue import AGENT_VOICE
    from agent.train.lexicon import SentenceGenerator
    from agent.train.lm import trained_agent_voice
    from streaming.bench.spawn import SpawnedServer, machine, serve_argv

    started = time.monotonic()
    runtime = load_runtime(args.model, args.tokenizer, args.preset, device=args.device, dtype=args.dtype,
                           threads=args.threads)  # first: a missing checkpoint fails before any synthesis
    conversations = plan(args.voices, args.per_voice, args.seed)
    conversations += typed(conversations) if args.typed else []
    generator = SentenceGenerator(args.seed + 101)
    sentences = [generator.statement() for _ in range(args.tts)]
    turns = [t for c in conversations for t in c if t.voice != TYPED]
    expected = sorted({t.expected for t in turns})
    hear_answer, hear_speech = Recognizer(phrases=domain_answers()), Recognizer()
    speak = Speaker()
    speech = {id(t): speak(t.voice, t.question) for t in turns}

    # the ceiling: the agent's own voice saying every answer and sentence, clean and through the codec
    agent_voice = (trained_agent_voice(runtime.model_dir) if runtime.model_dir else None) or AGENT_VOICE
    ceiling: dict[str, list[tuple[str, str]]] = {}
    for name, texts, recognizer in (("answers", expected, hear_answer), ("tts", sentences, hear_speech)):
        for text in texts:
            clean = speak(agent_voice, text)
            ceiling.setdefault(f"{name}_clean", []).append((text, recognizer.transcribe(clean)))
            ceiling.setdefault(f"{name}_codec", []).append((text, recognizer.transcribe(reconstruct(runtime.codec,
                                                                                                    clean))))

    def progress(turn: Turn) -> None:
        verdict = "" if turn.kind == "recording" else " (right)" if turn.text_correct else " (WRONG)"
        print(f"  {turn.voice} | {turn.question} -> {turn.text!r}{verdict}", file=sys.stderr, flush=True)

    recordings = [{"file": str(p), "audio": _load(p)} for p in args.recordings]
    asked = [[Turn("recording", "recording", r["file"], "")] for r in recordings]
    speech.update({id(c[0]): r["audio"] for c, r in zip(asked, recordings, strict=True)})
    if args.url:
        server_info: dict[str, Any] = {"url": args.url}
        asyncio.run(ask(args.url, conversations + asked, speech, args.timeout, args.api_key, progress))
    else:
        with SpawnedServer(serve_argv(args)) as server:
            server_info = server.health
            asyncio.run(ask(server.url, conversations + asked, speech, args.timeout, progress=progress))
    for t in turns:
        t.heard = hear_answer.transcribe(t.audio) if t.audio is not None and len(t.audio) else ""
    for r, c in zip(recordings, asked, strict=True):
        r["heard"] = hear_speech.transcribe(r["audio"])
        r["heard_codec"] = hear_speech.transcribe(reconstruct(runtime.codec, r["audio"]))
        r["codec_agreement"] = word_accuracy(r["heard"], r["heard_codec"])
        r["answer"] = c[0].text
        del r["audio"]

    spoken = tts(runtime, sentences, seed=args.seed)
    tts_pairs = [(s, hear_speech.transcribe(a) if len(a) else "") for s, a in zip(sentences, spoken, strict=True)]
    summary = summarize(conversations, tts_pairs, ceiling)
    header = (f"bench-quality: {runtime.name} ({runtime.info['weights']} weights), {len(args.voices)} voices x "
              f"{args.per_voice} questions, seed {args.seed}, agent voice {agent_voice}, "
              f"{time.monotonic() - started:.0f} s")
    result = {
        "model": runtime.info, "agent_voice": agent_voice, "server": server_info, "machine": machine(),
        "summary": summary,
        "targets": TARGETS, "turns": [t.as_dict() for c in conversations for t in c],
        "tts": [{"text": s, "heard": h} for s, h in tts_pairs],
        "ceiling": {k: [{"text": s, "heard": h} for s, h in v] for k, v in ceiling.items()},
        "recordings": recordings,
    }
    return result, report(summary, conversations, tts_pairs, recordings, header)


def _load(path: str) -> np.ndarray:
    from agent.codec.audio import load_wav

    return load_wav(path)
