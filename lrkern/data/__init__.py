"""Where lrkern finds its offline data: ``$LRKERN_DATA_DIR``, else the shared data folder next to the project
(``../shared/data`` seen from the repository root), else ``../shared/data`` from the working directory. Nothing is
ever downloaded; every command also takes an explicit file."""
from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent.parent  # lrkern/data/__init__.py -> repository root


def data_dirs() -> list[Path]:
    dirs = [Path(os.environ["LRKERN_DATA_DIR"])] if os.environ.get("LRKERN_DATA_DIR") else []
    return dirs + [_REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def data_file(name: str) -> Path:
    """The path of a shared data file such as ``wikitext2-raw-test.txt``, or a clear error listing where it looked."""
    for d in data_dirs():
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{name} not found in {', '.join(map(str, data_dirs()))}; pass the file explicitly "
                            "(e.g. --data PATH) or set LRKERN_DATA_DIR")
