"""The ``mimo-agent`` command line.

Each sub-command lives in its own module, imported only when that command runs, so that
``mimo-agent talk`` (a client) never imports torch and ``mimo-agent --help`` is instant. A command
module provides ``add_arguments(parser, command)`` and ``run(args) -> int``; ``args.command`` holds
the command name.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("streaming.server", "run the realtime server (WebSocket, WebRTC, browser demo)"),
    "talk": ("streaming.talk", "talk to a server through this machine's microphone and speaker"),
    "bench": ("streaming.bench", "first-audio latency benchmark against a running or spawned server"),
    "bench-turns": ("streaming.bench.turns", "turn taking on recordings with spliced hold pauses: first audio, "
                                             "false cut-ins, the release rule swept"),
    "bench-interrupts": ("streaming.bench.interrupts", "how fast a cancel stops the answer (WebSocket, WebRTC)"),
    "bench-limits": ("streaming.bench.limits", "what vanished WebRTC offers and oversized offer bodies cost a server"),
    "fetch-turn-model": ("streaming.turn_model", "download semantic_vad's end-of-turn model (Smart Turn v3.2)"),
    "export": ("export.cli", "export the hot paths to ONNX"),
    "bench-onnx": ("export.bench", "ONNX Runtime vs PyTorch timings of the exported graphs (CPU)"),
    "tts": ("agent.offline", "text to speech, offline"),
    "asr": ("agent.offline", "speech to text, offline"),
    "dialogue": ("agent.offline", "one spoken-dialogue turn, offline"),
    "continue": ("agent.offline", "speech continuation, offline"),
    "bench-lm": ("agent.lm.bench", "per-patch step times of the language model"),
    "bench-codec": ("agent.codec.bench", "codec real-time factors and streaming-decode fidelity"),
    "calibrate-codec": ("agent.codec.prior", "calibrate a codec checkpoint's streaming GroupNorm prior "
                                             "(writes streaming_prior.json next to it)"),
    "bench-stream": ("agent.stream_bench", "streaming input: patches that survive the commit, commit-time work"),
    "train": ("agent.train.cli", "corpora, codec and LM of the built-in model (`train data|codec|dialogue-data|lm`)"),
    "bench-quality": ("agent.quality.bench", "answer accuracy on held-out voices, judged by an independent "
                                             "recognizer (text, speech, TTS)"),
    "eval-codec": ("agent.train.evaluate", "codec reconstruction quality: STOI and log-mel L1 on held-out voices"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or action.required or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (its module imported)."""
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mimo-agent {command}", description=help_, formatter_class=HelpFormatter)
    module.add_arguments(parser, command)
    return parser


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: mimo-agent COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`mimo-agent COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mimo-agent: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(rest)
    args.command = command
    return int(importlib.import_module(COMMANDS[command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
