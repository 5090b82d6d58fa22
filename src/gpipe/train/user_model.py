"""A user's causal LM for ``gpipe train --model module:function``: load, build, check, capture.

``module:function`` names a function that returns ``(module, sample)`` or a module (it is called
as ``fn(seq_len=...)`` when it takes that keyword). The module must be a causal LM over byte
tokens: int64 token ids ``(batch, seq)`` in, logits ``(batch, seq, vocab >= 256)`` out — a
tensor, or a dict / dataclass (transformers' ``ModelOutput``) with a ``logits`` field.

The invariant: every way the user's code can fail (the spec, the import, the call, the output)
is one ``ValueError`` that names ``module:function`` and what to fix, raised before a pipe is
built; :func:`logits_of` is the one place the trainer reads logits out of the model's output.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gpipe.models import lm_loss

__all__ = [
    "build_user_model",
    "captured_user_model",
    "check_spec",
    "embedding_weights",
    "load_function",
    "logits_of",
    "user_lm_loss",
]

MIN_VOCAB = 256  # byte tokens


def check_spec(spec: Any) -> tuple[str, str]:
    """``(module, function)`` of ``spec``; ``ValueError`` unless it reads ``module:function``."""
    text = spec if isinstance(spec, str) else ""
    module, sep, fn = text.partition(":")
    if not sep or not module.strip() or not fn.strip() or ":" in fn:
        raise ValueError(
            f"model_fn must look like module:function (e.g. examples.hf_causal_lm:tiny_llama), "
            f"got {spec!r} (--model)"
        )
    return module.strip(), fn.strip()


def load_function(spec: str) -> Callable[..., Any]:
    """The function ``spec`` names, imported from the current directory or ``sys.path``."""
    module_name, fn_name = check_spec(spec)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any failure to import is theirs to fix
        raise ValueError(
            f"cannot import module {module_name!r} of --model {spec}: {type(e).__name__}: {e}; "
            "run from the folder that holds it or add it to PYTHONPATH"
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(
            f"module {module_name!r} has no function {fn_name!r} (--model {spec}); "
            f"it defines: {', '.join(n for n in dir(module) if not n.startswith('_'))[:300]}"
        )
    if not callable(fn):
        raise ValueError(f"--model {spec} is a {type(fn).__name__}, not a function")
    return fn


def build_user_model(spec: str, seq_len: int, rows: int) -> tuple[nn.Module, Any]:
    """Call ``spec``'s function; return its module and sample (a ``(rows, seq_len)`` int64
    token tensor when the function gives none), the module's output checked."""
    fn = load_function(spec)
    try:
        takes_seq = "seq_len" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_seq = False
    try:
        made = fn(seq_len=seq_len) if takes_seq else fn()
    except Exception as e:
        raise ValueError(f"--model {spec} raised {type(e).__name__}: {e}") from None
    sample: Any = None
    if isinstance(made, tuple) and len(made) == 2:
        made, sample = made
    if not isinstance(made, nn.Module):
        raise ValueError(
            f"--model {spec} returned a {type(made).__name__}; it must return an nn.Module "
            "(a causal LM over byte tokens) or a (module, sample) pair"
        )
    if sample is None:
        sample = torch.zeros(rows, seq_len, dtype=torch.long)
    else:
        _check_sample(sample, spec, seq_len)
    _check_output(made, sample, spec, seq_len)
    return made, sample


def captured_user_model(spec: str, seq_len: int, rows: int) -> tuple[nn.Module, nn.Module, tuple]:
    """:func:`build_user_model`, then captured and cut into layers (:mod:`gpipe.capture`):
    ``(layers, the user's module, the sample as the layers' flat inputs)``."""
    from gpipe.capture import capture, sample_args

    module, sample = build_user_model(spec, seq_len, rows)
    try:
        with _quiet(_TRACER_LOGGERS):
            layers = capture(module, sample)
    except Exception as e:  # the user's model: name it and the capture's reason
        msg = " ".join(str(e).split())[:400]
        raise ValueError(f"cannot capture --model {spec}: {msg}") from None
    return layers, module, tuple(layers.bind(*sample_args(sample)))


_TRACER_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor")
"""Loggers that print a graph or a traceback before a capture fails; the failure itself is
reported as one line."""


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Silence ``names`` and ``sys.stderr`` (``torch.export`` prints the partial graph of a
    failed export there) while a capture runs."""
    logs = [logging.getLogger(n) for n in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _check_sample(sample: Any, spec: str, seq_len: int) -> None:
    """The function's own sample must look like what the trainer feeds: one int64 tensor of
    token ids ``(rows, seq_len)``, passed positionally (the model is captured on it, and a
    captured model takes only calls shaped like its sample)."""
    from gpipe.capture import sample_args

    try:
        args, kwargs = sample_args(sample)
    except TypeError:
        args, kwargs = (), {}
    fix = (
        f"return a tensor of token ids of shape (rows, {seq_len}) as the sample (the function "
        "may take seq_len=), or no sample"
    )
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        what = f"keyword inputs {sorted(kwargs)}" if kwargs else f"a {type(sample).__name__}"
        raise ValueError(
            f"--model {spec} returned {what} as its sample; the trainer calls the model with "
            f"one tensor of token ids: {fix}"
        )
    ids = args[0]
    if ids.dim() != 2 or ids.shape[1] != seq_len or ids.dtype != torch.long:
        raise ValueError(
            f"--model {spec} returned a sample of shape {tuple(ids.shape)} and dtype "
            f"{str(ids.dtype).removeprefix('torch.')}, but the trainer feeds int64 token ids of "
            f"shape (batch, --seq-len {seq_len}): {fix}"
        )


def _check_output(model: nn.Module, sample: Any, spec: str, seq_len: int) -> None:
    """One forward of ``sample`` (eval mode, no grad): the output must hold byte logits."""
    from gpipe.capture import sample_args

    args, kwargs = sample_args(sample)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    except Exception as e:
        raise ValueError(
            f"--model {spec} fails on its sample ({type(e).__name__}: {str(e)[:300]}); it must "
            f"take int64 token ids of shape (batch, {seq_len})"
        ) from None
    finally:
        model.train(was_training)
    try:
        logits = logits_of(out)
    except TypeError as e:
        raise ValueError(f"--model {spec}: {e}") from None
    if logits.dim() != 3 or logits.shape[-1] < MIN_VOCAB:
        raise ValueError(
            f"--model {spec} gives logits of shape {tuple(logits.shape)}; a byte-level causal "
            f"LM gives (batch, seq, vocab) with vocab >= {MIN_VOCAB} (set vocab_size=256)"
        )


def logits_of(out: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``out["logits"]`` or
    ``out.logits``; ``TypeError`` naming what was found otherwise."""
    if isinstance(out, Tensor):
        return out
    found = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if not isinstance(found, Tensor):
        raise TypeError(
            f"its output is a {type(out).__name__} with no logits; return the logits tensor, "
            "or a dict / dataclass with a 'logits' field"
        )
    return found


def user_lm_loss(out: Any, targets: Tensor) -> Tensor:
    """:func:`gpipe.models.lm_loss` of the logits in ``out``."""
    return lm_loss(logits_of(out), targets)


def embedding_weights(model: nn.Module) -> set[int]:
    """Ids of the weights of ``model``'s ``nn.Embedding`` modules (never weight-decayed)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
