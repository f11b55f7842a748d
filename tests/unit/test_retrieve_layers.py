"""The WADO-RS retrieve split: the service knows no aiohttp, the dicom/ pieces no I/O layer."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Imported in a fresh interpreter: what these modules pull in, transitively.
_PROBE = """
import sys
import {module}
print(",".join(sorted(m for m in sys.modules if m == "aiohttp" or m.startswith((
    "aiohttp.", "imaging_gateway.api", "imaging_gateway.services",
    "imaging_gateway.storage", "imaging_gateway.index", "imaging_gateway.security",
)))))
"""


def _imported(module: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return {m for m in done.stdout.strip().split(",") if m}


def test_retrieve_service_imports_no_aiohttp() -> None:
    imported = _imported("imaging_gateway.services.retrieve")
    assert not {m for m in imported if m.split(".")[0] == "aiohttp"}
    assert not {m for m in imported if m.startswith("imaging_gateway.api")}


@pytest.mark.parametrize("module", ["pixels", "rendering", "multipart"])
def test_dicom_retrieve_pieces_are_pure(module: str) -> None:
    # Pure functions on DICOM bytes: nothing of aiohttp, the stores, the index or the API.
    assert _imported(f"imaging_gateway.dicom.{module}") == set()
