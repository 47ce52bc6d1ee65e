"""``mimo-agent --help`` and each command's: every option explained, with its default."""

from __future__ import annotations

import argparse

import pytest

from streaming.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_with_its_default(command, capsys) -> None:
    parser = build_parser(command)
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        name = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{command} {name} has no help text"
        if action.default is None or action.default is False or action.default == []:
            continue
        shown = formatter._expand_help(action)
        assert "default" in shown, f"{command} {name}: its default {action.default!r} is not in --help"
        if "default" not in action.help:  # the formatter said it: the value itself
            assert shown.endswith(f"(default: {action.default})")
    assert capsys.readouterr().out.startswith(f"usage: mimo-agent {command}")


def test_the_options_the_new_user_run_found_unexplained(capsys) -> None:
    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    serve = help_of("serve")
    assert "--max-batch MAX_BATCH sessions per batched step; 1 turns batching off (default: 64)" in serve
    assert "(longer prompts take several ticks) (default: 256)" in serve
    assert "largest client message (default 16777216, 16 MiB)" in serve
    # --backend says what the README says ONNX Runtime runs
    assert "the patch encoder, the backbone step (short histories), the patch decoder and the codec" in serve
    talk = help_of("talk")
    assert "(default: ws://127.0.0.1:8000/v1/realtime)" in talk and "--voice VOICE audio.output.voice" in talk
    assert "default: the official one, 'You are MiMo-Audio" in help_of("dialogue")
    assert "(default: none, the audio is not kept)" in help_of("tts")
