"""What every ``gpipe`` subcommand shares: the usage error, the parser, and value checks.

The invariant: a user mistake becomes a :class:`UsageError` whose message is one line naming
the option, the value and what to use instead; :func:`gpipe.cli.main` prints it as
``gpipe: error: ...`` and returns 2. argparse's own errors (a bad int, an unknown flag, a
missing argument) go the same way instead of printing usage and exiting.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "UsageError",
    "check_folder_path",
    "check_int",
    "check_number",
    "check_output_file",
    "fail",
    "fmt_bytes",
    "one_line",
    "toml_module",
]

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` (one line, exit 2)
    instead of printing the usage block; subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        """Raise the argparse ``message`` as a usage error pointing at ``--help``."""
        where = self.prog.removeprefix("gpipe").strip()
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}{message} (see {self.prog} --help)")


def one_line(message: str) -> str:
    """``message`` with its line breaks folded, so an error is always exactly one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: str) -> int:
    """Print ``message`` as the one ``gpipe: error: ...`` line on stderr; return 2."""
    print(f"gpipe: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def check_int(flag: str, value: int, low: int, high: int | None = None) -> int:
    """``value`` if ``low <= value (<= high)``, else a :class:`UsageError` naming ``flag``."""
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UsageError(f"{flag} must be an integer {span}, got {value}")
    return value


def check_number(flag: str, value: float, low: float, hint: str = "") -> float:
    """``value`` if finite and ``>= low``, else a :class:`UsageError` naming ``flag``."""
    if not math.isfinite(value) or value < low:
        raise UsageError(f"{flag} must be a finite number >= {low:g}, got {value}{hint}")
    return value


def check_folder_path(flag: str, path: str) -> Path:
    """``path`` as a folder that exists or can be created: refuse it when it, or the nearest
    existing folder above it, is a file."""
    p = Path(path)
    for here in (p, *p.parents):
        if here.exists():
            if not here.is_dir():
                what = "is a file" if here == p else f"lies under {str(here)!r}, which is a file"
                raise UsageError(f"{flag} {path!r} {what}; pass a folder (created if missing)")
            break
    return p


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_output_file(flag: str, path: str, magic: bytes = PNG_MAGIC) -> Path:
    """``path`` as a file to write: refuse a folder, a parent folder that does not exist, or
    an existing file that does not start with ``magic`` (it would be overwritten)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; give a file name inside it")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(len(magic)) != magic:
                raise UsageError(
                    f"{flag} {path!r} exists and is not a PNG image; refusing to overwrite it — "
                    "give a new file name"
                )
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(
            f"{flag} {path!r}: the folder {str(parent)!r} does not exist (or is a file); "
            "create it first or write elsewhere"
        )
    return p


def fmt_bytes(n: float) -> str:
    """``n`` bytes in B/KiB/MiB/GiB/TiB, one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def toml_module() -> Any:
    """``tomllib`` (Python >= 3.11) or ``tomli``; a usage error when neither exists."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UsageError(
                "--config needs Python >= 3.11 (tomllib) or the tomli package"
            ) from None
    return tomllib
