"""Writing files whole or not at all, for every part of rigtrain: a reader (another process,
a resumed run, a user's script) never sees half a file, and a crash leaves the old file or
the new one. At the bottom of the house: imports nothing from rigtrain."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, value, *, indent: int | None = 1) -> None:
    """`value` as JSON into `path`, through a temporary file beside it and a rename (atomic
    on POSIX within one filesystem). The temporary name carries the process id, so two
    processes writing the same file never mix their halves."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value, indent=indent))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
