"""The floor: the bare model work one turn cannot avoid, called directly in this process.

For a user turn it times what the server must do between the commit and the first audio: encode
the committed audio, prefill the positions the conversation's cache lacks, run the decode steps
(backbone step, text logits, the interleave's controls, the patch decoder for speech patches)
until the first speech patch, and decode the codec's first chunk (more patches if the codec's
schedule wants them). It uses the server's own pieces (``load_runtime`` with the same model
options and threads, the conversation renderer, the generation controls, the codec's decode
schedule), one conversation turn after turn so the prefix cache is used as the server uses it, and
no threads, queues, sockets or JSON: the server's first-audio time divided by this is its overhead.
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

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.prefill_ms + self.steps_ms + self.codec_ms


def measure_floor(args: argparse.Namespace, pcm: np.ndarray, *, turns: int, warmup: int,
                  max_output_tokens: int | None = None) -> dict[str, Any]:
    """Time ``warmup + turns`` turns of one conversation whose user says ``pcm`` (int16 24 kHz) each
    time; the warm-up turns are left out of the figures."""
    import torch

    from agent.conversation import ConversationRenderer, Item, Role, common_prefix
    from agent.lm.generation import ControlState, GenerationControls, Mode, mask_text_logits, parse_interleave
    from agent.lm.prompts import Prompt, PromptBuilder
    from agent.lm.sampling import GREEDY, SamplingBatch, sample
    from agent.runtime import PRESET_INTERLEAVE, PRESET_MAX_OUTPUT, PRESET_MIN_OUTPUT, load_runtime

    torch.set_grad_enabled(False)
    rt = load_runtime(args.model, args.tokenizer, args.preset, device=args.device, dtype=args.dtype,
                      threads=getattr(args, "threads", None))
    lm, codec, decode_patch = rt.lm, rt.codec, rt.lm.decode_patch
    if getattr(args, "backend", "torch") == "onnx":
        from export.runtime import onnx_backend

        decode_patch, codec = onnx_backend(rt, args.export_dir, providers=args.providers)
    dev = lm.device
    sp = rt.tokenizer.specials
    builder = PromptBuilder(rt.tokenizer, lm.config)
    renderer = ConversationRenderer(builder)
    cache = lm.allocate_cache(1, min(args.max_positions, lm.config.max_position_embeddings))
    interleave = args.interleave or (PRESET_INTERLEAVE if rt.preset else None)
    max_patches = max_output_tokens or (PRESET_MAX_OUTPUT if rt.preset else 1024)
    common = dict(stop_ids=tuple(sorted({sp.eostm, sp.im_end, sp.eos})), max_patches=max_patches,
                  min_patches=min(PRESET_MIN_OUTPUT if rt.preset else 0, max_patches))
    if interleave in (None, "off"):
        controls = GenerationControls(mode=Mode.FREE, **common)
    else:
        n, m = parse_interleave(interleave)
        controls = GenerationControls(mode=Mode.INTERLEAVE, text_patches=n, speech_patches=m, **common)
    schedule = _schedule(args)
    greedy = SamplingBatch.from_params([GREEDY], dev)
    audio = pcm.astype(np.float32) / 32768.0

    items: list[Item] = []
    cached = builder.tokens([])
    out: list[FloorTurn] = []
    for k in range(warmup + turns):
        t0 = time.perf_counter()
        codes = torch.as_tensor(codec.encode_batch([audio])[0], dtype=torch.int64).cpu()
        t1 = time.perf_counter()
        items.append(Item(f"user{k}", Role.USER, codes=codes))
        reply = Item(f"reply{k}", Role.ASSISTANT, patches=builder.tokens([]), audio_output=True)
        items.append(reply)
        prompt = renderer.render(items).prompt
        keep = common_prefix(cached, prompt)
        if keep < len(cached):
            cache.rollback(0, keep)
        new = prompt[keep:]
        h = lm.prefill(cache, 0, lm.embed_patches(*new.batch(dev)))
        cached = prompt
        t2 = time.perf_counter()
        state = ControlState(controls, eot_id=sp.eot)
        stream = codec.new_decode_stream(schedule) if schedule is not None else codec.new_decode_stream()
        steps, steps_s, codec_s, chunk = 0, 0.0, 0.0, None
        generated = fed = builder.tokens([])
        while chunk is None or len(chunk) == 0:
            ts = time.perf_counter()
            if steps:  # the previous patch goes through the backbone first
                h = lm.decode_step(cache, [0], lm.embed_patches(*fed.batch(dev)))
                cached = cached + fed
            logits = mask_text_logits(lm.text_logits(h), [state], sp.empty)
            token = int(sample(logits, greedy)[0])
            patch_codes = None
            if token == sp.empty:
                patch_codes = decode_patch(h, greedy, None).cpu()[0]  # (4, 8)
            steps += 1
            steps_s += time.perf_counter() - ts
            if state.advance(token):
                raise RuntimeError("the response ended before its first audio; the floor needs speech")
            fed = Prompt(torch.tensor([token]), (patch_codes if patch_codes is not None
                                                 else _empty(lm, sp)).unsqueeze(0).to(torch.int64))
            generated = generated + fed
            if patch_codes is not None:
                tc = time.perf_counter()
                chunk = codec.decode_streams([(stream, patch_codes)])[0]
                codec_s += time.perf_counter() - tc
        reply.patches, reply.complete = generated, True
        out.append(FloorTurn((t1 - t0) * 1000, (t2 - t1) * 1000, len(new), steps_s * 1000, steps,
                             codec_s * 1000, len(chunk)))
    measured = out[warmup:] or out
    summary = {name: round(statistics.median(getattr(t, name) for t in measured), 3)
               for name in ("encode_ms", "prefill_ms", "steps_ms", "codec_ms", "total_ms")}
    summary.update(
        min_total_ms=round(min(t.total_ms for t in measured), 3),
        steps=measured[-1].steps, prefill_positions=[t.prefill_positions for t in measured],
        first_chunk_samples=measured[-1].samples, turns=len(measured), warmup_turns=len(out) - len(measured),
        audio_s=round(len(pcm) / SAMPLE_RATE, 3), threads=rt.info.get("threads"),
        samples=[{**t.__dict__, "total_ms": round(t.total_ms, 3)} for t in out],
    )
    return summary


def _empty(lm: Any, sp: Any) -> Any:
    import torch

    return torch.tensor(lm.config.speech_empty_ids, dtype=torch.int64).expand(lm.config.group_size, -1)


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
