"""The migrated copies the index fixtures hand out: at head, empty, and rebuilt per migration set."""

from __future__ import annotations

import shutil
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from imaging_gateway.index.schema import audit_log, instances, studies
from imaging_gateway.index.sql import MIGRATIONS, SqlIndex
from tests.support.postgres import migrations_digest


async def test_an_index_url_is_at_head_and_empty(index_url: str, index: SqlIndex) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    heads = set(ScriptDirectory.from_config(cfg).get_heads())
    async with index.engine.connect() as conn:
        current = set((await conn.execute(sa.text("SELECT version_num FROM alembic_version")))
                      .scalars())
        counts = [(await conn.execute(sa.select(sa.func.count()).select_from(t))).scalar_one()
                  for t in (studies, instances, audit_log)]
    assert current == heads
    assert counts == [0, 0, 0]


def test_the_template_key_follows_every_migration_script(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert migrations_digest(folder) == migrations_digest()
    (folder / "__pycache__").mkdir(exist_ok=True)
    (folder / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    assert migrations_digest(folder) == migrations_digest()  # not a script
    newest = sorted((folder / "versions").glob("0*.py"))[-1]
    newest.write_text(newest.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    changed = migrations_digest(folder)
    assert changed != migrations_digest()
    (folder / "versions" / "0999_added.py").write_text("revision = '0999'\n", encoding="utf-8")
    assert migrations_digest(folder) not in {changed, migrations_digest()}
