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
