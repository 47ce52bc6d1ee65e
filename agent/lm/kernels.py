"""Kernel launches per patch (``mimo-agent bench-lm --kernels``).

At small batch a decode step costs what its launches cost, not what its arithmetic costs, so the
figure to drive down is how many kernels one patch runs. What is counted:

- on a CPU, every ATen operator that reaches a backend kernel, seen by a ``TorchDispatchMode``
  below autograd: composite operators arrive already split into the kernels they run (a fused
  operator such as ``rms_norm`` or ``scaled_dot_product_attention`` counts once), and views
  (``view``, ``transpose``, ``select``, ``detach`` ...: metadata only, no kernel) are not counted;
  host-to-device copies of small inputs count as the ``_to_copy`` they are;
- on CUDA, the device kernels the profiler records (``torch.profiler`` with CUDA activity), memory
  copies and sets included.

A text patch is one backbone step: the patch encoder over the new patch, the decode step, the text
head and the text sampler. A speech patch adds the patch decoder (11 steps, its heads and its
samplers). With ``layers`` set, each stack is built that shallow and its per-layer count is scaled
to the stack's full depth (every layer runs the same kernels), so the real 7B widths are counted
without 7B of weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agent.lm.config import MiMoAudioConfig
from agent.lm.sampling import SamplingBatch, task_sampling

# stacks of the model, by attribute name, and their depth field in the config
STACKS = {"model": "num_hidden_layers", "local_transformer": "local_layers",
          "input_local_transformer": "input_local_layers"}


# views the schema does not mark as views (metadata only: no kernel)
_UNMARKED_VIEWS = {"_unsafe_view", "_reshape_alias", "lift_fresh"}


class _Counter(TorchDispatchMode):
    """Counts the kernels dispatched (CPU), attributed to the stack whose layer runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.regions: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.where = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # a composite operator runs the operators it is made of: count those (under inference
        # mode composites reach this mode undecomposed; the mode is re-entered so their parts count)
        with self:
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _UNMARKED_VIEWS:
            self.counts[self.where] += 1
            self.ops[name] += 1
        return func(*args, **kwargs)


@dataclass
class KernelCount:
    """Kernels of one call: outside any layer, per stack (already scaled to full depth), and per
    compiled region (:class:`agent.lm.compiled.Compiled`; the launches of its generated code)."""

    other: int
    stacks: dict[str, float]
    ops: Counter[str]
    regions: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return round(self.other + sum(self.stacks.values()) + sum(self.regions.values()))


@contextmanager
def _counting_compiled(counter: _Counter) -> Iterator[None]:
    """Each call of inductor's compiled code adds the launches of its ``call`` wrapper to the region
    running it (the dispatch mode steps aside there: :class:`agent.lm.compiled.Compiled`)."""
    from torch._inductor.output_code import CompiledFxGraph

    from agent.lm.compiled import Compiled

    original = CompiledFxGraph.__call__
    launches: dict[int, int] = {}

    def call(graph, inputs):
        n = launches.setdefault(id(graph), compiled_launches([graph.source_code]))
        counter.regions[Compiled.active or "compiled"] += n
        counter.ops["compiled"] += n
        return original(graph, inputs)

    CompiledFxGraph.__call__ = call
    try:
        yield
    finally:
        CompiledFxGraph.__call__ = original


def count_kernels(lm: torch.nn.Module, fn: Callable[[], object], full_depth: dict[str, int] | None = None, *,
                  per_layer: bool = True) -> KernelCount:
    """Kernels launched by ``fn()``; each stack's share scaled from its built depth to ``full_depth``.
    Compiled regions are counted whole (their generated code runs every layer: no per-stack share);
    ``per_layer`` False counts without the layer hooks that attribute eager kernels to stacks (a
    compiled region must not see hooks it was not compiled with)."""
    stacks = {name: getattr(lm, name) for name in STACKS}
    full_depth = full_depth or {name: len(stack.layers) for name, stack in stacks.items()}
    if lm.device.type == "cuda":  # the profiler's kernels: compiled code's included, no hooks in a compiled region
        return _count_cuda(lm, fn, stacks if per_layer else {}, full_depth)
    counter = _Counter()
    hooks = []
    for name, stack in stacks.items() if per_layer else ():
        for layer in stack.layers:
            hooks.append(layer.register_forward_pre_hook(lambda *_, n=name: setattr(counter, "where", n)))
            hooks.append(layer.register_forward_hook(lambda *_: setattr(counter, "where", "other")))
    try:
        with _counting_compiled(counter), counter:
            fn()
    finally:
        for h in hooks:
            h.remove()
    scaled = {n: counter.counts[n] * full_depth[n] / len(s.layers) for n, s in stacks.items()}
    return KernelCount(counter.counts["other"], scaled, counter.ops, dict(counter.regions))


