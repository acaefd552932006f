"""A version packed into one byte buffer (what Ray's object store carries) unpacks to the same tensors, bit
for bit, dtypes and shapes included, from a read-only array as Ray maps it, without copying."""

from __future__ import annotations

import torch

from asympo.models.weights import pack_weights, unpack_weights


def test_a_packed_version_unpacks_bit_for_bit_as_views_of_a_read_only_buffer():
    g = torch.Generator().manual_seed(0)
    weights = {
        "embed": torch.randn(7, 5, generator=g).bfloat16(),
        "norm": torch.randn(5, generator=g),
        "steps": torch.arange(3),
        "odd": torch.randn(3, 3, generator=g).t(),  # not contiguous
        "half": torch.randn(2, 3, generator=g).half(),
    }
    index, buffer = pack_weights(weights)
    assert buffer.dtype == torch.uint8 and buffer.numel() >= sum(t.nbytes for t in weights.values())
    array = buffer.numpy().copy()
    array.setflags(write=False)  # as Ray hands out an object from its store
    out = unpack_weights(index, array)
    assert list(out) == list(weights)
    for name, t in weights.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name].view(torch.uint8), t.contiguous().view(torch.uint8)), name
    assert out["embed"].untyped_storage().data_ptr() == out["norm"].untyped_storage().data_ptr()  # no copies
