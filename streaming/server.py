"""``mimo-agent serve``: load the model, start the engine thread, serve HTTP on uvicorn + uvloop."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

log = logging.getLogger("mimo_agent.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device and engine options shared by ``serve`` and ``bench --spawn``."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="MiMo-Audio LM checkpoint: a local directory or a hub id (default: none, the "
                                   "built-in --preset)")
    g.add_argument("--tokenizer", help="MiMo-Audio-Tokenizer checkpoint: a local directory or a hub id (needed with "
                                       "--model; default: the preset's own)")
    from agent.presets import ALL_PRESETS, default_preset

    g.add_argument("--preset", choices=ALL_PRESETS,
                   help="built-in model: tiny-speech (trained on a closed spoken domain: small arithmetic, "
                        "counting, repeating words; packaged), tiny (random weights, for tests) or mimo-audio-7b "
                        f"(the real sizes, random weights) (default when no --model: {default_preset()}, in this "
                        "install)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on CUDA, fp32 on CPU (fp16 is refused: MiMo-Audio's LM runs in bf16)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: on a CPU all cores but one, left to the event loop)")
    e = parser.add_argument_group("engine")
    e.add_argument("--max-sessions", type=int, default=8, help="KV-cache slots: concurrent sessions (default 8)")
    e.add_argument("--max-positions", type=int, default=2048,
                   help="context per session in 160 ms patches (default 2048, 5.5 minutes)")
    e.add_argument("--max-batch", type=int, default=64, help="sessions per batched step; 1 turns batching off")
    e.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt positions prefilled per engine tick (longer prompts take several ticks)")
    e.add_argument("--interleave", default=None,
                   help="default N:M text/speech interleave (presets default to 2:6; 'off' for free)")
    e.add_argument("--min-output-patches", type=int, default=None,
                   help="patches every answer runs before it may stop (official min_new_tokens; presets default "
                        "to 8, checkpoints to 0)")
    e.add_argument("--stream-lag-patches", type=int, default=None, metavar="N",
                   help="streaming input: encode a server-VAD turn while it is spoken and prefill each patch "
                        "once N more patches of audio came (default: off, the turn is encoded at its commit)")
    e.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                   help="start the answer at a candidate end of turn and hold it: released at once when the turn "
                        "ends there (server_vad: first audio at speech_stopped), dropped unheard when the user "
                        "goes on (default on)")
    e.add_argument("--speculate-ms", type=int, default=None, metavar="MS",
                   help="silence that makes a candidate end of turn (default 200; semantic_vad scores it too)")
    e.add_argument("--speculate-lead-ms", type=int, default=None, metavar="MS",
                   help="start a held answer at least MS before the turn may end (its silence window): a pause "
                        "the user ends sooner costs nothing (default 150; the engine adds what held answers took "
                        "lately)")
    e.add_argument("--codec-first-chunk", type=int, default=None,
                   help="patches (160 ms each) before the first audio chunk (default 1)")
    e.add_argument("--codec-chunk", type=int, default=None, help="patches per later audio chunk (default 1)")
    e.add_argument("--codec-prior", action=argparse.BooleanOptionalAction, default=True,
                   help="start each audio stream's GroupNorm statistics from the audio tokenizer's calibrated "
                        "prior (its streaming_prior.json, when it has one: closer to the offline decode); "
                        "--no-codec-prior: running statistics only (default on)")
    e.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: run the patch encoder, the backbone step (short histories), the patch decoder and "
                        "the codec on ONNX Runtime, from --export-dir")
    e.add_argument("--export-dir", help="the directory `mimo-agent export` wrote (needed by --backend onnx)")
    e.add_argument("--providers", default=None,
                   help="ONNX Runtime providers in order, comma-separated (default: best available)")
    e.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass at start")
    e.add_argument("--turn-model", default=None,
                   help="semantic_vad's end-of-turn model (Smart Turn v3.2 ONNX; default: $MIMO_TURN_MODEL, the "
                        "cache filled by `mimo-agent fetch-turn-model`, or an installed pipecat-ai)")
    e.add_argument("--memory-limit-gib", type=float, default=None,
                   help="memory the engine may plan for beyond the weights (GiB; default: what the device has "
                        "free after loading, CUDA's free memory or the host's available RAM)")
    e.add_argument("--ignore-memory-plan", action="store_true",
                   help="start even when --max-sessions does not fit the memory plan (printed at start)")
    e.add_argument("--compile", action="store_true",
                   help="run a decoding tick (patch encoder and backbone step, text head and sampler, patch "
                        "decoder) through torch.compile (inductor: fused kernels; needs a C++ compiler on a CPU, "
                        "Triton on CUDA; compiles at start, or on first use with --no-warmup)")
    e.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay the decode step and the patch decoder as CUDA graphs, captured at "
                        "start (default on; ignored on a CPU)")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from streaming.outbox import DEFAULT_LEAD_S
    from streaming.session import SessionLimits

    parser.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any)")
    parser.add_argument("--api-key", default=os.environ.get("MIMO_AGENT_API_KEY"),
                        help="require this key (default: $MIMO_AGENT_API_KEY; none = open)")
    add_model_arguments(parser)
    lim = parser.add_argument_group("limits")
    limits = SessionLimits()
    lim.add_argument("--max-message-bytes", type=int, default=None,
                     help=f"largest client message (default {limits.max_message_bytes}, "
                          f"{limits.max_message_bytes / 2**20:g} MiB)")
    lim.add_argument("--max-input-buffer-ms", type=int, default=None,
                     help=f"uncommitted input audio per session (default {limits.max_input_buffer_ms})")
    lim.add_argument("--session-max-s", type=float, default=None,
                     help=f"session duration limit (default {limits.max_session_s:g})")
    lim.add_argument("--events-per-second", type=float, default=None,
                     help=f"client events per second (default {limits.max_events_per_second:g})")
    lim.add_argument("--audio-lead", type=float, default=None,
                     help=f"output audio sent ahead of real time, in seconds (default {DEFAULT_LEAD_S:g})")
    lim.add_argument("--send-queue-mib", type=float, default=None,
                     help="events waiting to be sent, per session, before it is closed (MiB, default 32)")
    parser.add_argument("--ice-server", dest="ice_servers", action="append", type=_ice_server, metavar="URL",
                        default=None,
                        help="WebRTC STUN/TURN server, repeatable: stun:HOST:PORT, turn:USER:PASSWORD@HOST:PORT"
                             "[?transport=udp|tcp] (default: $MIMO_AGENT_ICE_SERVERS, space-separated; none: "
                             "host candidates only, for localhost and LANs)")
    parser.add_argument("--cors-origin", dest="cors_origins", action="append", type=_origin, metavar="ORIGIN",
                        default=[], help="let pages on this origin (scheme://host[:port]) use the server from a "
                                         "browser: import /sdk/, place WebRTC calls, mint client secrets; "
                                         "repeatable (default: none, same origin only)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="what the server logs")
    parser.add_argument("--port-file", help="write the bound port to this file once listening (for scripts; "
                                            "default: none)")
    if command == "serve":
        from streaming.rayserve.cli import add_ray_arguments

        add_ray_arguments(parser)


def _origin(origin: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(origin)
    if origin != "*" and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path
                          or parts.query or parts.fragment or parts.username):
        raise argparse.ArgumentTypeError(f"{origin!r} is not an origin: use scheme://host[:port], e.g. "
                                         "https://app.example.com or http://localhost:3000 (no path)")
    return origin


def _ice_server(url: str) -> str:
    from streaming.webrtc import parse_ice_server

    try:
        parse_ice_server(url)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return url


def build_engine(args: argparse.Namespace, metrics: Any = None) -> tuple[Any, Any, dict]:
    """(engine, runtime, session defaults) from the parsed model/engine options; the engine is started."""
    from agent.engine import Engine, EngineConfig
    from agent.runtime import PRESET_INTERLEAVE, PRESET_MAX_OUTPUT, PRESET_MIN_OUTPUT, load_runtime

    rt = load_runtime(args.model, args.tokenizer, args.preset, device=args.device, dtype=args.dtype,
                      threads=getattr(args, "threads", None), codec_prior=getattr(args, "codec_prior", True))
    drop_ins: dict[str, Any] = {}
    codec = rt.codec
    if args.backend == "onnx":
        from export.runtime import onnx_backend

        backend = onnx_backend(rt, args.export_dir, providers=args.providers)
        drop_ins, codec = backend.engine_kwargs(), backend.codec
    config = EngineConfig(max_sessions=args.max_sessions, max_positions=args.max_positions,
                          max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                          min_output_patches=(args.min_output_patches if args.min_output_patches is not None
                                              else PRESET_MIN_OUTPUT if rt.preset else 0),
                          cuda_graphs=getattr(args, "cuda_graphs", True),
                          memory_limit_bytes=(None if getattr(args, "memory_limit_gib", None) is None
                                              else int(args.memory_limit_gib * 2**30)),
                          memory_check=not getattr(args, "ignore_memory_plan", False),
                          compile=getattr(args, "compile", False),
                          **({} if getattr(args, "speculate_lead_ms", None) is None
                             else {"speculate_lead_s": args.speculate_lead_ms / 1000}),
                          **({} if getattr(args, "stream_lag_patches", None) is None
                             else {"stream_lag_patches": args.stream_lag_patches}))
    engine = Engine(rt.lm, rt.tokenizer, codec, config, metrics=None if metrics is None else metrics.engine_observer,
                    **drop_ins)
    rt.info["cuda_graphs"] = engine.graphs is not None and engine.graphs.capture
    rt.info["memory"] = memory_summary(engine.memory)
    if not args.no_warmup:
        rt.info["warmup_s"] = round(engine.warmup(**default_sampling()), 3)
    engine.start()
    interleave = args.interleave or (PRESET_INTERLEAVE if rt.preset else None)
    defaults: dict = {"mimo": {"interleave": None if interleave in (None, "off") else interleave}}
    if rt.preset:
        defaults["max_output_tokens"] = PRESET_MAX_OUTPUT
    if args.codec_first_chunk or args.codec_chunk:
        defaults["mimo"]["codec"] = {"first_chunk_patches": args.codec_first_chunk,
                                     "chunk_patches": args.codec_chunk}
    return engine, rt, defaults


def memory_summary(memory: dict[str, int]) -> dict[str, Any]:
    """The engine's per-session memory (``Engine.memory``) for /healthz and the start-up line,
    with the codec decoder's KV cache per stream at the real size (the shipped tokenizer, bf16)
    beside the loaded one's."""
    import torch

    from agent.codec.config import preset
    from agent.codec.streaming import decode_cache_bytes

    return {**memory, "codec_kv_bytes_per_session_real_size": decode_cache_bytes(preset("mimo-audio-tokenizer"),
                                                                                   torch.bfloat16)}


