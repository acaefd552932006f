"""The data-parallel learner's dealing of a batch to ranks (asympo.distributed): groups stay whole and the
parts balanced; a rendezvous port in use is a one-line error. The 2-rank runs (torchrun; Ray actors):
tests/integration/test_distributed.py; on several Ray nodes: tests/integration/test_ray_nodes.py."""

from __future__ import annotations

import torch

from asympo.batch import synthetic_batch
from asympo.distributed.learner import deal_groups


def test_groups_are_dealt_whole_and_balanced():
    batch = synthetic_batch(100, rows=28, length=8)  # groups of 4: 7 groups
    batch.group_ids[-8:] = torch.tensor([5] * 2 + [6] * 6)  # uneven sizes: 2 and 6
    parts = deal_groups(batch, 2)
    ids = [set(p.group_ids.tolist()) for p in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(7))
    for part in parts:
        for g in part.group_ids.unique():
            assert int((part.group_ids == g).sum()) == int((batch.group_ids == g).sum())  # never split
    assert abs(len(parts[0]) - len(parts[1])) <= 6
    assert deal_groups(synthetic_batch(100, rows=4, length=8), 3)[1:] == [None, None]


def test_a_rendezvous_port_in_use_is_a_one_line_error():
    import socket

    import pytest

    from asympo.distributed.ray_ranks import free_port
    from asympo.errors import UserError

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=rf"^learner.rendezvous_port={port} cannot be used here: "):
            free_port(port)
    assert free_port(port) == port  # free again
    assert free_port() > 0
