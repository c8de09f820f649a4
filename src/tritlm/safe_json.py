"""JSON metadata read from files tritlm did not necessarily write (configs, headers, pointers).

``json.loads`` raises RecursionError on deeply nested input and ``Path.read_text`` blocks for ever
on a FIFO; both become one-line :class:`~tritlm.errors.FormatError`\\ s here, so that every loader
that reads JSON refuses such a file the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tritlm.errors import FormatError


def loads(text: str | bytes, where: str) -> Any:
    """``json.loads``; malformed, non-UTF-8 or nested-too-deep text is a FormatError naming ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deep (corrupt file)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{where} is not valid JSON ({str(e)[:100]})") from None


def read_regular(path: str | Path, what: str = "") -> bytes:
    """The bytes of the regular file ``path`` (a FIFO, a device or a folder is refused before it is
    opened: reading one would block or fail obscurely); ``what`` names it in errors."""
    p = Path(path)
    name = f"{what} {p}".strip()
    if not p.is_file():
        raise FormatError(f"{name} is missing or not a regular file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {name}: {e.strerror or e}") from None


def read_json(path: str | Path) -> Any:
    """The JSON document in the regular file ``path`` (see :func:`read_regular`)."""
    return loads(read_regular(path), str(path))