def describe_memory(m: dict[str, Any]) -> str:
    """The memory plan (:class:`agent.memory.MemoryPlan`) in one line, for the start-up log."""
    mib = 2**20
    where = "the --memory-limit-gib" if m["limited"] else f"free on {m['device']}"
    return (f"weights {m['weights_bytes'] / mib:,.1f} MiB; {m['max_sessions']} sessions x (LM KV "
            f"{m['lm_kv_bytes_per_session'] / mib:.1f} MiB + codec decoder KV "
            f"{m['codec_kv_bytes_per_session'] / mib:.1f} MiB per stream; "
            f"{m['codec_kv_bytes_per_session_real_size'] / mib:.0f} MiB at the real size in bf16) + "
            f"{m['extra_slots']} scratch slot(s) + activations {m['activation_bytes'] / mib:,.1f} MiB = "
            f"{m['total_bytes'] / 2**30:.2f} GiB of {m['available_bytes'] / 2**30:.2f} GiB {where} "
            f"({m['fitting_sessions']} sessions would fit)")


def default_sampling() -> dict[str, list[Any]]:
    """The speech and text samplers of a session that changes nothing (their CUDA graphs are
    captured at start): :meth:`agent.engine.Engine.warmup`'s keyword arguments."""
    from streaming.config import default_session_config
    from streaming.pipeline import model_sampling

    sampling = default_session_config().mimo.sampling
    return {"speech_sampling": [model_sampling(sampling.speech)], "text_sampling": [model_sampling(sampling.text)]}


