"""Names that become folders (task names, study names), and paths that must stay in the results folder.

A study's results go to ``<results>/<task>/<study>/``: a name such as ``..``, ``../../x``, an
absolute path or ``a/b`` would put them anywhere, and a results folder received from elsewhere may
hold a symbolic link that leads out of it.  :func:`validate_name` rejects such names;
:func:`ensure_inside` checks the resolved path of every folder autoft writes to.
"""
from __future__ import annotations

import re
from pathlib import Path

from autoft.errors import ConfigError

MAX_NAME = 128
# letters, digits, '_', '-', '.'; not starting with '.' (so not '.', '..' nor a hidden folder)
NAME_PATTERN = re.compile(rf"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{{0,{MAX_NAME - 1}}}")


def validate_name(value, field: str, *, file: str | Path | None = None) -> str:
    """``value`` if it is a plain folder name, else a :class:`ConfigError` naming ``field`` (and ``file``).

    Allowed: 1 to 128 letters, digits, ``_``, ``-`` and ``.``, not starting with ``.``; so no path
    separator, no ``.`` or ``..``, no absolute path, no hidden folder."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
        return value
    shown = value if not isinstance(value, str) or len(value) <= 60 else value[:57] + "..."
    raise ConfigError(f"'{shown}' is not a valid name: it names a folder under the results folder, so it must be "
                      f"1 to {MAX_NAME} letters, digits, '_', '-' or '.', not start with '.', and hold no path "
                      "separator (for example 'sweep-1')", file=str(file) if file else None, field=field)


def ensure_inside(path: str | Path, root: str | Path, field: str) -> Path:
    """``path`` if its resolved form (symbolic links followed) lies under the resolved ``root``; else a
    :class:`ConfigError` naming ``field``."""
    path, root = Path(path), Path(root)
    resolved, top = path.resolve(), root.resolve()
    if resolved.is_relative_to(top):
        return path
    raise ConfigError(f"{path} resolves to {resolved}, outside the results folder {top} (a symbolic link in it, "
                      "or a name with '..'?); autoft writes only under the results folder: remove the link or "
                      "choose another --results-dir", field=field)
