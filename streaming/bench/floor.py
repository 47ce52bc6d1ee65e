"""The floor: the bare model work one turn cannot avoid, called directly in this process.

For a user turn it times what the server must do between the commit and the first audio: encode
the committed audio, prefill the positions the conversation's cache lacks, run the decode steps
(backbone step, text logits, the interleave's controls, the patch decoder for speech patches)
until the first speech patch, and decode the codec's first chunk (more patches if the codec's
schedule wants them). It uses the server's own pieces (``load_runtime`` with the same model
options and threads, the conversation renderer, the generation controls, the codec's decode
schedule, the samplers and instructions of a default session), one conversation turn after turn
so the prefix cache is used as the server uses it, and no threads, queues, sockets or JSON: the
server's first-audio time divided by this is its overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

SAMPLE_RATE = 24_000


@dataclass
class FloorTurn:
    encode_ms: float
    prefill_ms: float
    prefill_positions: int
    steps_ms: float  # decode steps up to and including the patch the first chunk needs
    steps: int
    codec_ms: float
    samples: int  # of the first chunk
    cpu_ms: float = 0.0  # this process's CPU time for the turn (other processes cannot inflate it)

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.prefill_ms + self.steps_ms + self.codec_ms


class Floor:
    """The model loaded once; :meth:`block` times turns of a fresh conversation (its first turn a
    warm-up). Blocks run between the server's runs so both see the same machine load."""

    def __init__(self, args: argparse.Namespace, pcm: np.ndarray, *, max_output_tokens: int | None = None,
                 min_output_tokens: int | None = None) -> None:
        import torch

        from agent.conversation import ConversationRenderer
        from agent.lm.generation import GenerationControls, Mode, parse_interleave
        from agent.lm.prompts import PromptBuilder
        from agent.lm.sampling import SamplingBatch
        from agent.runtime import PRESET_INTERLEAVE, PRESET_MAX_OUTPUT, PRESET_MIN_OUTPUT, load_runtime
        from streaming.config import default_session_config
        from streaming.pipeline import model_sampling

        torch.set_grad_enabled(False)
        rt = load_runtime(args.model, args.tokenizer, args.preset, device=args.device, dtype=args.dtype,
                          threads=getattr(args, "threads", None), codec_prior=getattr(args, "codec_prior", True))
        self.rt, self.lm, self.codec = rt, rt.lm, rt.codec
        lm = rt.lm
        self.embed_patches, self.decode_step, self.decode_patch = lm.embed_patches, lm.decode_step, lm.decode_patch
        if getattr(args, "backend", "torch") == "onnx":  # the server's ONNX drop-ins
            from export.runtime import onnx_backend

            backend = onnx_backend(rt, args.export_dir, providers=args.providers)
            self.embed_patches, self.decode_step = backend.embed_patches, backend.decode_step
            self.decode_patch, self.codec = backend.decode_patch, backend.codec
        self.dev = self.lm.device
        self.sp = sp = rt.tokenizer.specials
        self.builder = PromptBuilder(rt.tokenizer, self.lm.config)
        self.renderer = ConversationRenderer(self.builder)
        self.max_positions = min(args.max_positions, self.lm.config.max_position_embeddings)
        self.cache = self.lm.allocate_cache(1, self.max_positions)
        interleave = args.interleave or (PRESET_INTERLEAVE if rt.preset else None)
        max_patches = max_output_tokens or (PRESET_MAX_OUTPUT if rt.preset else 1024)
        min_patches = max(min_output_tokens or 0, PRESET_MIN_OUTPUT if rt.preset else 0)
        common = dict(stop_ids=tuple(sorted({sp.eostm, sp.im_end, sp.eos})), max_patches=max_patches,
                      min_patches=min(min_patches, max_patches))
        if interleave in (None, "off"):
            self.controls = GenerationControls(mode=Mode.FREE, **common)
        else:
            n, m = parse_interleave(interleave)
            self.controls = GenerationControls(mode=Mode.INTERLEAVE, text_patches=n, speech_patches=m, **common)
        self.schedule = _schedule(args)
        session = default_session_config()  # what a session that changes nothing gets: instructions, samplers
        self.instructions = session.instructions
        self.text_sampling = SamplingBatch.from_params([model_sampling(session.mimo.sampling.text)], self.dev)
        self.speech_sampling = SamplingBatch.from_params([model_sampling(session.mimo.sampling.speech)], self.dev)
        self.text_gen = torch.Generator(device=self.dev).manual_seed(0)
        self.speech_gen = torch.Generator(device=self.dev).manual_seed(1)
        self.audio = pcm.astype(np.float32) / 32768.0
        self.audio_s = len(pcm) / SAMPLE_RATE
        self.turns: list[FloorTurn] = []

    def block(self, turns: int) -> None:
        """One warm-up turn, then ``turns`` timed turns, in a new conversation."""
        from agent.conversation import Item

        items: list[Item] = []
        self.cache.reset(0)
        cached = self.builder.tokens([])
        for k in range(turns + 1):
            turn, cached = self._turn(items, cached, k)
            if k:
                self.turns.append(turn)

    def _turn(self, items: list, cached: Any, k: int) -> tuple[FloorTurn, Any]:
        import torch

        from agent.conversation import Item, Role, common_prefix
        from agent.lm.generation import ControlState, mask_text_logits
        from agent.lm.prompts import Prompt
        from agent.lm.sampling import draw_uniform, sample

        lm, sp, dev, builder = self.lm, self.sp, self.dev, self.builder
        t0, cpu0 = time.perf_counter(), time.process_time()
        codes = torch.as_tensor(self.codec.encode_batch([self.audio])[0], dtype=torch.int64).cpu()
        t1 = time.perf_counter()
        items.append(Item(f"user{k}", Role.USER, codes=codes))
        reply = Item(f"reply{k}", Role.ASSISTANT, patches=builder.tokens([]), audio_output=True)
        items.append(reply)
        prompt = self.renderer.render(items, instructions=self.instructions).prompt
        keep = common_prefix(cached, prompt)
        if keep < len(cached):
            self.cache.rollback(0, keep)
        new = prompt[keep:]
        h = lm.prefill(self.cache, 0, self.embed_patches(*new.batch(dev)))
        cached = prompt
        t2 = time.perf_counter()
        state = ControlState(self.controls, eot_id=sp.eot)
        stream = self.codec.new_decode_stream(self.schedule) if self.schedule else self.codec.new_decode_stream()
        steps, steps_s, codec_s, chunk = 0, 0.0, 0.0, None
        generated = fed = builder.tokens([])
        while chunk is None or len(chunk) == 0:
            ts = time.perf_counter()
            if steps:  # the previous patch goes through the backbone first
                h = self.decode_step(self.cache, [0], self.embed_patches(*fed.batch(dev)))
                cached = cached + fed
            logits = mask_text_logits(lm.text_logits(h), [state], sp.empty)
            uniform = None
            if not self.text_sampling.all_greedy:
                uniform = draw_uniform([self.text_gen], 1, (), dev)
            token = int(sample(logits, self.text_sampling, uniform)[0])
            patch_codes = None
            if token == sp.empty:
                patch_codes = self.decode_patch(h, self.speech_sampling, [self.speech_gen]).cpu()[0]  # (4, 8)
            steps += 1
            steps_s += time.perf_counter() - ts
            if state.advance(token):
                raise RuntimeError("the response ended before its first audio; the floor needs speech")
            empty = torch.tensor(lm.config.speech_empty_ids, dtype=torch.int64).expand(lm.config.group_size, -1)
            fed = Prompt(torch.tensor([token]), (patch_codes if patch_codes is not None else empty).unsqueeze(0))
            generated = generated + fed
            if patch_codes is not None:
                tc = time.perf_counter()
                chunk = self.codec.decode_streams([(stream, patch_codes)])[0]
                codec_s += time.perf_counter() - tc
        cpu_ms = (time.process_time() - cpu0) * 1000
        reply.patches, reply.complete = generated, True
        turn = FloorTurn((t1 - t0) * 1000, (t2 - t1) * 1000, len(new), steps_s * 1000, steps, codec_s * 1000,
                         len(chunk), cpu_ms)
        return turn, cached

    def summary(self) -> dict[str, Any]:
        t = self.turns
        out = {name: round(statistics.median(getattr(x, name) for x in t), 3)
               for name in ("encode_ms", "prefill_ms", "steps_ms", "codec_ms", "total_ms", "cpu_ms")}
        out.update(
            min_total_ms=round(min(x.total_ms for x in t), 3), steps=t[-1].steps, turns=len(t),
            prefill_positions=statistics.median(x.prefill_positions for x in t),
            first_chunk_samples=t[-1].samples, audio_s=round(self.audio_s, 3), threads=self.rt.info.get("threads"),
            samples=[{**x.__dict__, "total_ms": round(x.total_ms, 3)} for x in t],
        )
        return out


