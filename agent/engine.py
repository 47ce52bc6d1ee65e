"""The engine: one device, the weights, the KV slot pool and the audio tokenizer, on its own thread.

Sessions never call the model. They submit jobs (:class:`AddUserAudio`, :class:`Respond`,
:class:`Cancel` ...) through a bounded queue and receive :class:`EngineEvent`s through the
callback they registered, called on the engine thread (the server hands them to its event loop
with ``loop.call_soon_threadsafe``). Each tick of the engine loop:

1. drains the job queue (conversation edits, responses to start, cancellations);
2. encodes the user audio that arrived, all sessions' turns in one batch;
3. prefills, in chunks of at most ``prefill_chunk`` positions per tick so one tick stays short,
   the positions that changed since the slot's cache was last in sync (see
   :mod:`agent.conversation`: only new positions for a new turn);
4. runs one decode step for every generating session at once: the batched backbone step, text
   sampling with each row's controls, then the batched patch decoder for the rows whose text
   token was ``<|empty|>``;
5. runs the batched streaming codec decode of the new speech patches, and sends the audio.

A session generates ahead of real time by at most ``max_audio_lead_s`` seconds of audio (flow
control): generation far ahead of the listener is wasted on barge-in. While every response is that
far ahead the loop sleeps on the job queue rather than polling. A response with little audio ahead
of its listener (``urgent_lead_s``; a new turn waiting for its first audio has none) has priority:
sessions comfortably ahead (``yield_lead_s``) skip decode steps meanwhile, so a new turn's latency,
and its first second of playback, do not depend on how many sessions are already talking.
A session comfortably ahead also lets a few speech patches gather before its codec pass, which
costs about the same for one patch as for four.

While a user turn is being spoken its audio may arrive as it comes (:class:`StreamUserAudio`). With
``stream_lag_patches`` set, the engine encodes it as it arrives and prefills its settled patches
behind the conversation; the turn's commit is encoded whole as always and the response's sync keeps
what was prefilled up to the first patch that differs, so the answer is the one without streaming.
At a candidate end of the turn a :class:`Speculate` starts its answer and holds it (its events wait,
its items sit at the end of the conversation); the turn's commit and its :class:`Respond` release it,
any other job drops it without a trace (:meth:`Engine._abandon`).

Sessions share batches but not failures: an exception while serving one session (its job, its
prefill, its row of a decode step or of a codec pass, its transcript) fails that session alone
(:meth:`Engine._fail`: an error naming it, its response ``failed``, its slot reset) and every other
session goes on. When a batched stage raises, its rows are run again one by one to find the one
that raises (:meth:`Engine._isolated`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent.conversation import ConversationRenderer, Item, Rendering, Role, common_prefix, speech_ms, truncate_patches
from agent.lm.generation import ControlState, GenerationControls, Mode, text_bans
from agent.lm.graphs import DecodeGraphs, sample_text
from agent.lm.host import HostReader, to_device
from agent.lm.kv_cache import KVCache
from agent.lm.model import MiMoAudioLM
from agent.lm.prompts import Prompt, PromptBuilder
from agent.lm.sampling import GREEDY, ChannelSampling, SamplingBatch, SamplingParams
from agent.lm.tokenizer import TextTokenizer
from agent.memory import plan_memory
from agent.transcriber import Transcriber, TranscriptionDelta, TranscriptionDone, TranscriptionFailed

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 960  # one 25 Hz token


class ServerBusy(RuntimeError):
    """Every KV slot is taken: the new session cannot be admitted."""


class EngineOverloaded(RuntimeError):
    """The engine's job queue is full."""


class EngineClosed(RuntimeError):
    """The engine is stopped."""


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EngineConfig:
    """Scheduler limits; every queue and buffer is bounded by one of these."""

    max_sessions: int = 8
    max_positions: int = 2048  # KV positions (patches) per session slot
    prefill_chunk: int = 256  # prefill positions per tick, all sessions together
    max_batch: int = 64  # sessions per decode step; 1 turns batching off
    max_audio_lead_s: float = 3.0  # generated audio ahead of real time, per session
    # while a response is less than urgent_lead_s ahead of its listener (a new turn waiting for its
    # first audio is 0 s ahead), sessions at least yield_lead_s ahead sit out the decode step, so
    # the urgent one's steps are short ones (yield_lead_s 0: off)
    urgent_lead_s: float = 0.3
    yield_lead_s: float = 1.0
    # a session lets its speech patches gather (up to codec_max_patches) and decodes them in one
    # codec pass while its listener keeps at least codec_defer_margin_s of audio meanwhile: each
    # pass re-runs the vocoder over its left context, so a pass of 8 patches costs little more than
    # a pass of 1 (margin 0: decode every patch at once)
    codec_defer_margin_s: float = 0.3
    codec_max_patches: int = 8
    job_queue_size: int = 4096
    # the oldest turns are dropped when the conversation leaves a response too little room: the room
    # kept is the response's max_output_patches, up to response_room of the context; a trim then
    # frees trim_headroom of the context besides, so the next turns fit without one (a trim changes
    # the conversation's start: all that remains is prefilled again)
    response_room: float = 0.25
    trim_headroom: float = 0.25
    transcription_positions: int = 1024  # context of the input-transcription pass (its own 1-slot cache)
    min_output_patches: int = 0  # stop tokens are banned before this many patches (official min_length)
    idle_wait_s: float = 0.05
    # streaming input (StreamUserAudio): each time stream_every_patches patches of a turn's audio
    # arrived, its last stream_window_s are encoded and its patches stream_lag_patches behind the
    # end are prefilled (the encoder attends both ways: the codes near the end still change). None:
    # the audio is only kept (for a speculation), nothing is encoded before the commit. Off by
    # default: with the presets' random weights no streamed patch survives the commit (BENCHMARKS.md)
    stream_lag_patches: int | None = None
    stream_every_patches: int = 1
    stream_window_s: float = 4.0
    # speculation (Speculate): a held answer generates until it holds speculate_hold_s of audio (what
    # its release sends at once) or speculate_max_patches patches, then waits, leaving the engine idle
    # for the commit; a turn gets at most speculate_attempts (every pause of speculate-ms takes one:
    # with 3, a turn with a few pauses had none left for its end, BENCHMARKS.md); none starts while
    # every decode row is taken or more than speculate_max_queue jobs wait. It starts (encode, prefill,
    # patches) at the turn's earliest end (Speculate.end_in_s) less the time a held answer takes to
    # its first audio (what an instant release needs; measured, x1.5; at least speculate_lead_s): a
    # pause the user ends sooner costs nothing (Speculate.ends_early: it is prefilled at once, only its
    # patches wait). The held answers a turn abandons may waste speculate_waste_ratio x the session's
    # last answer (speculate_max_patches before one), in patches; beyond, it is not speculated again
    speculate_hold_s: float = 0.3
    speculate_max_patches: int = 16
    speculate_attempts: int = 8
    speculate_max_queue: int = 64
    speculate_lead_s: float = 0.15
    speculate_waste_ratio: float = 0.5
    cuda_graphs: bool = True  # replay the decode step and the patch decoder as CUDA graphs (CUDA only)
    # the memory plan (agent.memory): max_sessions must fit in the device's free memory after the
    # weights (or in memory_limit_bytes when given); memory_check False starts anyway
    memory_limit_bytes: int | None = None
    memory_check: bool = True
    compile: bool = False  # a tick's regions through torch.compile (inductor); see agent.lm.compiled


@dataclass(frozen=True)
class ResponseParams:
    """A response's settings, resolved from the session and the ``response.create`` overrides."""

    audio: bool = True  # speech + transcript; False: text only
    max_output_patches: int = 1024
    sampling: ChannelSampling = field(default_factory=ChannelSampling)
    interleave: tuple[int, int] | None = None  # N text patches then M speech patches
    in_conversation: bool = True  # False: out-of-band response, history untouched
    min_patches: int = 0
    codec_schedule: Any = None  # the codec's streaming schedule (None: its default)


# ----------------------------------------------------------------------------------------- jobs
# The Add* jobs put their item after the item ``after``: None appends, ``""`` (``AT_START``) puts it
# first, an id puts it right after that item (appended if that item is gone). An insertion before
# cached positions rolls the slot's cache back when the next response syncs it.
AT_START = ""


@dataclass(frozen=True)
class AddUserAudio:
    """User speech; several jobs with the same ``item_id`` in a row are parts of one item."""

    item_id: str
    pcm: np.ndarray  # float32 mono 24 kHz
    transcribe: bool = False  # also transcribe it (the model's ASR task): Transcription* events
    after: str | None = None


@dataclass(frozen=True)
class StreamUserAudio:
    """Audio of a user turn still being spoken, as it arrives (streaming input). The engine encodes
    it as it comes and prefills its patches behind the conversation (no item, no event); the
    :class:`AddUserAudio` of the same ``item_id`` commits the turn: it is encoded whole, as without
    streaming, and only the patches from the first one that differs are prefilled again."""

    item_id: str
    pcm: np.ndarray  # float32 mono 24 kHz, the next part of the turn


