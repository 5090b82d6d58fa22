"""Value checks for ``gpipe.core.executor`` by itself: what a :class:`StageError` carries and
says, and what the last stage's outputs hold when the caller does not keep them (shapes on the
meta device only). They kill the executor mutants the pipe tests let live (docs/mutation.md)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gpipe.core.executor import StageError, StepData, _shapes, execute
from gpipe.schedules import Action


def test_stage_error_names_stage_device_action_and_cause() -> None:
    cause = ValueError("boom")
    e = StageError(Action("F", 2, 3), 1, cause)
    assert (e.action, e.stage, e.microbatch, e.device, e.rank) == (Action("F", 2, 3), 2, 3, 1, None)
    assert str(e) == "stage 2 (device 1) failed in forward of micro-batch 3: ValueError: boom"
    e = StageError(Action("W", 0, 5), 0, KeyError("k"), rank=4)
    assert e.rank == 4
    assert (
        str(e)
        == "rank 4, stage 0 (device 0) failed in weight-gradient of micro-batch 5: KeyError: 'k'"
    )


def test_shapes_keeps_shape_and_dtype_on_meta() -> None:
    out = _shapes({"t": torch.ones(2, 3, dtype=torch.float64), "n": 5, "l": [torch.zeros(4)]})
    t = out["t"]
    assert (t.device.type, t.shape, t.dtype) == ("meta", (2, 3), torch.float64)
    assert out["n"] == 5
    assert out["l"][0].device.type == "meta" and out["l"][0].shape == (4,)


class _Stage:
    """One stage that doubles its input; holds nothing between actions."""

    pending: dict = {}  # noqa: RUF012

    def forward(self, m, x, target, split=False):
        return SimpleNamespace(value={"y": x * 2, "tag": "t"}, loss=None, fetched={})


def test_outputs_not_kept_are_shapes_only() -> None:
    x = torch.ones(3)
    for keep in (True, False):
        data = StepData(num_stages=1, inputs=[x], keep_outputs=keep)
        execute(0, [Action("F", 0, 0)], {0: _Stage()}, transport=None, data=data)
        y = data.outputs[0]["y"]
        assert data.outputs[0]["tag"] == "t"
        if keep:
            assert torch.equal(y, 2 * x) and not y.requires_grad
        else:
            assert y.device.type == "meta" and y.shape == (3,)
        assert [(e.action, e.device) for e in data.events] == [(Action("F", 0, 0), 0)]
        e = data.events[0]
        assert 0.0 <= e.start <= e.end < 60.0  # seconds since the step began
