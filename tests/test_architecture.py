"""Rules of the codebase's shape that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import cfl_sftp.domain
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.models import Base

FORBIDDEN_IN_DOMAIN = ("asyncssh", "sqlalchemy", "alembic", "structlog", "cfl_sftp.storage", "cfl_sftp.sftp")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_domain_source_imports_no_ssh_sql_or_logging_setup() -> None:
    domain = Path(cfl_sftp.domain.__file__).parent
    offenders = {
        f"{path.name}: {name}"
        for path in domain.glob("*.py")
        for name in _imported_modules(path)
        if name.startswith(FORBIDDEN_IN_DOMAIN)
    }
    assert offenders == set()


def test_importing_the_whole_domain_loads_neither_asyncssh_nor_sqlalchemy() -> None:
    modules = [f"cfl_sftp.domain.{m.name}" for m in pkgutil.iter_modules(cfl_sftp.domain.__path__)]
    assert len(modules) >= 10
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'asyncssh', 'sqlalchemy', 'alembic'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_migrations_and_models_agree(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'schema.sqlite3'}")
    db.upgrade()
    with db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    db.dispose()
    assert differences == []