@dataclass(frozen=True)
class Speculate:
    """Start the answer to the turn being streamed (``item_id``) as if the turn ended after its first
    ``samples`` samples (a candidate end), and hold it: nothing is emitted, nothing joins the
    conversation. The turn's commit (:class:`AddUserAudio` of ``item_id``) followed by a
    :class:`Respond` with the same ``params`` adopts it: the turn becomes an item with the codes the
    answer was generated on, and the held events go out at once, renamed to the Respond's ids, as if
    the response had started then. Any other job first abandons it (nothing was emitted; the slot
    rolls back). Refused quietly when the turn has too little audio, the session is answering, the
    turn had ``speculate_attempts`` already, or the engine has no headroom."""

    item_id: str
    samples: int
    params: ResponseParams = field(default_factory=ResponseParams)
    # the turn ends no sooner than this if the silence goes on (the rest of its silence window; 0: it
    # may end now): the speculation starts just in time for it (EngineConfig.speculate_lead_s). With
    # ends_early (semantic_vad: a score may end it any moment) it is prefilled at once, so that such an
    # end releases it within a few steps, and only its patches wait
    end_in_s: float = 0.0
    ends_early: bool = False


@dataclass(frozen=True)
class Abandon:
    """Drop the held answer to ``item_id`` (the user spoke again): no event, no trace."""

    item_id: str


@dataclass(frozen=True)
class AddUserText:
    item_id: str
    text: str
    after: str | None = None


@dataclass(frozen=True)
class AddSystemText:
    item_id: str
    text: str
    after: str | None = None


@dataclass(frozen=True)
class AddAssistantText:
    item_id: str
    text: str
    after: str | None = None


@dataclass(frozen=True)
class Configure:
    """Session-wide settings: instructions (in the first user turn), a voice prompt."""

    instructions: str | None = None
    voice_pcm: np.ndarray | None = None  # float32 mono 24 kHz, or None to keep
    clear_voice: bool = False


@dataclass(frozen=True)
class Respond:
    response_id: str
    item_id: str  # the assistant item this response writes
    params: ResponseParams = field(default_factory=ResponseParams)
    requested_at: float | None = None  # time.perf_counter() of the commit/request, for timings


@dataclass(frozen=True)
class Cancel:
    response_id: str | None = None
    reason: str = "client_cancelled"


@dataclass(frozen=True)
class Truncate:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class DeleteItem:
    item_id: str


@dataclass(frozen=True)
class _Close:
    pass


Job = (
    AddUserAudio | StreamUserAudio | Speculate | Abandon | AddUserText | AddSystemText | AddAssistantText | Configure
    | Respond | Cancel | Truncate | DeleteItem
)


# --------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ItemAdded:
    item_id: str
    patches: int  # positions the item adds to the context
    encode_ms: float = 0.0


@dataclass(frozen=True)
class ResponseStarted:
    response_id: str
    item_id: str


@dataclass(frozen=True)
class TextDelta:
    response_id: str
    item_id: str
    text: str


@dataclass(frozen=True)
class AudioDelta:
    response_id: str
    item_id: str
    pcm: np.ndarray  # float32 mono 24 kHz


@dataclass(frozen=True)
class ResponseDone:
    response_id: str
    item_id: str
    status: str  # completed | cancelled | incomplete | failed
    reason: str | None
    usage: dict
    timings: dict
    transcript: str


@dataclass(frozen=True)
class ItemTruncated:
    item_id: str
    audio_end_ms: int
    transcript: str


@dataclass(frozen=True)
class ItemsDropped:
    """Oldest items removed to fit the context (OpenAI's ``truncation: auto``)."""

    item_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class EngineError:
    code: str
    message: str
    response_id: str | None = None
    item_id: str | None = None


EngineEvent = (
    ItemAdded | ResponseStarted | TextDelta | AudioDelta | ResponseDone | ItemTruncated | ItemsDropped | EngineError
    | TranscriptionDelta | TranscriptionDone | TranscriptionFailed
)


# ------------------------------------------------------------------------------ session state
@dataclass
class _Response:
    job: Respond
    item: Item
    controls: ControlState
    text_params: SamplingParams
    speech_params: SamplingParams
    detok: Any
    stream: Any  # codec decode stream (audio responses)
    t0: float
    cpu0: float = 0.0  # the engine thread's CPU clock when this turn's work began (its encode included)
    phase: str = "prefill"  # prefill -> generate -> done
    prefill: Prompt | None = None  # positions still to prefill
    prefill_positions: int = 0
    cached_positions: int = 0
    hidden: torch.Tensor | None = None  # last backbone hidden from prefill, not yet sampled
    feed: Prompt | None = None  # the last patch, not yet fed to the backbone
    feed_device: tuple | None = None  # (feed, text id (1,), codes (1, 4, 8)): that patch as sampled, on the device
    new_codes: list[torch.Tensor] = field(default_factory=list)  # speech patches awaiting the codec
    audio_samples: int = 0
    t_first_audio: float | None = None
    cancel_reason: str | None = None
    timings: dict = field(default_factory=dict)
    text_patches: int = 0
    speech_patches: int = 0

    def mark(self, name: str) -> None:
        if name not in self.timings:
            self.timings[name] = round((time.perf_counter() - self.t0) * 1000, 3)


@dataclass
class _Provisional:
    """The user turn being spoken (streaming input): its audio so far and the codes of the patches
    prefilled for it (fixed once prefilled: the commit compares them with the exact encode)."""

    item_id: str
    pcm: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    encoded_samples: int = 0  # the audio's length at the last streaming encode
    codes: torch.Tensor | None = None  # (4k, channels): the patches meant for the slot
    synced: bool = True  # the slot holds the rendering of ``codes`` behind the conversation
    speculations: int = 0  # answers speculated on this turn
    wasted: int = 0  # patches of the held answers it abandoned

    def audio(self) -> np.ndarray:
        if len(self.pcm) > 1:
            self.pcm = [np.concatenate(self.pcm)]
        return self.pcm[0] if self.pcm else np.zeros(0, np.float32)


@dataclass
class _Speculation:
    """A held answer to the turn being spoken (:class:`Speculate`): its user item and assistant item
    sit at the end of ``items`` and its response runs, but its events wait in ``events``."""

    item_id: str
    response_id: str  # its own until a Respond adopts it
    user: Item
    answer: Item
    params: ResponseParams
    t0: float
    cpu0: float = 0.0  # the engine thread's CPU clock when it started
    events: list = field(default_factory=list)
    committed: bool = False  # the turn's AddUserAudio came: the user item is the conversation's
    pcm: np.ndarray | None = None  # the committed audio: encoded whole if the answer is not adopted
    transcribe: bool = False
    failed: bool = False
    generate_at: float = 0.0  # its patches wait until then (perf_counter)
    audio_after_s: float | None = None  # how long it took from its start (or its patches', if later) to audio


@dataclass
class _Session:
    sid: int
    slot: int
    on_event: Callable[[EngineEvent], None]
    seed: int
    items: list[Item] = field(default_factory=list)
    instructions: str | None = None
    voice_codes: torch.Tensor | None = None
    cached: Prompt | None = None  # what the slot's KV cache holds, position by position
    response: _Response | None = None
    pending_audio: list[tuple[Item, np.ndarray]] = field(default_factory=list)  # items in place, not yet encoded
    transcribe: set[str] = field(default_factory=set)  # pending audio items to transcribe
    provisional: _Provisional | None = None  # the turn being spoken (streaming input)
    speculation: _Speculation | None = None
    deferred: tuple[Speculate, float] | None = None  # a speculation and when it starts (perf_counter)
    last_encode_ms: float = 0.0
    last_encode_cpu_s: float = 0.0
    answer_patches: int | None = None  # the last answer's length (the speculation waste budget's unit)
    text_generator: torch.Generator | None = None
    speech_generator: torch.Generator | None = None
    closed: bool = False


class SessionHandle:
    """What a caller holds for one engine session: submit jobs, close."""

    def __init__(self, engine: Engine, sid: int, slot: int) -> None:
        self._engine = engine
        self.sid = sid
        self.slot = slot
        self.closed = False

    def submit(self, job: Job) -> None:
        """Queue a job (thread-safe). Raises :class:`EngineOverloaded` or :class:`EngineClosed`. An
        :class:`Abandon` is queued even when the queue is full: lost, it could let a later commit
        release an answer to a turn the user went on with."""
        if self.closed:
            raise EngineClosed("this engine session is closed")
        self._engine._put((self.sid, job), force=isinstance(job, Abandon))

    def close(self) -> None:
        """Cancel whatever runs and free the slot (idempotent, thread-safe)."""
        if not self.closed:
            self.closed = True
            self._engine._put((self.sid, _Close()), force=True)


def _holds(s: _Session, item: Item) -> bool:
    return any(it is item for it in s.items)


