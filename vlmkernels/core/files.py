"""Files written whole or not at all: the config, backends and designs files, the inspect
cache and budgets, and the benchmarks' merged results."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets

__all__ = ["replaced", "write_json"]


@contextlib.contextmanager
def replaced(path: pathlib.Path, **open_options):
    """A text file, opened for writing, that replaces ``path`` once the block completes.

    It is written beside ``path`` under a name of its own (processes sharing the folder
    never rename each other's halves), created as any new file is (the umask's permissions,
    not ``mkstemp``'s owner-only ones: a team's shared folder stays readable), given the
    permissions of the file it replaces, then renamed over it. A block that raises (a value
    that cannot be written, an interrupt, a full disk) leaves ``path`` as it was and removes
    the temporary. ``open_options``: ``open``'s (``newline=""`` for csv)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", **open_options) as f:
            yield f
        if path.is_file():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: pathlib.Path, doc: dict) -> None:
    """``doc`` as ``path`` (indented JSON and a newline), through :func:`replaced`."""
    with replaced(path) as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
