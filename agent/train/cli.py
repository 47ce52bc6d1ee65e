"""``mimo-agent train data|codec|dialogue-data|lm``: the corpora, the codec and the LM of the built-in model."""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command -> (module, one-line help)
STAGES = {
    "data": ("agent.train.data", "synthesise the speech corpus (espeak-ng, flite, festival; sox augmentation)"),
    "codec": ("agent.train.codec", "train the audio tokenizer on a corpus (official layout checkpoint)"),
    "dialogue-data": ("agent.train.dialogue", "synthesise the language model's closed-domain dialogues as codes"),
    "lm": ("agent.train.lm", "train the language model on a dialogue corpus (official layout checkpoint)"),
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module, help_) in STAGES.items():
        sub = stages.add_parser(name, help=help_, description=help_, formatter_class=parser.formatter_class)
        importlib.import_module(module).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    """Run a stage; what it refuses (a bad option, a missing or mismatched corpus, a file it cannot
    read or write) is one line on stderr and exit status 2, not a traceback."""
    try:
        return int(importlib.import_module(STAGES[args.stage][0]).run(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"mimo-agent train {args.stage}: {exc}", file=sys.stderr)
        return 2
