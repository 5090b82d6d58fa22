"""The capture checks itself: the cut layers against the model, on the sample, in every mode.

A capture that computes something else than the model (a tracer that fixed a branch, a mode
the graph froze, a bug in the cut) would train another model without a word. So
:func:`verify` runs the model and the captured layers on the capture's own sample, in each
mode a graph was captured for, with the same random numbers for both (each run starts from
the same seed), and refuses with the largest difference and the first output where the two
diverge beyond float rounding. A model that fails on the sample itself is named as such, and
where the graph holds a region traced with gradients off (``torch.no_grad()``, or a reentrant
``torch.utils.checkpoint``, which runs its body so), both run with gradients on and an output
the model differentiates but the graph does not is refused (the pipe would train nothing
there).

The invariant: the model comes back as it was — its modes, buffers (BatchNorm's running
statistics) and the global random state are restored, and no gradient is made. A model on
``meta`` (nothing to run) is not checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from gpipe.capture.graph import CaptureError

if TYPE_CHECKING:
    from gpipe.capture.segment import CapturedLayers

__all__ = ["tolerance", "verify"]

_SEED = 20181106  # any fixed seed: both runs draw the same numbers from it


def tolerance(ref: torch.Tensor) -> float:
    """The largest difference float rounding explains for an output like ``ref``: a thousand
    units of its dtype's rounding, scaled by its magnitude (graph and model run the same ops;
    a capture bug is off by far more)."""
    eps = torch.finfo(ref.dtype).eps
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    return 1e3 * eps * (1.0 + scale)


def _excess(want: torch.Tensor, got: torch.Tensor) -> float | None:
    """The largest difference of two floating tensors of one shape where float rounding does
    not explain it (:func:`tolerance`; NaN counts as a difference), else ``None``."""
    diff = (want.detach().double() - got.detach().double()).abs()
    d = diff.max().item() if diff.numel() else 0.0
    return None if d <= tolerance(want) else d


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _run_layers(layers: CapturedLayers, flat: tuple) -> Any:
    segments = list(layers)
    x = segments[0](*flat)
    for seg in segments[1:]:
        x = seg(x)
    return x


def _outputs(out: Any) -> list[tuple[str, Any]]:
    leaves, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(path) or "the output", v) for path, v in leaves]


def _compare(model_out: Any, layers_out: Any) -> tuple[float, str] | None:
    """``None`` when the outputs agree, else the largest difference and where."""
    ref, got = _outputs(model_out), _outputs(layers_out)
    if len(ref) != len(got):
        return float("inf"), f"the output's structure ({len(got)} leaves, the model's {len(ref)})"
    worst: tuple[float, str] | None = None
    for (where, a), (_, b) in zip(ref, got, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b:
                continue
            return float("inf"), where
        if a.shape != b.shape:
            return float("inf"), f"{where} (shape {tuple(b.shape)}, the model's {tuple(a.shape)})"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return float("inf"), where
            continue
        d = _excess(a, b)
        if d is not None and (worst is None or d > worst[0]):
            worst = (d, where)
    return worst


def _restore(buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)


def _model_on_sample(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    try:
        return model(*args, **kwargs)
    except Exception as e:
        raise CaptureError(
            f"{type(model).__name__} raises on sample= itself ({type(e).__name__}: "
            f"{str(e).strip()[:300]}); a capture follows one call that runs: give sample= "
            "inputs the model accepts (their shapes, dtypes and device), as in model(*args, "
            "**kwargs)"
        ) from e


def _lost_gradient(model_out: Any, layers_out: Any) -> str | None:
    """The first output the model computes with gradients and the graph without."""
    for (where, a), (_, b) in zip(_outputs(model_out), _outputs(layers_out), strict=False):
        lost = not (isinstance(b, torch.Tensor) and b.requires_grad)
        if isinstance(a, torch.Tensor) and a.requires_grad and lost:
            return where
    return None


def _refuse_lost_gradient(model: nn.Module, where: str) -> None:
    hf = getattr(model, "is_gradient_checkpointing", False) is True
    where = f"output{where}" if where.startswith("[") else where
    how = (
        "model.gradient_checkpointing_disable()"
        if hf
        else "call the checkpointed code directly (drop torch.utils.checkpoint)"
    )
    raise CaptureError(
        f"the captured {type(model).__name__} computes {where} without gradients, but the model "
        "computes it with them: part of the forward ran under torch.no_grad() when it was "
        "traced, so the pipe would train nothing there. torch.utils.checkpoint(..., "
        "use_reentrant=True) does this"
        + (" (transformers' gradient_checkpointing_enable() is on)" if hf else "")
        + f"; gpipe re-materializes stages itself: {how} and build the pipe with "
        "remat='always', or checkpoint with use_reentrant=False"
        + (
            " (model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}))"
            if hf
            else ""
        )
    )


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next((v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)), None)


def _in_unit(node: fx.Node, unit: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == unit or path.startswith(unit + ".") for path, _ in stack.values())


def _differs(want: torch.Tensor | None, got: Any) -> bool:
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return False
    if want.shape != got.shape or not want.is_floating_point():
        return False
    return _excess(want, got) is not None


def _first_diverging(model: nn.Module, layers: CapturedLayers, args: tuple, kwargs: dict) -> str:
    """Where the layers first part from the model, from each layer's unit: its input (a
    difference there lies in the glue before it) and its output, as forward hooks on the
    model's own unit modules see them (the output differs, so where every unit agrees the
    difference lies after the last one)."""
    seen: dict[str, list[tuple[Any, Any]]] = {}
    hooks = []
    named = list(layers.named_children())
    for name, _ in named:
        unit = name.split("@")[0].replace("/", ".")
        try:
            module = model.get_submodule(unit)
        except AttributeError:
            continue

        def record(m: nn.Module, a: Any, out: Any, unit: str = unit) -> None:
            seen.setdefault(unit, []).append((_first_tensor(a), _first_tensor(out)))

        hooks.append(module.register_forward_hook(record))
    try:
        torch.manual_seed(_SEED)
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    torch.manual_seed(_SEED)
    x: Any = layers.bind(args, kwargs)
    calls: dict[str, int] = {}
    previous = ""
    for i, (name, seg) in enumerate(named):
        unit = name.split("@")[0].replace("/", ".")
        x, values, nodes = seg.run_recording(*x) if i == 0 else seg.run_recording(x)
        mine = [n for n in nodes if n.op == "call_function" and _in_unit(n, unit)]
        k = calls.get(unit, 0)
        calls[unit] = k + 1
        if mine and k < len(seen.get(unit, ())):
            want_in, want_out = seen[unit][k]
            got_in = next(
                (values[a.name] for a in mine[0].all_input_nodes if a.op != "get_attr"), None
            )
            if _differs(want_in, got_in):
                return f"the glue after layer {previous!r}" if previous else f"layer {name!r}"
            if _differs(want_out, values[mine[-1].name]):
                return f"layer {name!r}"
        previous = name
    # every unit's input and output agreed, yet the output differs: the glue after the last
    return f"the glue after layer {previous!r}" if previous else ""


def verify(
    model: nn.Module, layers: CapturedLayers, args: tuple, kwargs: dict, grad: bool = False
) -> None:
    """Run ``model(*args, **kwargs)`` and ``layers`` in every captured mode and refuse the
    capture (:class:`~gpipe.capture.graph.CaptureError`) where they differ. With ``grad``
    (the graph holds a region traced with gradients off), both run with gradients on and an
    output the graph computes without gradients, where the model has them, is refused."""
    if _on_meta(model):
        return
    modes_before = [m.training for m in model.modules()]
    layers_before = layers.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    try:
        for modes, _key in layers.variants.items():
            for m, mode in zip(model.modules(), modes, strict=True):
                m.training = mode
            layers.select()
            with torch.set_grad_enabled(grad), torch.random.fork_rng(devices=devices):
                _restore(buffers)
                torch.manual_seed(_SEED)
                want = _model_on_sample(model, args, kwargs)
                _restore(buffers)
                torch.manual_seed(_SEED)
                got = _run_layers(layers, layers.bind(args, kwargs))
            lost = _lost_gradient(want, got) if grad else None
            if lost is not None:
                _refuse_lost_gradient(model, lost)
            bad = _compare(want, got)
            if bad is not None:
                what = "train" if all(modes) else "eval" if not any(modes) else "its own"
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    _restore(buffers)
                    where = _first_diverging(model, layers, args, kwargs)
                at = f"; they first part in {where}" if where else ""
                raise CaptureError(
                    f"the captured {type(model).__name__} differs from the model on the "
                    f"sample in {what} mode: {bad[1]} is off by {bad[0]:.3g}{at} (float rounding "
                    "explains far less); the graph does not compute what the forward does "
                    "(a branch or value the tracer fixed); capture with method='fx', or write "
                    "the model as an nn.Sequential; capture(..., check=False) skips this check"
                )
    finally:
        _restore(buffers)
        for m, mode in zip(model.modules(), modes_before, strict=True):
            m.training = mode
        layers.training = layers_before
        layers.select()
