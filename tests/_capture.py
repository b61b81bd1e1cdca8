"""Capture the Dynamo graph of a model, as the ``blast`` backend receives it.

Tests run the passes on that graph directly (no Inductor compile: fast), then
run the rewritten GraphModule eagerly against the model.
"""
from __future__ import annotations

import torch


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    # Copy while the backend runs, as blast.backend does: Dynamo strips
    # node.meta["grapharg"] (the placeholders' sources) from its own graph afterwards.
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def capture(model, *inputs, dynamic=False):
    """``(gm, example_inputs)`` of the single Dynamo graph of ``model(*inputs)``."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append((_copy(gm), list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=recording_backend, dynamic=dynamic, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]