def codec_schedule_factory(codec: Any) -> Any:
    """Protocol ``session.mimo.codec`` -> the codec's decode schedule (None fields: its default)."""
    from dataclasses import replace

    from agent.codec.streaming import DecodeSchedule

    base = DecodeSchedule()

    def make(schedule: Any) -> Any:
        if schedule is None:
            return None
        changes = {}
        if schedule.first_chunk_patches is not None:
            changes["first_chunk_patches"] = schedule.first_chunk_patches
        if schedule.chunk_patches is not None:
            changes["chunk_patches"] = schedule.chunk_patches
        if schedule.left_context_patches is not None:
            changes["left_context_tokens"] = schedule.left_context_patches * base.group_size
        if schedule.right_holdback_patches is not None:
            changes["holdback_tokens"] = schedule.right_holdback_patches * base.group_size
        return replace(base, **changes) if changes else None

    return make


def make_server_config(args: argparse.Namespace, rt: Any, defaults: dict) -> Any:
    from dataclasses import replace

    from streaming.app import ServerConfig
    from streaming.session import SessionLimits

    limits = SessionLimits()
    overrides = {"max_message_bytes": args.max_message_bytes, "max_input_buffer_ms": args.max_input_buffer_ms,
                 "max_session_s": args.session_max_s, "max_events_per_second": args.events_per_second}
    limits = replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    ice_servers = args.ice_servers
    if ice_servers is None:
        ice_servers = os.environ.get("MIMO_AGENT_ICE_SERVERS", "").split()
    config = ServerConfig(model_name=rt.name, api_key=args.api_key or None, limits=limits,
                          session_defaults=defaults, description=dict(rt.info), ice_servers=tuple(ice_servers),
                          cors_origins=tuple(getattr(args, "cors_origins", None) or ()),
                          stream_input=(getattr(args, "stream_lag_patches", None) is not None
                                        or getattr(args, "speculate", True)),
                          speculate=getattr(args, "speculate", True),
                          turn_model=getattr(args, "turn_model", None))
    if getattr(args, "speculate_ms", None) is not None:
        config.candidate_ms = args.speculate_ms
    if args.audio_lead is not None:
        config.audio_lead_s = args.audio_lead
    if args.send_queue_mib is not None:
        config.max_queued_bytes = int(args.send_queue_mib * 2**20)
    return config


