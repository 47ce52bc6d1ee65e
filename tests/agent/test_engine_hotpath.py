"""The engine's decode step reads the device from the host only through its one-copy reader.

On a GPU, ``.tolist()``, ``.item()``, ``.cpu()``, ``bool(t)`` and blocking copies each drain the
device queue; operators such as ``nonzero`` do too. CUDA's sync debug mode does not exist on a
CPU, so the step runs under two monitors that see every call the engine makes: a
``TorchFunctionMode`` (the Python-level reads, ``torch.tensor(..., device=)``, ``torch.cat``) and
a ``TorchDispatchMode`` (the operators that synchronise: ``_local_scalar_dense``, ``nonzero`` ...).
The only allowed reads are :class:`agent.lm.host.HostReader`'s, at most two per step (the text
tokens, then the speech rows' codes), and no concatenation grows with the history.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from agent.engine import AddUserAudio, AddUserText, Engine, EngineConfig
from agent.lm.host import HostReader
from agent.lm.prompts import Prompt
from agent.lm.sampling import ChannelSampling, SamplingParams
from agent.runtime import load_runtime
from tests.agent.test_engine import Client, speech

pytestmark = pytest.mark.timeout(180)

HOST_READS = {"tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"}
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


class _Monitor(TorchFunctionMode):
    """Records host reads of tensors other than the reader's buffer, device-placed factories and
    the sizes of concatenations, while the decode step runs (and not while a response finishes:
    the codec's last pass is not the step's)."""

    def __init__(self, reader: HostReader) -> None:
        super().__init__()
        self.reader = reader
        self.reads: list[str] = []
        self.cat_elements: list[int] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if not self.paused:
            if name in HOST_READS and isinstance(args[0], torch.Tensor) and not self._reader_buffer(args[0]):
                self.reads.append(f"Tensor.{name} of {tuple(args[0].shape)}")
            if name == "tensor" and kwargs.get("device") is not None:
                self.reads.append("torch.tensor(..., device=)")
            if name in ("cat", "stack", "concat"):
                self.cat_elements.append(sum(t.numel() for t in args[0]))
        return func(*args, **kwargs)

    def _reader_buffer(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() == self.reader.buffer.untyped_storage().data_ptr()


class _SyncOps(TorchDispatchMode):
    """Counts the operators that synchronise, while ``monitor`` is not paused."""

    def __init__(self, monitor: _Monitor) -> None:
        super().__init__()
        self.monitor = monitor
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS and not self.monitor.paused:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(preset="tiny", device="cpu")


def _watch(engine: Engine) -> list[dict]:
    """Run each of the engine's decode steps (on its thread) under the monitors; one record per step."""
    ticks: list[dict] = []
    step, finish = engine._decode_step, engine._finish
    active: list[_Monitor] = []

    def watched_step() -> bool:
        reads0 = engine.host.reads
        monitor = _Monitor(engine.host)
        syncs = _SyncOps(monitor)
        active.append(monitor)
        try:
            with monitor, syncs:
                ran = step()
        finally:
            active.pop()
        if ran:
            ticks.append({"reads": monitor.reads, "syncs": dict(syncs.ops), "cat": monitor.cat_elements,
                          "host_copies": engine.host.reads - reads0,
                          "history": max((len(s.cached) for s in engine._sessions.values()), default=0)})
        return ran

    def unwatched_finish(*args, **kwargs):
        for m in active:
            m.paused += 1
        try:
            return finish(*args, **kwargs)
        finally:
            for m in active:
                m.paused -= 1

    engine._decode_step = watched_step
    engine._finish = unwatched_finish
    return ticks


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_decode_step_reads_the_device_only_through_one_copy_per_result(runtime, graphs):
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec,
                    EngineConfig(max_sessions=3, max_positions=1024), graphs=graphs)
    ticks = _watch(engine)
    engine.start()
    sampled = ChannelSampling(SamplingParams(0.8, top_p=0.9), SamplingParams(0.9, top_k=40, top_p=0.95))
    try:
        clients = [Client(engine, seed=i) for i in range(2)]
        clients[0].submit(AddUserText("u", "a long question " * 40))  # a long history for one row
        clients[1].submit(AddUserText("u", "hi"))
        threads = [threading.Thread(target=c.respond, args=(f"r{i}",),
                                    kwargs={"sampling": sampled, "max_output_patches": 24, "min_patches": 24,
                                                "interleave": (2, 3)})
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
    finally:
        engine.stop()
    assert len(ticks) >= 24
    assert all(t["host_copies"] in (1, 2) for t in ticks), [t["host_copies"] for t in ticks]
    assert any(t["host_copies"] == 2 for t in ticks)  # speech patches were decoded
    for t in ticks:
        assert t["reads"] == [] and t["syncs"] == {}, t
    # concatenations are per batch (patches, hidden states, a step's logits), never per position
    # of history: appending a patch to a 600-patch history would concatenate 600 x 33 values
    assert max(t["history"] for t in ticks) > 600
    config = runtime.lm.config
    bound = 3 * max(config.hidden_size, sum(config.speech_vocab_sizes))
    assert bound < 600 * 33
    assert max(max(t["cat"], default=0) for t in ticks) <= bound


def test_decode_step_reads_nothing_when_the_session_has_audio_history(runtime):
    """A spoken user turn before the response: the fed patches and the history are speech too."""
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec, EngineConfig(max_sessions=2, max_positions=1024))
    ticks = _watch(engine)
    engine.start()
    try:
        c = Client(engine)
        c.submit(AddUserAudio("u", speech(1.0)))
        c.respond("r", max_output_patches=10, min_patches=10)
    finally:
        engine.stop()
    assert ticks and all(t["reads"] == [] and t["syncs"] == {} for t in ticks), ticks


def test_prompt_append_is_a_value_and_reuses_its_store():
    def patches(ids: list[int]) -> Prompt:
        return Prompt(torch.tensor(ids), torch.tensor(ids).view(-1, 1, 1).expand(-1, 4, 8).clone())

    a = patches([1, 2])
    b = a + patches([3])
    c = b + patches([4])
    assert c._store is b._store and c.text_ids.tolist() == [1, 2, 3, 4]
    d = b + patches([9, 9])  # b is not its store's end any more: a copy, c unchanged
    assert d._store is not c._store
    assert c.text_ids.tolist() == [1, 2, 3, 4] and d.text_ids.tolist() == [1, 2, 3, 9, 9]
    assert b.text_ids.tolist() == [1, 2, 3] and a.text_ids.tolist() == [1, 2]
    assert d.codes[:, 0, 0].tolist() == [1, 2, 3, 9, 9]
    grown = patches([])
    for i in range(100):
        grown = grown + patches([i])
    assert grown.text_ids.tolist() == list(range(100)) and grown[10:12].text_ids.tolist() == [10, 11]
