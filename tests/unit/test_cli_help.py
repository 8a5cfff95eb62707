"""`diffbox --help` and each command's help: every command shows examples, and every example
is a command line the parser takes as it is written."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from diffbox.__main__ import COMMANDS, build_parser


def _argv(example: str) -> list[str]:
    words = shlex.split(example, comments=True)
    assert words[0] == "diffbox", example
    # A shell redirection (`< request.json`) is the shell's, not the command's.
    return [w for i, w in enumerate(words[1:], 1) if w != "<" and words[i - 1] != "<"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_examples_the_parser_takes(name: str) -> None:
    examples = COMMANDS[name].examples
    assert examples, f"{name}: no examples"
    parser = build_parser()
    for example in examples:
        args = parser.parse_args(_argv(example))
        assert args.command in COMMANDS, example


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_help_shows_its_examples(name: str) -> None:
    shown = subprocess.run([sys.executable, "-m", "diffbox", name, "--help"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0
    assert "examples:" in shown.stdout
    for example in COMMANDS[name].examples:
        assert example in shown.stdout


def test_the_top_help_names_the_endpoints_and_exit_statuses() -> None:
    shown = subprocess.run([sys.executable, "-m", "diffbox", "--help"], capture_output=True, text=True, timeout=60)
    for text in ("modal:diffbox/Worker", "local", "RUNPOD_API_KEY", "124", "130", *COMMANDS):
        assert text in shown.stdout, text