def build_server(args: argparse.Namespace, metrics: Any = None) -> Any:
    """The app of one server (engine started, ``app.state.runtime`` set) from the parsed options: what
    ``serve`` runs on uvicorn and what each Ray Serve replica runs (``streaming.rayserve``)."""
    from streaming.app import create_app
    from streaming.metrics import ServerMetrics

    metrics = metrics or ServerMetrics()
    engine, rt, defaults = build_engine(args, metrics)
    metrics.engine_queue.set_function(lambda: engine.queue_depth)
    app = create_app(engine, make_server_config(args, rt, defaults), metrics=metrics)
    app.state.codec_schedule = codec_schedule_factory(rt.codec)
    app.state.runtime = rt
    return app


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.codec.prior import describe_streaming

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", False):
        from streaming.rayserve.cli import run_ray

        return run_ray(args)
    try:
        app = build_server(args)
    except Exception as exc:  # checkpoint errors and the like: one clear line, no traceback
        print(f"mimo-agent serve: {exc}", file=sys.stderr)
        return 2
    engine, rt = app.state.engine, app.state.runtime
    log.info("serving %s (preset %s) on %s %s, %d session slots, %d positions each; loaded in %.1f s%s",
             rt.name, rt.preset or "-", rt.device, rt.info["dtype"], engine.config.max_sessions,
             engine.max_positions, rt.load_s,
             f", warm-up {rt.info['warmup_s']} s" if "warmup_s" in rt.info else "")
    log.info("model %s", rt.card.describe())
    log.info("audio streams start from %s", describe_streaming(getattr(rt.codec, "streaming_prior", None)))
    log.info("memory plan: %s", describe_memory(rt.info["memory"]))
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level=args.log_level,
                                           loop="uvloop" if sys.platform != "win32" else "asyncio"))
    _when_listening(server, args.host, args.port_file)
    try:
        server.run()
    finally:
        engine.stop()
    return 0


def uvicorn_config(app: Any, host: str, port: int, *, log_level: str, loop: str) -> Any:
    """How uvicorn runs the app: websockets' sans-I/O protocol (its legacy one is deprecated),
    frames up to twice the largest client message (base64 and JSON around it), no deflate."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, loop=loop, ws="websockets-sansio",
                          ws_max_size=2 * app.state.config.limits.max_message_bytes, ws_per_message_deflate=False,
                          lifespan="off")


def _when_listening(server: Any, host: str, port_file: str | None) -> None:
    """Once uvicorn listens (``--port 0`` picks a free port): say where the demo page is, and
    write the port to ``port_file``."""
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets=sockets)
        if not server.servers:  # the bind failed: uvicorn says why and exits
            return
        port = server.servers[0].sockets[0].getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
        log.info("demo page: open http://%s:%d/ in a browser (speak, or type; no microphone needed to type)",
                 shown, port)
        if port_file:
            write_port_file(port_file, port)

    server.startup = startup


def write_port_file(path: str, port: int) -> None:
    """Atomically, so that a script polling for the file never reads half of it."""
    with open(path + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(path + ".tmp", path)
