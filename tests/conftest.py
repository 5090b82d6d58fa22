"""What every test shares: the layout and the helpers' home.

The folders under ``tests/`` follow the packages of ``src/gpipe`` (``tests/stage`` tests
``gpipe.stage``, ...), with ``tests/integration`` for the end-to-end checks that cross them (the
model zoo, the README's examples, bad input across the whole front door). Helpers used by more
than one folder are plain modules here in ``tests/`` (``reference_impl``, ``spawn_ranks``,
``runs``, ``dist_mlp``, ``agents``), importable from every test because ``pyproject.toml`` puts
``tests/`` on the path; a helper used by one folder lives in that folder.
"""

from __future__ import annotations
