"""Delta Lake tables: the only place the store talks to ``deltalake``.

Why Delta Lake and not our own Parquet files: data files are immutable and a commit is one new entry in a
transaction log, so an append costs what it adds, a reader pinned to a version never sees a half-written commit,
and the tables stay readable by deltalake/polars/duckdb/Spark without our code.  A store commit spans several
tables; the store's manifest names the Delta version of each (see ``indexer.store.store``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

log = logging.getLogger(__name__)


class TableError(RuntimeError):
    """A Delta table that cannot be read at the version asked for (missing, damaged, vacuumed)."""


def exists(path: Path) -> bool:
    return (path / "_delta_log").is_dir()


def latest_version(path: Path) -> int | None:
    """The newest committed Delta version, or None when there is no table (or no readable log) here."""
    if not exists(path):
        return None
    try:
        return int(DeltaTable(str(path)).version())
    except (DeltaError, TableNotFoundError, OSError):
        return None


def create(path: Path, schema: pa.Schema, partition_by: Sequence[str] | None = None) -> int:
    """An empty table with ``schema`` (version 0); an existing table at ``path`` is overwritten to empty."""
    if exists(path):
        return overwrite(path, schema.empty_table(), partition_by=partition_by)
    path.parent.mkdir(parents=True, exist_ok=True)
    DeltaTable.create(str(path), schema=schema, partition_by=list(partition_by) if partition_by else None)
    return 0


def append(path: Path, table: pa.Table, partition_by: Sequence[str] | None = None) -> int:
    """Append rows as new Parquet parts; new columns (labels joined later) are merged into the schema."""
    write_deltalake(str(path), table, mode="append", schema_mode="merge",
                    partition_by=list(partition_by) if partition_by else None)
    return int(DeltaTable(str(path)).version())


def overwrite(path: Path, table: pa.Table, partition_by: Sequence[str] | None = None) -> int:
    """Replace every row (a retrained model's space, relabelled images); old parts stay for pinned readers."""
    write_deltalake(str(path), table, mode="overwrite", schema_mode="overwrite",
                    partition_by=list(partition_by) if partition_by else None)
    return int(DeltaTable(str(path)).version())


def delete(path: Path, predicate: str) -> int:
    """Delete the rows matching a SQL predicate (on a partition column this only rewrites the log)."""
    dt = DeltaTable(str(path))
    dt.delete(predicate)
    return int(DeltaTable(str(path)).version())


def restore(path: Path, version: int) -> None:
    """Make ``version`` the newest again (undo commits a killed run made after the store's last published one)."""
    dt = DeltaTable(str(path))
    if dt.version() > version:
        dt.restore(version)


def read(path: Path, version: int, columns: Sequence[str] | None = None,
         equals: tuple[str, str] | None = None) -> pa.Table:
    """The table as it was at ``version`` (only ``columns``; only rows whose ``equals[0]`` column is
    ``equals[1]``, e.g. one model's sparsity partition, when given)."""
    cols = list(columns) if columns is not None else None
    try:
        dt = DeltaTable(str(path), version=version)
        if equals is None:
            return dt.to_pyarrow_table(columns=cols)
        return dt.to_pyarrow_dataset().to_table(columns=cols, filter=pc.field(equals[0]) == equals[1])
    except (DeltaError, TableNotFoundError, OSError, pa.ArrowException) as e:
        why = f"{e.__class__.__name__}: {_first_line(e)}"
        raise TableError(f"{path}: unreadable at version {version} ({why})") from None


def vacuum(path: Path, retention_seconds: float) -> int:
    """Remove data files no version newer than ``retention_seconds`` ago still needs; returns how many."""
    with contextlib.suppress(DeltaError, TableNotFoundError, OSError):
        dt = DeltaTable(str(path))
        removed = dt.vacuum(retention_hours=max(0, int(retention_seconds // 3600)), dry_run=False,
                            enforce_retention_duration=False)
        return len(removed)
    return 0


def checkpoint(path: Path) -> None:
    """Write a Delta checkpoint at the newest version (opening a table then reads one file, not the whole log)."""
    with contextlib.suppress(DeltaError, TableNotFoundError, OSError):
        DeltaTable(str(path)).create_checkpoint()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
