"""`train.check_routing`: a debug run's check that every token reaches its own tower (issue 19's "does every token
reach its own tower on the GPU path").

    check_routing(model, batch)    # raises RoutingCheckError naming the micro-batch and what is wrong

The trainer counts each micro-batch's tokens per tower on the host, and the per-tower GEMMs slice the sorted rows
by those counts; under train.cuda_graph the route is computed on the device alone. Nothing in a normal step reads
the device to compare the two (it would be a sync). This builds the route the model builds for the batch and
checks, reading the device once per micro-batch:

- the modality ids are those of the token ids (`vocab.modality_of`): what the loader wrote is what the ids say;
- the device's count of each tower's tokens equals the host count (where the step has host counts);
- in the route's sorted order, each tower's slice holds only that tower's tokens, and un-sorting puts every token
  back in its place.
"""

from __future__ import annotations

import torch

from mot.data.loader import PackedBatch


class RoutingCheckError(RuntimeError):
    """A token would reach another tower than its own."""


def check_routing(model, batch: PackedBatch, step: int, micro: int) -> None:
    """Raise RoutingCheckError if the route of `batch` (on the model's device) sends a token to another tower
    than its modality's. `model`: the MoTTransformer (unwrapped)."""
    where = f"step {step}, micro-batch {micro}"
    n = model.cfg.n_modalities
    expected = model.vocab.modality_of(batch.tokens)
    wrong = (expected != batch.modality).sum().item()
    if wrong:
        raise RoutingCheckError(f"{where}: {wrong} token(s) carry a modality id other than their token id's")
    counts = torch.bincount(batch.modality.reshape(-1), minlength=n)
    device_counts = counts.tolist()
    if batch.tower_counts is not None and list(batch.tower_counts) != device_counts:
        raise RoutingCheckError(f"{where}: host tower counts {list(batch.tower_counts)} but the device holds "
                                f"{device_counts}")
    if model.cfg.is_dense:
        return  # one tower: nothing is sorted
    route = model.route(batch.modality, batch.tower_counts)
    flat = batch.modality.reshape(-1)
    if route.tower is not None:  # the host counts put every token in one tower: the identity route
        if not bool((flat == route.tower).all()):
            raise RoutingCheckError(f"{where}: routed as all tower {route.tower}, but holds {device_counts}")
        return
    slices = torch.repeat_interleave(torch.arange(n, device=flat.device), counts)
    if not torch.equal(route.sorted_modality, slices) or not torch.equal(flat.index_select(0, route.order), slices):
        raise RoutingCheckError(f"{where}: a tower's slice of the sorted rows holds another tower's tokens "
                                f"(counts {device_counts})")
    if not torch.equal(route.order.index_select(0, route.inverse), torch.arange(flat.numel(), device=flat.device)):
        raise RoutingCheckError(f"{where}: un-sorting does not put every token back in its place")
