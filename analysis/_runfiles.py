"""Small file helpers shared by the command line, sweeps and the demo."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP_PREFIX = ".tmp-"


def _read_umask() -> int:
    # The only way to read the umask is to set it; done once, at import, so
    # that no write in a thread races with it.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same folder, so the final ``os.replace``
    is atomic: readers see the old file or the complete new one, never a
    partial write. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file private (0600); give the result the mode
        # a plain open() would have given it.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (sorted keys, NaN allowed)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=_jsonable))
    return Path(path)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, complex):
        return [value.real, value.imag]
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files an interrupted writer left in ``folder``."""
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n
