"""Value checks for ``gpipe.stage.remat`` by itself: the mode names, which micro-batches are
re-materialized, and the thread-local "am I recomputing?" flag (nesting, errors, threads).
They kill the remat mutants the pipe tests let live (docs/mutation.md)."""

from __future__ import annotations

import threading

import pytest

from gpipe.stage.remat import MODES, check_mode, is_recomputing, recomputing, should_remat


def test_check_mode_normalizes_and_refuses() -> None:
    assert MODES == ("always", "except_last", "never")
    assert [check_mode(m) for m in ("always", "Except-Last", "except_last", "NEVER")] == [
        "always",
        "except_last",
        "except_last",
        "never",
    ]
    with pytest.raises(ValueError) as info:
        check_mode("sometimes")
    assert str(info.value) == (
        "unknown remat mode 'sometimes'; choose one of always, except_last, never"
    )


def test_should_remat_per_mode() -> None:
    assert [should_remat("always", m, 3) for m in range(3)] == [True, True, True]
    assert [should_remat("except_last", m, 3) for m in range(3)] == [True, True, False]
    assert [should_remat("except_last", 0, 1)] == [False]
    assert [should_remat("never", m, 3) for m in range(3)] == [False, False, False]
    assert all(type(should_remat(mode, 0, 2)) is bool for mode in MODES)


def test_recomputing_flag_nests_and_restores() -> None:
    assert is_recomputing() is False
    with recomputing():
        assert is_recomputing() is True
        with recomputing():
            assert is_recomputing() is True
        assert is_recomputing() is True
    assert is_recomputing() is False
    with pytest.raises(KeyError), recomputing():
        raise KeyError("x")
    assert is_recomputing() is False


def test_recomputing_flag_is_per_thread() -> None:
    seen: list[bool] = []
    with recomputing():
        t = threading.Thread(target=lambda: seen.append(is_recomputing()))
        t.start()
        t.join()
        assert is_recomputing() is True
    assert seen == [False]
