"""The OHIF Viewer's prebuilt bundle (npm ``@ohif/app``) for the browser test: where it lives, how it is fetched.

``python -m tests.support.ohif`` fetches it with ``npm pack`` into ``.cache/ohif/VERSION``
(gitignored) unless it is there already; ``.ci/run`` does that before the tests, and the
test does it on first use; a bundle that cannot be fetched fails the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
REPO = Path(__file__).resolve().parents[2]
DIST = REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
FETCH_COMMAND = "python -m tests.support.ohif"
README = REPO / "README.md"
README_MARK = "<!-- ohif-app-config:"
README_SERVER = "'https://gw.province.example/dicomweb'"
README_TOKEN = "'Bearer TOKEN'"


def readme_app_config(dicomweb: str, token: str) -> str:
    """The README's OHIF ``app-config.js`` block as written, only its URL and token replaced.

    The block is the first ``js`` code block after the ``<!-- ohif-app-config: ... -->``
    marker. Raises ``AssertionError`` when the marker, the block or the placeholders
    (the server URL three times, the token once) are not there.
    """
    text = README.read_text(encoding="utf-8")
    start = text.find(README_MARK)
    assert start >= 0, f"README.md has no {README_MARK!r} marker"
    block = re.search(r"^```js\n(.*?)^```$", text[start:], flags=re.MULTILINE | re.DOTALL)
    assert block is not None, "no ```js block after the README's OHIF marker"
    config = block.group(1)
    assert config.count(README_SERVER) == 3 and config.count(README_TOKEN) == 1, config
    return config.replace(README_SERVER, json.dumps(dicomweb)).replace(
        README_TOKEN, json.dumps(f"Bearer {token}"))


def missing() -> str | None:
    """Why the bundle cannot be used, or None when ``DIST`` holds a built viewer."""
    for name in ("index.html", "app-config.js"):
        if not (DIST / name).is_file():
            return f"OHIF {OHIF_VERSION} bundle missing ({DIST / name}); run `{FETCH_COMMAND}`"
    return None


def fetch() -> Path:
    """``npm pack`` the package and unpack its ``dist/`` into ``DIST``; returns ``DIST``.

    Raises:
        subprocess.CalledProcessError: npm failed (no registry, no such version).
        RuntimeError: the package holds no built viewer.
    """
    if missing() is None:
        return DIST
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "--silent", f"{OHIF_PACKAGE}@{OHIF_VERSION}"],
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            for m in members:
                m.name = m.name.removeprefix("package/")
            tar.extractall(DIST.parent, members=members, filter="data")
    if (reason := missing()) is not None:
        raise RuntimeError(reason)
    return DIST


if __name__ == "__main__":
    print(fetch(), file=sys.stderr)
