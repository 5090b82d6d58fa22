"""``torch.compile`` and gpipe: compile the layers, not the pipe.

A pipe runs its stages on worker threads (or other ranks) and, before its first step, profiles
its layers on fake tensors; dynamo cannot hold either in one graph (profiling under dynamo's
tracing crashes the process). Compiled layers are another matter: a pipe runs a
``torch.compile``'d layer as it runs any module.

The invariant: code of gpipe that must run eagerly — a pipe's ``forward`` and ``step``, and
:func:`gpipe.planner.cost.profile` — refuses to be traced by dynamo (``torch.compile``,
``torch.export``) with one :class:`CompileError` naming the call and the way out, before it
does anything. Importing this module does not import ``torch._dynamo``: the refusal is
raised from :mod:`gpipe.base.compiling_eager`, imported only while dynamo traces.
"""

from __future__ import annotations

import torch

__all__ = ["CompileError", "compile_error", "refuse_compiling"]


class CompileError(RuntimeError):
    """``torch.compile`` (or ``torch.export``) traced a call gpipe must run eagerly."""


def compile_error(call: str) -> CompileError:
    """The refusal of ``call`` (``"pipe(x)"``, ``"pipe.step"``, ...) under dynamo's tracing."""
    return CompileError(
        f"torch.compile cannot trace {call}: a pipe runs its stages on worker threads (or "
        "other ranks) and profiles its layers on fake tensors, which one compiled graph cannot "
        "hold. Compile the layers instead and call the pipe as it is: "
        "gpipe.Pipe(nn.Sequential(*(torch.compile(layer) for layer in layers)), ...), or "
        "layer.compile() on each layer"
    )


def refuse_compiling(call: str) -> None:
    """Raise :class:`CompileError` naming ``call`` when dynamo is tracing it; else nothing.

    Raised from a function dynamo does not trace (it runs eagerly where the trace breaks):
    an exception raised inside the trace would make dynamo fall back to running the frame
    eagerly, where the check no longer sees the compiler, and the call would go on."""
    if torch.compiler.is_compiling():
        from gpipe.base.compiling_eager import raise_eagerly

        raise_eagerly(compile_error(call))
