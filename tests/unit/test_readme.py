"""What README.md states about the code, checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

from imaging_gateway.api.middlewares import PUBLIC_PATHS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_routes_without_a_token_are_the_public_ones() -> None:
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `GET (/[^`]*)` \| none \|", text, flags=re.MULTILINE)
    assert set(rows) == PUBLIC_PATHS
    sentence = re.search(r"Every route except ([^;]+?)\s+needs `Authorization", text)
    assert sentence is not None
    assert set(re.findall(r"`(/[^`]+)`", sentence.group(1))) == PUBLIC_PATHS


def test_links_name_only_files_in_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    root = README.parent
    targets = re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"see `([^`]+\.md)`", text)
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        assert (root / target).resolve().is_relative_to(root), target
        assert (root / target).exists(), target


def _commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"\A# [^\n]+\n\n```sh\n(.*?)\n```", text, flags=re.DOTALL)
    assert block is not None, "README.md does not open with its commands"
    return block.group(1).splitlines()


def test_ci_runs_the_readmes_set_up_and_exactly_its_test_command() -> None:
    demo, tests = _commands()
    setup, _, test_command = tests.partition(" && ")
    assert setup == ".ci/setup"
    assert "sudo" not in demo + tests  # the machines run the commands as root, without sudo
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    steps = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert steps[0] == setup and steps[-1] == test_command
    setup_script = (README.parent / ".ci" / "setup").read_text(encoding="utf-8")
    assert "apt-get update" in setup_script and "tests.support.ohif" in setup_script