def _count_cuda(lm, fn, stacks, full_depth) -> KernelCount:  # pragma: no cover - needs a GPU
    """The profiler's CUDA kernels of ``fn()``, attributed through a record_function range per layer
    (eager) or per compiled region."""
    from torch.profiler import ProfilerActivity, profile, record_function

    hooks, ranges = [], {}
    for name, stack in stacks.items():
        for i, layer in enumerate(stack.layers):
            def enter(*_, key=(name, i)):
                ranges[key] = record_function(f"layer:{key[0]}")
                ranges[key].__enter__()

            def leave(*_, key=(name, i)):
                ranges.pop(key).__exit__(None, None, None)

            hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    events = prof.events()

    def kernels(evt) -> int:
        return len(evt.kernels) + sum(kernels(c) for c in evt.cpu_children)

    total = sum(len(e.kernels) for e in events)
    per_stack: Counter[str] = Counter()
    regions: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    for e in events:
        if e.name.startswith("layer:"):
            per_stack[e.name[len("layer:"):]] += kernels(e)
        if e.name.startswith("region:"):  # a compiled region (agent.lm.compiled.Compiled)
            regions[e.name[len("region:"):]] += kernels(e)
        if e.kernels:
            ops[e.name] += len(e.kernels)
    other = total - sum(per_stack.values()) - sum(regions.values())
    scaled = {n: per_stack[n] * full_depth[n] / len(s.layers) for n, s in stacks.items()}
    return KernelCount(other, scaled, ops, dict(regions))


def shallow(config: MiMoAudioConfig, layers: int | dict[str, int]) -> tuple[MiMoAudioConfig, dict[str, int]]:
    """``config`` with every stack ``layers`` deep (or each as deep as ``layers[name]``), and the
    stacks' full depths."""
    full = {name: getattr(config, field) for name, field in STACKS.items()}
    depth = layers if isinstance(layers, dict) else dict.fromkeys(STACKS, layers)
    return dataclasses.replace(config, **{field: min(depth[n], full[n]) for n, field in STACKS.items()}), full


def patch_kernels(lm, full_depth: dict[str, int] | None = None, batch: int = 1, context: int = 64, *,
                  compile: bool = False) -> tuple[KernelCount, KernelCount]:
    """(text patch, speech patch) kernel counts of ``batch`` sessions at ``context`` positions, with
    the spoken-dialogue sampling settings (text and speech sampled, top-p), as the engine runs a
    tick: the patch encoder and the backbone step, the text head and sampler, the patch decoder.

    Eager, the model's own functions run (the engine without graphs); with ``compile`` the engine's
    ``--compile`` path, :class:`agent.lm.graphs.DecodeGraphs` with its regions compiled (compiled
    on the first, uncounted, run). Compiled regions are not split by stack, so ``full_depth`` only
    scales the eager count."""
    from agent.lm.graphs import DecodeGraphs, sample_text

    cfg, device = lm.config, lm.device
    cache = lm.allocate_cache(batch + 1, context + 4)  # + the graphs' scratch slot
    gen = torch.Generator(device=device).manual_seed(0)
    lm.prefill(cache, 0, torch.randn(1, context, cfg.hidden_size, generator=gen, device=device).to(lm.dtype))
    for slot in range(1, batch):
        cache.copy_slot(0, slot)
    slots = list(range(batch))
    text = torch.full((batch, 1), cfg.empty_token_id, device=device)
    codes = torch.zeros(batch, 1, cfg.group_size, cfg.audio_channels, dtype=torch.int64, device=device)
    sampling = task_sampling("spoken_dialogue")
    text_params = SamplingBatch.from_params([sampling.text] * batch, device)
    speech_params = SamplingBatch.from_params([sampling.speech] * batch, device)
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    if compile:
        graphs = DecodeGraphs(lm, cache, max_batch=batch, scratch_slot=batch, capture=False, compile=True)
        step, text_tokens, decode_patch = graphs.step_patches, graphs.sample_text, graphs.decode_patch
    else:
        def step(cache, slots, text, codes):
            return lm.decode_step(cache, slots, lm.embed_patches(text, codes))

        text_tokens, decode_patch = functools.partial(sample_text, lm), lm.decode_patch

    def backbone():
        h = step(cache, slots, text, codes)
        text_tokens(h, None, text_params, gens)
        return h

    with torch.inference_mode():
        h = backbone()  # warm: lazy tables and caches (and compiled code) are built outside the count
        decode_patch(h, speech_params, gens)
        text_count = count_kernels(lm, backbone, full_depth, per_layer=not compile)
        speech_count = count_kernels(lm, lambda: decode_patch(backbone(), speech_params, gens), full_depth,
                                     per_layer=not compile)
    return text_count, speech_count


# a kernel launch in inductor's generated wrapper (CPU C++ kernels, Triton kernels, library calls
# such as mm, ATen fallbacks); allocations (empty_strided) and views (reinterpret_tensor) are not
_LAUNCH = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|aten\.\w+|"
                     r"torch\.ops\.\w+\.\w+)(?:\.\w+)?\(", re.MULTILINE)


def compiled_launches(sources: list[str]) -> int:
    """Kernel launches per call of inductor's generated code (the ``call`` wrapper's launch lines)."""
    return sum(len(_LAUNCH.findall(src[src.find("def call("):])) for src in sources if "def call(" in src)
