"""A stage's layers that write their input in place: they get a copy, and the saved input
stays as it was.

At a cut, a stage's boundary input is a fresh leaf that requires grad (its ``.grad`` is the
gradient sent back), so an in-place op on it — ``nn.ReLU(inplace=True)`` right after a cut,
as in most CNNs — is refused by autograd, while the plain model, where that tensor is an
intermediate, allows it. And a re-materialized micro-batch's forward runs under ``no_grad``
on the very input its recompute starts from, so an in-place write there would change what
the recompute sees.

The invariant: the layers of a stage never write into the tensors the stage keeps as its
input. A stage's :class:`Inputs` feeds them copies (:func:`copies`) when one of its
modules is an in-place module (:func:`writes_inputs`: any with ``inplace=True``) or once
autograd refused an in-place write on a boundary input (:func:`refused`, the forward then
re-run on copies); a write that neither catches (a functional in-place op under ``no_grad``) is detected by the
inputs' version counters (:func:`versions`) and refused with the stage and micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from gpipe.base.microbatch import tree_flatten

__all__ = ["Inputs", "check_unwritten", "copies", "refused", "versions", "writes_inputs"]

T = TypeVar("T")

_REFUSED = "a leaf Variable that requires grad is being used in an in-place operation"


def writes_inputs(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` (or their submodules) is set to work in place
    (``inplace=True``: ReLU, LeakyReLU, Hardtanh, Dropout, ... )."""
    return any(getattr(m, "inplace", False) is True for top in modules for m in top.modules())


def refused(error: BaseException) -> bool:
    """Whether ``error`` is autograd refusing an in-place op on a leaf that requires grad."""
    return isinstance(error, RuntimeError) and _REFUSED in str(error)


def copies(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a copy (differentiable: gradients reach the
    originals)."""
    leaves, rebuild = tree_flatten(tree)
    return rebuild([v.clone() if isinstance(v, torch.Tensor) else v for _, v in leaves])


def versions(tree: Any) -> list[int]:
    """The version counters of ``tree``'s tensors (an in-place write moves its tensor's)."""
    return [v._version for _, v in tree_flatten(tree)[0] if isinstance(v, torch.Tensor)]


def check_unwritten(tree: Any, before: list[int], stage: int, microbatch: int) -> None:
    """Raise, naming ``stage`` and ``microbatch``, if a tensor of ``tree`` was written in place
    since ``before`` (its :func:`versions`): a re-materialized forward's input must stay as
    it was, since the recompute starts from it."""
    if versions(tree) != before:
        raise RuntimeError(
            f"stage {stage}: micro-batch {microbatch}'s forward wrote into its input in place; "
            "re-materialization recomputes from that input, so it must stay as it was: use an "
            "out-of-place op (x = x * 2, not x.mul_(2)), a module with inplace=True (gpipe "
            "then copies the input), or remat='never'"
        )


class Inputs:
    """One stage's rule for its layers' inputs: copies once its layers are known to write them
    in place (an ``inplace=True`` module among ``modules``, or autograd's refusal seen)."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.copy = writes_inputs(modules)

    def fed(self, inputs: Any) -> Any:
        """What the layers run on: ``inputs``, or copies of them."""
        return copies(inputs) if self.copy else inputs

    def run(self, body: Callable[[Any], T], inputs: Any, check: bool, stage: int, mb: int) -> T:
        """``body(fed inputs)``; once more on copies if autograd refused an in-place write on
        them (learned for every later call); with ``check`` (a re-materialized forward), an
        unseen write into ``inputs`` is refused (:func:`check_unwritten`)."""
        before = versions(inputs) if check else []
        try:
            out = body(self.fed(inputs))
        except RuntimeError as e:
            if self.copy or not refused(e):
                raise
            self.copy = True
            out = body(self.fed(inputs))
        if check:
            check_unwritten(inputs, before, stage, mb)
        return out
