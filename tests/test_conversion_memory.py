"""Conversion releases each dense conv as soon as its replacement is in place."""

from __future__ import annotations

import weakref

from torch import nn

from convert import graph_pass, run_conversion


def test_dense_convs_freed_during_conversion(monkeypatch):
    model = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)])
    build = graph_pass.build_replacement
    replaced: list[weakref.ref] = []
    alive_at_each_call: list[int] = []

    def tracking_build(conv, plan, init, effective=None):
        alive_at_each_call.append(sum(reference() is not None for reference in replaced))
        replaced.append(weakref.ref(conv))
        return build(conv, plan, init, effective)

    monkeypatch.setattr(graph_pass, "build_replacement", tracking_build)
    result = run_conversion(model, inplace=True)

    assert len(result.converted) == 6
    # Plain reference counting frees each dense conv once it is swapped out,
    # before the next layer is factored.
    assert alive_at_each_call == [0] * 6
    assert all(reference() is None for reference in replaced)