def _schedule(args: argparse.Namespace) -> Any:
    """The codec schedule the server would use with the same ``--codec-*`` options."""
    if not (args.codec_first_chunk or args.codec_chunk):
        return None
    from dataclasses import replace

    from agent.codec.streaming import DecodeSchedule

    changes = {}
    if args.codec_first_chunk:
        changes["first_chunk_patches"] = args.codec_first_chunk
    if args.codec_chunk:
        changes["chunk_patches"] = args.codec_chunk
    return replace(DecodeSchedule(), **changes)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Any, device: Any, repeats: int) -> float:
    fn()  # warm
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def copy_bandwidth_gbs(device: Any, mib: int, repeats: int = 5) -> float:
    """Device memory bandwidth from a large tensor copy: bytes read plus bytes written per second."""
    import torch

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() / (ms / 1000) / 1e9


def backbone_report(floor: Floor, *, context: int = 256, repeats: int = 20) -> dict[str, Any]:
    """The backbone decode step (one session, ``context`` positions of history) against the
    memory-bandwidth floor (the bytes of the weights it reads over the measured copy bandwidth),
    and on CUDA the backbone step and the patch decoder with CUDA graphs on and off. The step and
    the patch decoder are the floor's, so ``--backend onnx`` times the ONNX Runtime graphs."""
    import torch

    from agent.lm.graphs import DecodeGraphs
    from agent.lm.sampling import SamplingBatch

    lm, dev = floor.lm, floor.dev
    weights = [*lm.model.layers.parameters(), *lm.model.norm.parameters(), *lm.lm_head.parameters()]
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    bandwidth = copy_bandwidth_gbs(dev, 1024 if dev.type == "cuda" else 256)
    out: dict[str, Any] = {"device": str(dev), "weight_mb": round(weight_bytes / 1e6, 1),
                           "copy_bandwidth_gbs": round(bandwidth, 1),
                           "bandwidth_floor_ms": round(weight_bytes / (bandwidth * 1e9) * 1000, 4), "context": context}
    cache = lm.allocate_cache(2, max(context + repeats + 8, 64))
    lm.prefill(cache, 0, torch.randn(1, context, lm.config.hidden_size, device=dev, dtype=lm.dtype))
    emb = torch.randn(1, 1, lm.config.hidden_size, device=dev, dtype=lm.dtype)
    h = torch.randn(1, lm.config.hidden_size, device=dev, dtype=lm.dtype)
    speech = SamplingBatch.from_params([floor.speech_sampling.params[0]], dev)

    def step(decode_step: Any) -> Any:
        def run() -> None:
            lm.text_logits(decode_step(cache, [0], emb))
            cache.rollback(0, context)
        return run

    with torch.inference_mode():
        # the serving backend's step and patch decoder (ONNX Runtime with --backend onnx)
        out["backbone_step_ms"] = round(_median_ms(step(floor.decode_step), dev, repeats), 3)
        out["patch_decoder_ms"] = round(_median_ms(lambda: floor.decode_patch(h, speech, None), dev, repeats), 3)
        if dev.type == "cuda":
            graphs = DecodeGraphs(lm, cache, max_batch=1, scratch_slot=1)
            out["backbone_step_graphs_ms"] = round(_median_ms(step(graphs.decode_step), dev, repeats), 3)
            out["patch_decoder_graphs_ms"] = round(
                _median_ms(lambda: graphs.decode_patch(h, speech, None), dev, repeats), 3)
    out["backbone_over_floor"] = round(out["backbone_step_ms"] / out["bandwidth_floor_ms"], 2)
    if "backbone_step_graphs_ms" in out:
        out["backbone_graphs_over_floor"] = round(out["backbone_step_graphs_ms"] / out["bandwidth_floor_ms"], 2)
    return out