# ------------------------------------------------------------------------------------- engine
class Engine:
    """See the module docstring. Construct, :meth:`start`, :meth:`open_session`, :meth:`stop`."""

    def __init__(
        self,
        lm: MiMoAudioLM,
        tokenizer: TextTokenizer,
        codec: Any,
        config: EngineConfig | None = None,
        *,
        decode_patch: Callable | None = None,
        embed_patches: Callable | None = None,
        decode_step: Callable | None = None,
        metrics: Callable[[str, float, dict], None] | None = None,
        graphs: bool | None = None,
    ) -> None:
        """``graphs``: run the backbone step and the patch decoder through :class:`DecodeGraphs`
        (default: ``config.cuda_graphs`` on a CUDA device; True on a CPU runs their static-shape
        path eagerly, for tests). ``decode_patch``, ``embed_patches`` and ``decode_step`` replace the
        patch decoder, the patch encoder and the backbone step (ONNX Runtime), with the model's
        signatures; a replaced step or patch decoder is not captured in graphs."""
        self.lm = lm
        self.tokenizer = tokenizer
        self.codec = codec
        self.config = config or EngineConfig()
        self.device = lm.device
        self.specials = tokenizer.specials
        self.builder = PromptBuilder(tokenizer, lm.config)
        self.renderer = ConversationRenderer(self.builder)
        self.max_positions = min(self.config.max_positions, lm.config.max_position_embeddings)
        replaced = decode_step is not None and decode_patch is not None  # nothing left to capture
        use_graphs = graphs if graphs is not None else (
            ((self.config.cuda_graphs and self.device.type == "cuda") or self.config.compile) and not replaced)
        # graphs pad batches with rows that write to a slot no session owns
        extra = 1 if use_graphs else 0
        self.plan = plan_memory(lm, codec, max_sessions=self.config.max_sessions, max_positions=self.max_positions,
                                max_batch=self.config.max_batch, prefill_chunk=self.config.prefill_chunk,
                                extra_slots=extra, limit_bytes=self.config.memory_limit_bytes)
        if self.config.memory_check:
            self.plan.check()  # before allocating: a plan that does not fit is refused with its figures
        self.memory = self.plan.as_dict()
        self.cache: KVCache = lm.allocate_cache(self.config.max_sessions + extra, self.max_positions)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(lm, self.cache, max_batch=min(self.config.max_batch, self.config.max_sessions),
                                       scratch_slot=self.config.max_sessions,
                                       capture=None if self.config.cuda_graphs else False,
                                       compile=self.config.compile)
        self.decode_step = decode_step or (self.graphs.decode_step if self.graphs else lm.decode_step)
        self.embed_patches = embed_patches or lm.embed_patches
        # the patch encoder and the backbone step as one region (one graph, one compiled function)
        # unless either is replaced
        self.step_patches = (self.graphs.step_patches if self.graphs and decode_step is None and embed_patches is None
                             else lambda cache, slots, *patches: self.decode_step(cache, slots,
                                                                                  self.embed_patches(*patches)))
        self.sample_text = self.graphs.sample_text if self.graphs else functools.partial(sample_text, lm)
        self.transcriber = Transcriber(lm, tokenizer, self.builder, max_positions=self.config.transcription_positions)
        self.decode_patch = decode_patch or (self.graphs.decode_patch if self.graphs else lm.decode_patch)
        self._metrics = metrics
        self._jobs: queue.Queue = queue.Queue(maxsize=self.config.job_queue_size)
        self._lock = threading.Lock()
        self._free_slots = list(range(self.config.max_sessions))
        self._sessions: dict[int, _Session] = {}
        self._next_sid = 0
        self._thread: threading.Thread | None = None
        self._running = False
        self.speculations = {"started": 0, "confirmed": 0, "abandoned": 0, "refused": 0, "skipped": 0,
                             "wasted_patches": 0}
        self._rr = 0  # rotates the tie order of generating sessions when max_batch < their number
        self.ticks = 0
        self._step_s = 0.05  # moving average of a tick that steps (seconds)
        self._first_audio_s: float | None = None  # moving average of a held answer's time to its first audio
        empty = torch.tensor(lm.config.speech_empty_ids, dtype=torch.int64)
        self._empty_codes = empty.expand(lm.config.group_size, -1).clone()  # (4, 8)
        self._empty_codes_device = self._empty_codes.to(self.device).unsqueeze(0)  # (1, 4, 8)
        self.host = HostReader(self.device)  # the decode step's device-to-host reads

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is not None:
            return self
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="mimo-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._running = False
        if self._thread is not None:
            self._put(None, force=True)
            self._thread.join(timeout)
            self._thread = None

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return self.config.max_sessions - len(self._free_slots)

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def open_session(self, on_event: Callable[[EngineEvent], None], *, seed: int | None = None) -> SessionHandle:
        """Admit a session (thread-safe); raises :class:`ServerBusy` when every slot is taken."""
        if not self._running:
            raise EngineClosed("the engine is not running")
        with self._lock:
            if not self._free_slots:
                raise ServerBusy(f"all {self.config.max_sessions} session slots are in use")
            slot = self._free_slots.pop(0)
            sid = self._next_sid
            self._next_sid += 1
        session = _Session(sid=sid, slot=slot, on_event=on_event, seed=sid if seed is None else seed)
        self._put((sid, session), force=True)
        return SessionHandle(self, sid, slot)

    def _put(self, entry: Any, force: bool = False) -> None:
        if force:
            self._jobs.put(entry)
            return
        try:
            self._jobs.put_nowait(entry)
        except queue.Full:
            raise EngineOverloaded(f"the engine's job queue is full ({self.config.job_queue_size} jobs)") from None

    # ----------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":  # the current device is per thread: kernels and graphs go to ours
            torch.cuda.set_device(self.device)
        cpu = time.thread_time()
        while self._running:
            self._drain_jobs(self._wait_s())
            try:
                self.tick()
            except Exception as exc:  # outside any one session's work: fail every response, the engine goes on
                for s in list(self._sessions.values()):
                    if s.response is not None:
                        self._fail(s, "engine tick", exc)
            now = time.thread_time()
            if now - cpu >= 0.01:  # the model's compute, what speculation adds to (metrics)
                self._observe("cpu", now - cpu, {})
                cpu = now
        for s in list(self._sessions.values()):
            self._close_session(s)

    def _responses_waiting(self) -> bool:
        """Whether a response is still before its first audio: transcripts wait for it."""
        return any(s.response is not None and s.response.t_first_audio is None
                   and s.response.cancel_reason is None and not self._held(s) for s in self._sessions.values())

    @staticmethod
    def _held(s: _Session) -> bool:
        """Whether ``s``'s response is a held speculation."""
        return s.speculation is not None and s.response is not None and s.response.job is not None \
            and s.response.job.response_id == s.speculation.response_id

    def _paused(self, s: _Session) -> bool:
        """A held speculation not due to generate yet, or with enough audio, or at its cap of patches:
        it waits (for its time, or its release)."""
        return self._held(s) and (s.speculation.generate_at > time.perf_counter() or self._at_hold(s))

    def _at_hold(self, s: _Session) -> bool:
        r = s.response
        return len(r.item.patches) >= self.config.speculate_max_patches \
            or r.audio_samples >= self.config.speculate_hold_s * SAMPLE_RATE

    def _lead_time_s(self) -> float:
        """How far ahead of a turn's earliest end a speculation starts: what one took to its first
        audio lately, with a margin, and at least ``speculate_lead_s``."""
        measured = 0.0 if self._first_audio_s is None else 1.5 * self._first_audio_s
        return max(self.config.speculate_lead_s, measured)

    def _note_first_audio(self, s: _Session, now: float) -> None:
        """Time a held answer from its start to its first audio, for :meth:`_lead_time_s`."""
        spec = s.speculation
        if spec.audio_after_s is None:
            spec.audio_after_s = took = now - max(spec.t0, spec.generate_at)
            self._first_audio_s = took if self._first_audio_s is None else \
                self._first_audio_s + 0.3 * (took - self._first_audio_s)

    def _wait_s(self) -> float:
        """How long the loop may block on the job queue before the next tick: 0 when a tick has work
        now; else until the first flow-controlled response may step (or decode what it holds)
        again, at most ``idle_wait_s``. Busy-polling meanwhile would take the CPU from the event
        loop and from the other sessions."""
        now = time.perf_counter()
        wait = self.config.idle_wait_s
        if self.transcriber.pending and not self._responses_waiting():
            return 0.0
        for s in self._sessions.values():
            if s.pending_audio:
                return 0.0
            if self._stream_due(s) or self._provisional_due(s):
                return 0.0
            if s.deferred is not None:  # the loop wakes when it is due
                wait = min(wait, max(0.0, s.deferred[1] - now))
            r = s.response
            if r is None:
                continue
            if r.phase == "generate" and self._paused(s) and not r.new_codes:
                if s.speculation.generate_at > now:  # the loop wakes when its patches are due
                    wait = min(wait, s.speculation.generate_at - now)
                continue
            if r.phase != "generate" or r.cancel_reason is not None:
                return 0.0
            lead = self._lead_s(r, now)
            if r.new_codes:
                if self._codec_due(r, lead):
                    return 0.0
                wait = min(wait, lead - self.config.codec_defer_margin_s - self._pass_wait_s(r))  # > 0: not due
            if lead <= self.config.max_audio_lead_s:
                return 0.0
            wait = min(wait, lead - self.config.max_audio_lead_s)
        return max(wait, 0.0)

    def _drain_jobs(self, wait_s: float) -> None:
        """Handle every queued job; block up to ``wait_s`` for the first when there is none."""
        block = wait_s > 0
        while True:
            try:
                entry = self._jobs.get(timeout=wait_s) if block else self._jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if entry is None:
                return
            sid, job = entry
            if isinstance(job, _Session):
                self._init_session(job)
                continue
            session = self._sessions.get(sid)
            if session is None:
                continue
            with self._guard(session, f"{type(job).__name__} job"):
                self._handle(session, job)

    def tick(self) -> None:
        """One round of work: encode, prefill, decode step, codec decode."""
        self.ticks += 1
        t = time.perf_counter()
        self._start_deferred(t)
        self._encode_pending()
        self._stream_encode()
        self._prefill()
        stepped = self._decode_step()
        self._codec_step()
        if self.transcriber.pending and not self._responses_waiting():
            self.transcriber.step()
        if stepped:  # how often a generating session steps, for the codec's deferral
            self._step_s += 0.2 * (time.perf_counter() - t - self._step_s)

    # ------------------------------------------------------------------------------ sessions
    def _init_session(self, s: _Session) -> None:
        self.cache.reset(s.slot)
        s.cached = self.builder.tokens([])
        s.text_generator = torch.Generator(device=self.device).manual_seed(s.seed)
        s.speech_generator = torch.Generator(device=self.device).manual_seed(s.seed + 1_000_003)
        self._sessions[s.sid] = s

    def _close_session(self, s: _Session) -> None:
        if s.closed:
            return
        s.closed = True
        self.transcriber.forget(s.sid)
        s.response = None
        self._sessions.pop(s.sid, None)
        self.cache.reset(s.slot)
        with self._lock:
            self._free_slots.append(s.slot)

    # ----------------------------------------------------------------------------- isolation
    def _fail(self, s: _Session, stage: str, exc: BaseException, response_id: str | None = None) -> None:
        """``stage`` raised while serving ``s``: fail ``s`` alone. An error names the session and the
        stage (and the running response, or ``response_id``), the response ends ``failed``, and the
        slot is reset (a step that raised may have left half-written positions behind), so the next
        response prefills the whole conversation again. The session stays open; every other
        session goes on."""
        log.error("session %d: %s failed", s.sid, stage, exc_info=exc)
        self.cache.reset(s.slot)
        s.cached = self.builder.tokens([])
        if s.provisional is not None:
            s.provisional.synced = False
        r = s.response
        if self._held(s):
            s.speculation.failed = True  # its error stays held: the turn is answered afresh
        self._emit(s, EngineError(
            "session_failed", f"engine session {s.sid}: {stage} failed: {type(exc).__name__}: {exc}",
            response_id=r.job.response_id if r is not None else response_id,
            item_id=r.item.item_id if r is not None else None))
        if r is not None:
            r.stream, r.new_codes = None, []  # its codec state may be half-updated: never decoded again
            try:
                self._finish(s, "failed", "engine_error")
            except Exception:
                log.exception("session %d: finishing the failed response failed too", s.sid)
                s.response = None

    @contextlib.contextmanager
    def _guard(self, s: _Session, stage: str):
        """Run a block of work for ``s`` alone: an exception in it fails ``s`` (:meth:`_fail`)."""
        try:
            yield
        except Exception as exc:
            self._fail(s, stage, exc)

    def _each(self, stage: str, rows: list[tuple[_Session, Any]], work: Callable[[_Session, Any], None]) -> None:
        """``work(s, value)`` for each row; one that raises fails its session alone (a plain
        ``try`` per row: this runs for every row of every step)."""
        for s, value in rows:
            try:
                work(s, value)
            except Exception as exc:
                self._fail(s, stage, exc)

    def _isolated(self, stage: str, sessions: list[_Session], run: Callable[[list[_Session]], list],
                  undo: Callable[[list[_Session]], None] | None = None) -> list[tuple[_Session, Any]]:
        """``run(sessions)`` -> one result per session, in one batch. When the batch raises,
        ``undo(rows)`` puts back what the failed call changed for those rows and each session runs
        alone: the one that raises again fails by itself (:meth:`_fail`), the others go on.
        Returns (session, result) for the sessions that succeeded."""
        try:
            return list(zip(sessions, run(sessions), strict=True))
        except Exception as exc:
            if len(sessions) == 1:
                self._fail(sessions[0], stage, exc)
                return []
            log.warning("%s of %d sessions failed (%s: %s); running them one by one", stage, len(sessions),
                        type(exc).__name__, exc)
        done = []
        for s in sessions:
            if undo is not None:
                undo([s])
            with self._guard(s, stage):
                done.append((s, run([s])[0]))
        return done

    def _emit(self, s: _Session, event: EngineEvent) -> None:
        spec = s.speculation
        if spec is not None and getattr(event, "response_id", None) == spec.response_id:
            spec.events.append(event)  # held until the speculation is adopted (or dropped with it)
            return
        try:
            s.on_event(event)
        except Exception:
            log.exception("session %d event callback failed", s.sid)

    def _find(self, s: _Session, item_id: str) -> Item | None:
        return next((it for it in s.items if it.item_id == item_id), None)

    def _handle(self, s: _Session, job: Any) -> None:
        if s.provisional is not None:  # the conversation or the slot may change: check the turn's prefix
            s.provisional.synced = False
        if s.deferred is not None and not (isinstance(job, StreamUserAudio) and job.item_id == s.deferred[0].item_id):
            if isinstance(job, AddUserAudio) and job.item_id == s.deferred[0].item_id:
                self._first_audio_s = max(self._first_audio_s or 0.0, self._lead_time_s())  # it ended before
            s.deferred = None  # the pause ended before its speculation was due (or the turn changed)
            self._speculation_event("skipped")
        spec = s.speculation
        if spec is not None and not self._keeps_speculation(spec, job):
            self._abandon(s)
        if isinstance(job, _Close):
            self._close_session(s)
        elif isinstance(job, StreamUserAudio):
            self._stream_audio(s, job)
        elif isinstance(job, Speculate):
            self._speculate(s, job)
        elif isinstance(job, Abandon):
            pass  # done above
        elif isinstance(job, AddUserAudio) and s.speculation is not None:  # the speculated turn's commit
            spec.committed, spec.pcm, spec.transcribe = True, np.asarray(job.pcm, dtype=np.float32), job.transcribe
            s.provisional = None
        elif isinstance(job, AddUserAudio):
            if s.provisional is not None and s.provisional.item_id == job.item_id:
                # the turn is committed: encoded whole from here on, as without streaming (the next
                # response's sync keeps the prefilled patches up to the first that differs)
                s.provisional = None
            pcm = np.asarray(job.pcm, dtype=np.float32)
            if s.pending_audio and s.pending_audio[-1][0].item_id == job.item_id:  # another part of the same item
                item, first = s.pending_audio.pop()
                pcm = np.concatenate([first, pcm])
            else:  # the item takes its place now (later items follow it); its codes come with the encode
                item = Item(job.item_id, Role.USER)
                self._insert(s, item, job.after)
            s.pending_audio.append((item, pcm))
            if job.transcribe:
                s.transcribe.add(job.item_id)
        elif isinstance(job, AddUserText):
            self._add_item(s, Item(job.item_id, Role.USER, text=job.text), job.after)
        elif isinstance(job, AddSystemText):
            self._add_item(s, Item(job.item_id, Role.SYSTEM, text=job.text), job.after)
        elif isinstance(job, AddAssistantText):
            patches = self.builder.text(job.text)
            self._add_item(s, Item(job.item_id, Role.ASSISTANT, patches=patches, audio_output=False, complete=True),
                           job.after)
        elif isinstance(job, Configure):
            if job.instructions is not None:
                s.instructions = job.instructions or None
            if job.clear_voice:
                s.voice_codes = None
            elif job.voice_pcm is not None:
                try:
                    s.voice_codes = self._encode([job.voice_pcm])[0]
                except ValueError as exc:  # bad audio: refused, the session (and its response) go on
                    self._emit(s, EngineError("invalid_audio", f"voice prompt: {exc}"))
        elif isinstance(job, Respond):
            self._start_response(s, job)
        elif isinstance(job, Cancel):  # at once: the session has finished it, a new one may follow
            r = s.response
            if r is not None and (job.response_id is None or job.response_id == r.job.response_id):
                r.cancel_reason = job.reason
                self._finish(s, "cancelled", job.reason)
        elif isinstance(job, Truncate):
            self._truncate(s, job)
        elif isinstance(job, DeleteItem):
            self.transcriber.forget(s.sid, job.item_id)
            if s.response is not None and s.response.item.item_id == job.item_id:
                self._finish(s, "cancelled", "item_deleted")
            s.items = [it for it in s.items if it.item_id != job.item_id]
        else:
            raise TypeError(f"unknown job {job!r}")

    @staticmethod
    def _keeps_speculation(spec: _Speculation, job: Any) -> bool:
        """Whether ``job`` leaves a held speculation in place: more audio of its turn, its commit, a
        Respond (which adopts it or abandons it) or another Speculate (refused). Any other job may
        change the conversation under it."""
        if isinstance(job, StreamUserAudio):
            return job.item_id == spec.item_id and not spec.committed
        if isinstance(job, AddUserAudio):
            return job.item_id == spec.item_id and job.after is None and not spec.committed
        return isinstance(job, Respond | Speculate)

    # --------------------------------------------------------------------------- speculation
    def _speculation_event(self, outcome: str, wasted: int = 0) -> None:
        self.speculations[outcome] += 1
        self.speculations["wasted_patches"] += wasted
        self._observe("speculation", 0.0, {"outcome": outcome, "wasted_patches": wasted})

    def _speculation_refusal(self, s: _Session, job: Speculate) -> str | None:
        pr = s.provisional
        if pr is None or pr.item_id != job.item_id or not 0 < job.samples <= pr.samples:
            return "the turn's audio is not here"
        if s.response is not None or s.speculation is not None or s.pending_audio:
            return "the session is busy"
        if pr.speculations >= self.config.speculate_attempts:
            return "attempts used up"
        if self._over_budget(s):
            return "waste budget used up"
        rows = sum(1 for x in self._sessions.values() if x.response is not None)
        if rows >= min(self.config.max_batch, self.config.max_sessions) or \
                self._jobs.qsize() > self.config.speculate_max_queue:
            return "no headroom"
        if not job.params.in_conversation:
            return "out of band"
        return None

    def _speculate(self, s: _Session, job: Speculate) -> None:
        """Start ``job`` now, or defer it until the turn's earliest end less the lead (``end_in_s``)."""
        due = time.perf_counter() + job.end_in_s - self._lead_time_s()
        if due > time.perf_counter() and not job.ends_early:
            s.deferred = (job, due)
        else:
            self._start_speculation(s, job, generate_at=due)

    def _start_deferred(self, now: float) -> None:
        for s in list(self._sessions.values()):
            if s.deferred is not None and s.deferred[1] <= now:
                job, s.deferred = s.deferred[0], None
                with self._guard(s, "speculation"):
                    self._start_speculation(s, job)

    def _start_speculation(self, s: _Session, job: Speculate, generate_at: float = 0.0) -> None:
        refusal = self._speculation_refusal(s, job)
        if refusal is not None:
            log.debug("session %d: no speculation on %s: %s", s.sid, job.item_id, refusal)
            self._speculation_event("refused")
            return
        pr = s.provisional
        pr.speculations += 1
        t, cpu0 = time.perf_counter(), time.thread_time()
        try:
            codes = self._encode([pr.audio()[:job.samples]])[0]
        except ValueError:  # the commit reports bad audio
            self._speculation_event("refused")
            return
        encode_ms = (time.perf_counter() - t) * 1000
        user = Item(job.item_id, Role.USER, codes=codes)
        answer = Item(f"{job.item_id}/speculation", Role.ASSISTANT, patches=self.builder.tokens([]),
                      audio_output=job.params.audio)
        spec = _Speculation(job.item_id, f"speculation-{s.sid}-{job.item_id}-{pr.speculations}", user, answer,
                            job.params, t0=t, cpu0=cpu0, generate_at=generate_at)
        s.items += [user, answer]
        if len(self._render(s)) > self._context_limit(job.params):  # only a real turn may drop old ones
            s.items = s.items[:-2]
            self._speculation_event("refused")
            return
        s.speculation = spec
        s.last_encode_ms, s.last_encode_cpu_s = encode_ms, time.thread_time() - cpu0
        try:
            self._begin_response(s, Respond(spec.response_id, answer.item_id, job.params, requested_at=t), answer, cpu0)
        except Exception:
            log.exception("session %d: speculation on %s failed", s.sid, job.item_id)
            spec.failed = True
        if s.response is None or spec.failed:
            self._abandon(s)  # it did not start
            return
        self._speculation_event("started")

    def _over_budget(self, s: _Session) -> bool:
        """Whether the turn's abandoned held answers wasted their share (``speculate_waste_ratio``)."""
        unit = s.answer_patches if s.answer_patches is not None else self.config.speculate_max_patches
        return s.provisional.wasted >= self.config.speculate_waste_ratio * unit

    def _abandon(self, s: _Session) -> None:
        """Drop the held speculation: its response and items go, its events are never sent, the slot
        rolls back. A committed turn stays, encoded whole as without speculation."""
        spec, s.speculation = s.speculation, None
        if self._held_response(s, spec):
            s.response = None
        s.items = [it for it in s.items if it is not spec.answer and (spec.committed or it is not spec.user)]
        if spec.committed:
            spec.user.codes = None
            s.pending_audio.append((spec.user, spec.pcm))
            if spec.transcribe:
                s.transcribe.add(spec.item_id)
        pr = s.provisional
        wasted = len(spec.answer.patches or ())
        if pr is not None and pr.item_id == spec.item_id:
            pr.wasted += wasted
        if pr is not None and pr.codes is not None:
            self._sync_cache(s, self.renderer.open_turn(s.items, pr.codes, instructions=s.instructions,
                                                        voice_codes=s.voice_codes))
        else:
            self._sync_cache(s)
        self._speculation_event("abandoned", wasted)

    @staticmethod
    def _released_timings(spec: _Speculation, held: dict, now: float, cpu: float) -> dict:
        """A released answer's timings: what was done while it was held was done by its start, so
        those stages took 0 ms from the commit; the work is reported apart (``speculated_*``), with
        how far ahead it was and how many patches it had."""
        marks = ("encode_ms", "prefill_ms", "prefill_done_ms", "first_patch_ms", "first_text_ms",
                 "first_speech_patch_ms", "first_audio_ms", "total_ms")
        out = {k: 0.0 if k in marks else v for k, v in held.items() if k != "first_audio_cpu_ms"}
        out.update(speculated_ms=round((now - spec.t0) * 1000, 3), speculated_patches=len(spec.answer.patches),
                   speculated_encode_ms=held.get("encode_ms", 0.0), speculated_prefill_ms=held.get("prefill_ms", 0.0),
                   speculated_cpu_ms=round((cpu - spec.cpu0) * 1000, 3))
        return out

    @staticmethod
    def _held_response(s: _Session, spec: _Speculation) -> bool:
        return s.response is not None and s.response.job.response_id == spec.response_id

    def _adopt(self, s: _Session, job: Respond) -> bool:
        """The turn was committed and ``job`` asks for the answer that was speculated: release it
        under ``job``'s ids (see :class:`Speculate`). False when it does not fit (the caller abandons)."""
        spec = s.speculation
        if not (spec.committed and not spec.failed and job.params == spec.params and s.items
                and s.items[-1] is spec.answer):
            return False
        s.speculation = None
        now, cpu = time.perf_counter(), time.thread_time()
        held_id, spec.answer.item_id = spec.answer.item_id, job.item_id
        r = s.response if self._held_response(s, spec) else None
        if r is not None and spec.audio_after_s is None and spec.generate_at <= now:
            # released before its first audio: it started too late; the next ones start earlier
            self._first_audio_s = max(self._first_audio_s or 0.0, now - max(spec.t0, spec.generate_at))
        if r is not None:
            r.job = job
            r.t0 = job.requested_at if job.requested_at is not None else now
            r.timings, r.cpu0 = self._released_timings(spec, r.timings, now, cpu), cpu
        self._item_added(s, spec.user)
        if spec.transcribe:
            self.transcriber.add(s.sid, spec.item_id, spec.user.codes, lambda e, s=s: self._emit(s, e))
        for event in spec.events:
            changes: dict[str, Any] = {"response_id": job.response_id}
            if getattr(event, "item_id", None) == held_id:
                changes["item_id"] = job.item_id
            if isinstance(event, ResponseDone):  # it ended while held
                changes["timings"] = self._released_timings(spec, event.timings, now, cpu)
                if event.timings.get("audio_samples"):
                    changes["timings"].update(first_audio_ms=0.0,
                                              first_audio_cpu_ms=round((time.thread_time() - cpu) * 1000, 3))
            self._emit(s, dataclasses.replace(event, **changes))
        if r is not None and r.audio_samples:  # its first audio went out now
            r.t_first_audio = time.perf_counter()
            r.mark("first_audio_ms")
            r.timings["first_audio_cpu_ms"] = round((time.thread_time() - r.cpu0) * 1000, 3)
        self._speculation_event("confirmed")
        return True

    def _insert(self, s: _Session, item: Item, after: str | None) -> None:
        index = len(s.items)
        if after == AT_START:
            index = 0
        elif after is not None:  # after the last of that id (an item's parts may be several items here)
            index = next((i + 1 for i in range(len(s.items) - 1, -1, -1) if s.items[i].item_id == after), index)
        s.items.insert(index, item)

    def _add_item(self, s: _Session, item: Item, after: str | None = None) -> None:
        self._insert(s, item, after)
        self._item_added(s, item)

    def _item_added(self, s: _Session, item: Item, encode_ms: float = 0.0) -> None:
        n = len(self.renderer.render([item]).prompt) if item.role is not Role.ASSISTANT else len(item.patches or [])
        self._emit(s, ItemAdded(item.item_id, n, round(encode_ms, 3)))

    def _truncate(self, s: _Session, job: Truncate) -> None:
        item = self._find(s, job.item_id)
        if item is None or item.role is not Role.ASSISTANT:
            self._emit(s, EngineError("item_not_found", f"no assistant item {job.item_id!r}", item_id=job.item_id))
            return
        if s.response is not None and s.response.item is item:
            s.response.cancel_reason = s.response.cancel_reason or "truncated"
            self._finish(s, "cancelled", s.response.cancel_reason)
        if item.patches is not None:
            item.patches = truncate_patches(item.patches, self.specials.empty, job.audio_end_ms)
        if s.response is None:  # roll back now: the unheard part leaves the KV cache at once
            self._sync_cache(s)
        # else a response runs on the positions behind it: the rollback waits for the next response
        self._emit(s, ItemTruncated(item.item_id, job.audio_end_ms, self.renderer.assistant_text(item)))

    # -------------------------------------------------------------------------------- encode
    def _encode(self, pcms: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.as_tensor(c, dtype=torch.int64).cpu() for c in self.codec.encode_batch(pcms)]

    @property
    def _patch_samples(self) -> int:
        return SAMPLES_PER_FRAME * self.lm.config.group_size

    def _stream_audio(self, s: _Session, job: StreamUserAudio) -> None:
        pr = s.provisional
        if pr is None or pr.item_id != job.item_id:  # a new turn (one that was not committed is forgotten)
            pr = s.provisional = _Provisional(job.item_id)
        pcm = np.asarray(job.pcm, dtype=np.float32)
        pr.pcm.append(pcm)
        pr.samples += len(pcm)

    def _stream_due(self, s: _Session) -> bool:
        pr = s.provisional
        return (pr is not None and self.config.stream_lag_patches is not None and s.speculation is None
                and pr.samples - pr.encoded_samples >= self._patch_samples * self.config.stream_every_patches)

    @staticmethod
    def _provisional_due(s: _Session) -> bool:
        """The slot may take the turn being spoken: it is not in sync, nothing else uses the slot."""
        return s.provisional is not None and not s.provisional.synced and s.response is None and s.speculation is None

    def _stream_encode(self) -> None:
        """Streaming input: encode the turns being spoken that gained a patch of audio, all in one
        batch (each its last ``stream_window_s``, from a patch boundary), and fix the codes of the
        patches ``stream_lag_patches`` behind the end of their audio. Waits while a response waits
        for its first audio. A turn whose audio the encoder refuses is not streamed (its commit
        reports the problem)."""
        work = [s for s in self._sessions.values() if self._stream_due(s)]
        if not work or self._responses_waiting():
            return
        group, patch = self.lm.config.group_size, self._patch_samples
        windows, firsts = [], []
        for s in work:
            pr = s.provisional
            audio = pr.audio()
            fixed = 0 if pr.codes is None else len(pr.codes) // group
            start = max(0, len(audio) - int(self.config.stream_window_s * SAMPLE_RATE)) // patch
            start = min(start, fixed)
            windows.append(audio[start * patch:])
            firsts.append(start)
            pr.encoded_samples = pr.samples
        t = time.perf_counter()
        try:
            encoded = self._encode(windows)
        except Exception:
            log.exception("streaming encode of %d turns failed: they are encoded at their commit", len(work))
            for s in work:
                s.provisional = None
            return
        self._observe("stream_encode", time.perf_counter() - t, {"batch": len(work)})
        for s, window, first, codes in zip(work, windows, firsts, encoded, strict=True):
            pr = s.provisional
            fixed = 0 if pr.codes is None else len(pr.codes) // group
            stable = first + len(window) // patch - self.config.stream_lag_patches
            if stable > fixed:
                new = codes[(fixed - first) * group:(stable - first) * group]
                pr.codes = new if pr.codes is None else torch.cat([pr.codes, new])
                pr.synced = False

    def _encode_pending(self) -> None:
        work = []
        for s in self._sessions.values():
            work += [(s, item, pcm) for item, pcm in s.pending_audio if _holds(s, item)]  # else deleted meanwhile
            s.pending_audio = []
        if not work:
            return
        t, cpu = time.perf_counter(), time.thread_time()
        try:
            encoded = list(zip(work, self._encode([pcm for _, _, pcm in work]), strict=True))
        except Exception:  # one turn's audio made the batch fail: encode them one by one
            encoded = []
            for turn in work:
                s, item, pcm = turn
                try:
                    encoded.append((turn, self._encode([pcm])[0]))
                except Exception as exc:
                    s.items = [it for it in s.items if it is not item]
                    if isinstance(exc, ValueError):  # bad audio: the item is refused, the session goes on
                        self._emit(s, EngineError("invalid_audio", str(exc), item_id=item.item_id))
                    else:
                        self._fail(s, f"encoding item {item.item_id}", exc)
        ms = (time.perf_counter() - t) * 1000
        cpu = time.thread_time() - cpu
        self._observe("encode", ms / 1000, {"batch": len(work)})
        for (s, item, _), c in encoded:
            s.last_encode_ms, s.last_encode_cpu_s = ms, cpu
            item.codes = c
            self._item_added(s, item, encode_ms=ms)
            if item.item_id in s.transcribe:
                s.transcribe.discard(item.item_id)
                self.transcriber.add(s.sid, item.item_id, c, lambda e, s=s: self._emit(s, e))

    # ------------------------------------------------------------------------------ response
    def _controls(self, params: ResponseParams) -> GenerationControls:
        stops = (self.specials.eostm, self.specials.im_end, self.specials.eos) if params.audio else (
            self.specials.im_end, self.specials.eos)
        min_patches = min(max(params.min_patches, self.config.min_output_patches), params.max_output_patches)
        common = dict(stop_ids=tuple(sorted(set(stops))), max_patches=params.max_output_patches,
                      min_patches=min_patches)
        if not params.audio:
            return GenerationControls(mode=Mode.TEXT, **common)
        if params.interleave is not None:
            n, m = params.interleave
            return GenerationControls(mode=Mode.INTERLEAVE, text_patches=n, speech_patches=m, **common)
        return GenerationControls(mode=Mode.FREE, **common)

    def _start_response(self, s: _Session, job: Respond) -> None:
        if s.speculation is not None:
            if self._adopt(s, job):
                return
            self._abandon(s)
        if s.response is not None:
            self._emit(s, EngineError("response_in_progress", "a response is already running",
                                      response_id=job.response_id))
            return
        cpu0 = time.thread_time()
        if s.pending_audio:  # the turn being answered is still being encoded: do it now
            self._encode_pending()
        p = job.params
        item = Item(job.item_id, Role.ASSISTANT, patches=self.builder.tokens([]), audio_output=p.audio)
        s.items.append(item)
        try:
            self._begin_response(s, job, item, cpu0)
        except Exception as exc:
            if s.response is not None:
                raise  # it runs: it fails like any running response
            s.items = [it for it in s.items if it is not item]  # it never started: its item goes too
            self._fail(s, "starting the response", exc, response_id=job.response_id)

    def _begin_response(self, s: _Session, job: Respond, item: Item, cpu0: float) -> None:
        p = job.params
        rendering = self._fit_context(s, p, job.response_id)
        if rendering is None:
            s.items.remove(item)
            return
        stream = None
        if p.audio:
            stream = (self.codec.new_decode_stream(p.codec_schedule) if p.codec_schedule is not None
                      else self.codec.new_decode_stream())
        r = _Response(
            job=job, item=item,
            controls=ControlState(self._controls(p), eot_id=self.specials.eot),
            text_params=p.sampling.text, speech_params=p.sampling.speech,
            detok=self.tokenizer.detokenizer(), stream=stream,
            t0=job.requested_at if job.requested_at is not None else time.perf_counter(),
            cpu0=min(cpu0, time.thread_time() - s.last_encode_cpu_s),
        )
        s.response = r
        r.timings["encode_ms"] = round(s.last_encode_ms, 3)
        s.last_encode_ms, s.last_encode_cpu_s = 0.0, 0.0
        # a response needs the hidden state of the rendering's last position: when the cache holds
        # all of it already (a regenerated answer), that position is computed again (vLLM's rule)
        cached = self._sync_cache(s, rendering, limit=len(rendering) - 1)
        r.cached_positions = cached
        r.prefill = rendering.prompt[cached:]
        r.prefill_positions = len(r.prefill)
        self._emit(s, ResponseStarted(job.response_id, item.item_id))

    def _context_limit(self, p: ResponseParams) -> int:
        """The positions a conversation may take before a response of ``p``."""
        room = max(1, min(p.max_output_patches, int(self.max_positions * self.config.response_room)))
        return self.max_positions - room

    def _fit_context(self, s: _Session, p: ResponseParams, response_id: str) -> Rendering | None:
        """Render the conversation; drop the oldest turns when it leaves the response too little room
        (see ``EngineConfig.response_room``)."""
        limit = self._context_limit(p)
        room = self.max_positions - limit
        target = limit - int(self.max_positions * self.config.trim_headroom)
        dropped: list[str] = []
        rendering = self._render(s)
        while len(rendering) > limit:
            most = len(s.items) - 2  # the new turn and its response stay
            if most < 1:
                self._emit(s, EngineError(
                    "context_length_exceeded",
                    f"the turn needs {len(rendering)} positions plus {room} for the response; "
                    f"the session's context holds {self.max_positions}",
                    response_id=response_id, item_id=s.items[-1].item_id))
                return None
            # down to the target, by the rendering's spans (the first user turn gains the
            # instructions: the next round drops more if that overshoots), never leaving an answer
            # without its question at the start
            spans, head = rendering.spans, rendering.spans[s.items[0].item_id][0]
            k = 1
            while k < most and (s.items[k].role is Role.ASSISTANT
                                or head + len(rendering) - spans[s.items[k].item_id][0] > target):
                k += 1
            dropped += [it.item_id for it in s.items[:k]]
            del s.items[:k]
            rendering = self._render(s)
        if dropped:
            self._emit(s, ItemsDropped(tuple(dropped), "context_limit"))
        return rendering

    def _render(self, s: _Session) -> Rendering:
        return self.renderer.render(s.items, instructions=s.instructions, voice_codes=s.voice_codes)

    def _sync_cache(self, s: _Session, rendering: Rendering | Prompt | None = None, limit: int | None = None) -> int:
        """Roll the slot back to the common prefix of its cache and the rendering (at most ``limit``
        positions); return its length."""
        if rendering is None:
            rendering = self._render(s)
        assert s.cached is not None
        keep = common_prefix(s.cached, rendering.prompt if isinstance(rendering, Rendering) else rendering)
        if limit is not None:
            keep = min(keep, limit)
        if keep < len(s.cached):
            self.cache.rollback(s.slot, keep)
            s.cached = s.cached[:keep]
        return keep

    def _prefill(self) -> None:
        budget = self.config.prefill_chunk
        for s in list(self._sessions.values()):
            r = s.response
            if r is None or r.phase != "prefill" or budget <= 0:
                continue
            assert r.prefill is not None
            chunk = r.prefill[:budget]
            budget -= len(chunk)
            with self._guard(s, "prefill"):
                self._prefill_chunk(s, r, chunk)
        for s in list(self._sessions.values()):
            if budget > 0 and self._provisional_due(s):
                with self._guard(s, "streaming prefill"):
                    budget -= self._prefill_provisional(s, budget)

    def _prefill_provisional(self, s: _Session, budget: int) -> int:
        """Streaming input: bring the slot to the conversation followed by the turn being spoken
        (its fixed patches), rolling back to where they part; at most ``budget`` positions, and
        never into the room kept for a response. Returns the positions prefilled."""
        pr = s.provisional
        pr.synced = True
        if pr.codes is None:  # no patch yet: its place may hold anything until one comes
            return 0
        target = self.renderer.open_turn(s.items, pr.codes, instructions=s.instructions, voice_codes=s.voice_codes)
        target = target[:self.max_positions - int(self.max_positions * self.config.response_room)]
        keep = self._sync_cache(s, target)
        chunk = target[keep:keep + budget]
        if len(chunk):
            self._prefill_positions(s, chunk)
        pr.synced = len(s.cached) == len(target)
        return len(chunk)

    def _prefill_positions(self, s: _Session, chunk: Prompt) -> torch.Tensor:
        """Prefill ``chunk`` behind what the slot holds; returns the last position's hidden state."""
        t = time.perf_counter()
        hidden = self.lm.prefill(self.cache, s.slot, self.embed_patches(*chunk.batch(self.device)))
        s.cached = s.cached + chunk
        self._observe("prefill", time.perf_counter() - t, {"positions": len(chunk)})
        return hidden

    def _prefill_chunk(self, s: _Session, r: _Response, chunk: Prompt) -> None:
        t = time.perf_counter()
        r.hidden = self._prefill_positions(s, chunk)
        r.prefill = r.prefill[len(chunk):]
        r.timings["prefill_ms"] = round(r.timings.get("prefill_ms", 0.0) + (time.perf_counter() - t) * 1000, 3)
        if len(r.prefill) == 0:
            r.prefill = None
            r.phase = "generate"
            r.mark("prefill_done_ms")

    # -------------------------------------------------------------------------------- decode
    def _lead_s(self, r: _Response, now: float) -> float:
        if r.t_first_audio is None:
            return 0.0
        return r.audio_samples / SAMPLE_RATE - (now - r.t_first_audio)

    def _decode_step(self) -> bool:
        """One batched step for the sessions ready to generate; returns whether it ran."""
        now = time.perf_counter()
        ready, held = [], []
        for s in self._sessions.values():
            r = s.response
            if r is None or r.phase != "generate":
                continue
            if r.cancel_reason is not None:
                with self._guard(s, "cancel"):
                    self._finish(s, "cancelled", r.cancel_reason)
                continue
            if self._held(s):
                if not self._paused(s):
                    held.append(s)
                continue
            if self._lead_s(r, now) > self.config.max_audio_lead_s:
                continue  # far enough ahead of the listener
            ready.append(s)
        ready += self._spare_rows(ready, held, now)
        if not ready:
            return False
        if self.config.yield_lead_s > 0 and len(ready) > 1:
            leads = [self._lead_s(s.response, now) for s in ready]
            if min(leads) < self.config.urgent_lead_s:
                ready = [s for s, lead in zip(ready, leads, strict=True) if lead < self.config.yield_lead_s]
        n = max(1, self.config.max_batch)
        if len(ready) > n:  # the rows closest to running dry first (round-robin order breaks ties)
            start = self._rr % len(ready)
            ready = sorted(ready[start:] + ready[:start], key=lambda s: self._lead_s(s.response, now))[:n]
            self._rr += n
        t = time.perf_counter()
        stepped = self._isolated("decode step", ready, self._step_rows, self._unstep)
        self._observe("decode_step", time.perf_counter() - t,
                      {"batch": len(ready), "speech": sum(patch[0] == self.specials.empty for _, patch in stepped)})
        self._each("decode step", stepped, self._stepped)
        return True

    def _spare_rows(self, ready: list[_Session], held: list[_Session], now: float) -> list[_Session]:
        """The held speculations that step: only in rows the batch has to spare, and never while a
        response that is heard is short of audio."""
        if not held or any(self._lead_s(s.response, now) < self.config.urgent_lead_s for s in ready):
            return []
        return held[:max(0, max(1, self.config.max_batch) - len(ready))]

    def _unstep(self, rows: list[_Session]) -> None:
        """A step that raised, undone for these rows: the slots forget what it wrote (the step's
        input, ``feed`` or ``hidden``, is only consumed by :meth:`_stepped`)."""
        for s in rows:
            if self.cache.length(s.slot) > len(s.cached):
                self.cache.rollback(s.slot, len(s.cached))

    def _stepped(self, s: _Session, patch: tuple[int, torch.Tensor, tuple]) -> None:
        """The step ran for ``s``: its input is in the cache now; then its new patch (and that
        patch on the device, the next step's input)."""
        r = s.response
        if r.hidden is not None:
            r.hidden = None
        else:
            s.cached = s.cached + r.feed
            r.feed = r.feed_device = None
        token, codes, on_device = patch
        self._accept_patch(s, token, codes)
        if r.feed is not None:
            r.feed_device = (r.feed, *on_device)

    def _step_rows(self, ready: list[_Session]) -> list[tuple[int, torch.Tensor, tuple]]:
        """One patch for each session: the batched backbone step, text sampling, then the batched
        patch decoder for the rows whose text token is ``<|empty|>``. Returns per row (token, codes
        on the host, (token (1,), codes (1, 4, 8)) on the device).

        The host sees device values only through :attr:`host` (one copy and one wait each): the
        text tokens, which decide which rows speak, and the speech rows' codes, which the codec and
        the session's history need. Everything else stays queued on the device."""
        hidden = self._backbone(ready)
        banned = text_bans([s.response.controls for s in ready], (len(ready), self.lm.config.vocab_size),
                           self.specials.empty, self.device)
        text_params = SamplingBatch.from_params([s.response.text_params for s in ready], self.device)
        tokens_device = self.sample_text(hidden, banned, text_params, [s.text_generator for s in ready])  # (B,)
        tokens = self.host.read(tokens_device)[0].tolist()  # a host array's values
        speech_rows = [i for i, tok in enumerate(tokens) if tok == self.specials.empty]
        codes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (host codes, device codes)
        if speech_rows:
            rows = to_device(speech_rows, self.device)
            speech_params = SamplingBatch.from_params([ready[i].response.speech_params for i in speech_rows],
                                                      self.device)
            decoded = self.decode_patch(hidden.index_select(0, rows), speech_params,
                                        [ready[i].speech_generator for i in speech_rows])  # (S, 4, 8)
            host_codes = self.host.read(decoded)[0]
            for j, i in enumerate(speech_rows):
                codes[i] = torch.from_numpy(host_codes[j]), decoded[j : j + 1]
        empty = (self._empty_codes, self._empty_codes_device)
        out = []
        for i, tok in enumerate(tokens):
            host, device = codes.get(i, empty)
            out.append((tok, host, (tokens_device[i : i + 1], device)))
        return out

    def _backbone(self, ready: list[_Session]) -> torch.Tensor:
        """Hidden states (B, hidden) for the rows: fed patches go through one batched decode step;
        rows fresh from prefill already have theirs. The rows' ``feed`` and ``hidden`` stay until
        :meth:`_stepped` (a step that raises is run again). A fed patch the last step sampled is
        still on the device (``feed_device``): no host-to-device copy."""
        feed = [s for s in ready if s.response.hidden is None]
        out: dict[int, torch.Tensor] = {}
        if feed:
            text_ids, codes = [], []
            for s in feed:
                r = s.response
                if r.feed_device is not None and r.feed_device[0] is r.feed:
                    text_ids.append(r.feed_device[1])
                    codes.append(r.feed_device[2])
                else:
                    text_ids.append(r.feed.text_ids.to(self.device, non_blocking=True))
                    codes.append(r.feed.codes.to(self.device, non_blocking=True))
            h = self.step_patches(self.cache, [s.slot for s in feed], torch.stack(text_ids), torch.stack(codes).long())
            for b, s in enumerate(feed):
                out[s.sid] = h[b]
        for s in ready:
            if s.response.hidden is not None:
                out[s.sid] = s.response.hidden[0]
        return torch.stack([out[s.sid] for s in ready])

    def _accept_patch(self, s: _Session, token: int, codes: torch.Tensor) -> None:
        r = s.response
        patch = Prompt(torch.tensor([token]), codes.unsqueeze(0).to(torch.int64))
        r.item.patches = r.item.patches + patch
        finished = r.controls.advance(token)
        r.mark("first_patch_ms")
        if token == self.specials.empty:
            r.speech_patches += 1
            r.mark("first_speech_patch_ms")
            r.new_codes.append(codes)
        elif token not in r.controls.controls.stop_ids:
            r.text_patches += 1
            r.mark("first_text_ms")
            delta = r.detok.push(token)
            if delta:
                self._emit(s, TextDelta(r.job.response_id, r.item.item_id, delta))
        room = self.max_positions - self.cache.length(s.slot)
        if finished:
            reason = r.controls.stop_reason
            status = "completed" if reason == "stop_token" else "incomplete"
            self._finish(s, status, None if status == "completed" else "max_output_tokens")
        elif room < 1:
            self._finish(s, "incomplete", "max_output_tokens")
        else:
            r.feed = patch

    # --------------------------------------------------------------------------------- codec
    def _pass_wait_s(self, r: _Response) -> float:
        """How long until ``r`` has a full codec pass: one decode step per missing speech patch, with
        room for the text patches of an interleave between them."""
        return (self.config.codec_max_patches - len(r.new_codes)) * self._step_s * 1.5

    def _codec_due(self, r: _Response, lead: float) -> bool:
        """Decode ``r``'s new speech patches now, or let more gather (see ``codec_defer_margin_s``)?"""
        margin = self.config.codec_defer_margin_s
        return (margin <= 0 or r.t_first_audio is None or len(r.new_codes) >= self.config.codec_max_patches
                or lead - self._pass_wait_s(r) < margin)

    def _codec_step(self) -> None:
        now = time.perf_counter()
        holding = [s for s in self._sessions.values()
                   if s.response is not None and s.response.stream is not None and s.response.new_codes]
        if self._responses_waiting():  # held speculations decode once no heard response waits
            holding = [s for s in holding if not self._held(s)]
        leads = {s.sid: self._lead_s(s.response, now) for s in holding}
        due = sorted((s for s in holding if self._codec_due(s.response, leads[s.sid])), key=lambda s: leads[s.sid])
        # Sessions stepping in one batch fill their passes on the same tick; decoding them all then
        # would make every 8th tick long (a stall for everyone). Pass at the rate that keeps up (one
        # pass per codec_max_patches steps of each session), closest to running dry first; a session
        # that must decode now (waiting for its first audio, or short of the margin) always does.
        budget = -(-len(holding) // max(1, self.config.codec_max_patches)) + 1
        work = [s for i, s in enumerate(due) if i < budget or s.response.t_first_audio is None
                or leads[s.sid] < self.config.codec_defer_margin_s]
        if self.config.yield_lead_s > 0 and self._responses_waiting():
            # a new turn is waiting for its first audio: sessions comfortably ahead decode later
            work = [s for s in work if s.response.t_first_audio is None or leads[s.sid] < self.config.yield_lead_s]
        if not work:
            return
        t = time.perf_counter()
        frames, received = {}, {}
        for s in work:
            frames[s.sid] = torch.cat(s.response.new_codes)  # (4k, 8) 25 Hz frames
            received[s.sid] = s.response.stream.tokens_received
            s.response.new_codes = []

        def run(rows: list[_Session]) -> list[np.ndarray]:
            # a pass that raised may have taken some streams' codes already: each gets the rest
            return self.codec.decode_streams(
                [(s.response.stream, frames[s.sid][s.response.stream.tokens_received - received[s.sid]:])
                 for s in rows])

        decoded = self._isolated("codec pass", work, run)
        self._observe("codec_decode", time.perf_counter() - t, {"batch": len(work)})
        self._each("codec pass", decoded, self._send_audio)

    def _send_audio(self, s: _Session, pcm: np.ndarray | None) -> None:
        r = s.response
        if pcm is None or len(pcm) == 0:
            return
        if r.t_first_audio is None and not self._held(s):  # a held answer's clock starts at its release
            r.t_first_audio = time.perf_counter()
            r.mark("first_audio_ms")
            # the engine thread's CPU time for this turn's first audio, which other processes on
            # the machine cannot inflate (exact with one intra-op thread; it also counts work for
            # other sessions batched in the same steps)
            r.timings["first_audio_cpu_ms"] = round((time.thread_time() - r.cpu0) * 1000, 3)
        r.audio_samples += len(pcm)
        if self._held(s):
            self._note_first_audio(s, time.perf_counter())
        self._emit(s, AudioDelta(r.job.response_id, r.item.item_id, np.asarray(pcm, dtype=np.float32)))

    # -------------------------------------------------------------------------------- finish
    def _finish(self, s: _Session, status: str, reason: str | None) -> None:
        r = s.response
        if r is None:
            return
        if r.stream is not None and status in ("completed", "incomplete"):
            if r.new_codes:
                frames = torch.cat(r.new_codes)
                r.new_codes = []
                self._send_audio(s, self.codec.decode_streams([(r.stream, frames)])[0])
            self._send_audio(s, self.codec.finish_stream(r.stream))
        tail = r.detok.flush()
        if tail and status in ("completed", "incomplete"):
            self._emit(s, TextDelta(r.job.response_id, r.item.item_id, tail))
        r.item.complete = True
        r.mark("total_ms")
        if status in ("completed", "incomplete") and r.job.params.in_conversation and not self._held(s):
            s.answer_patches = len(r.item.patches)
        s.response = None
        if not r.job.params.in_conversation:
            s.items.remove(r.item)
            self._sync_cache(s)
        usage = {
            "input_tokens": r.cached_positions + r.prefill_positions,
            "output_tokens": len(r.item.patches),
            "total_tokens": r.cached_positions + r.prefill_positions + len(r.item.patches),
            "input_token_details": {"cached_tokens": r.cached_positions},
            "output_token_details": {"text_tokens": r.text_patches, "audio_tokens": r.speech_patches},
        }
        timings = dict(r.timings)
        timings.update(prefill_positions=r.prefill_positions, cached_positions=r.cached_positions,
                       text_patches=r.text_patches, speech_patches=r.speech_patches,
                       audio_ms=round(speech_ms(r.item.patches, self.specials.empty)),
                       audio_samples=r.audio_samples)
        self._emit(s, ResponseDone(r.job.response_id, r.item.item_id, status, reason, usage, timings,
                                   self.renderer.assistant_text(r.item)))

    def _observe(self, name: str, seconds: float, labels: dict) -> None:
        if self._metrics is not None:
            try:
                self._metrics(name, seconds, labels)
            except Exception:
                log.exception("metrics callback failed")

    # -------------------------------------------------------------------------------- warmup
    def warmup(self, speech_sampling: Sequence[SamplingParams] = (),
               text_sampling: Sequence[SamplingParams] = ()) -> float:
        """Run every model path once (before :meth:`start`), and capture the CUDA graphs (the patch
        decoder's and the text head's for greedy and for ``speech_sampling`` / ``text_sampling``, the
        sessions' defaults); return the seconds it took."""
        t = time.perf_counter()
        with torch.inference_mode():
            slot = 0
            prompt = self.builder.text("<|im_start|>user\n") + self.builder.audio(
                self._encode([np.zeros(SAMPLE_RATE // 2, dtype=np.float32)])[0])
            h = self.lm.prefill(self.cache, slot, self.embed_patches(*prompt.batch(self.device)))
            self.sample_text(h, None, SamplingBatch.from_params([GREEDY], self.device), None)
            codes = self.decode_patch(h, None, None).cpu()
            self.step_patches(self.cache, [slot], torch.tensor([[self.specials.empty]], device=self.device),
                              codes.unsqueeze(1).to(self.device))
            stream = self.codec.new_decode_stream()
            self.codec.decode_streams([(stream, codes[0])])
            self.codec.finish_stream(stream)
            self.cache.reset(slot)
            if self.graphs is not None:
                seconds = self.graphs.capture_all(speech_sampling, text_sampling)
                if self.graphs.capture:
                    log.info("captured %d CUDA graphs in %.1f s", self.graphs.captures, seconds)
        return time.perf_counter() - t
