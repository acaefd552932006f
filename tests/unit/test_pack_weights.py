"""A version packed into one byte buffer (what Ray's object store carries) unpacks to the same tensors, bit
for bit, dtypes and shapes included, from a read-only array as Ray maps it, without copying; a delta between
two packed versions (runtime.publish=delta) restores the new one exactly."""

from __future__ import annotations

import pytest
import torch

from asympo.models.weights import decode_delta, encode_delta, pack_weights, unpack_weights


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


def test_a_delta_restores_the_new_version_bit_for_bit_and_is_small_for_a_small_bf16_update():
    pytest.importorskip("zstandard")
    g = torch.Generator().manual_seed(1)
    old = {"w": torch.randn(256, 64, generator=g).bfloat16(), "b": torch.randn(64, generator=g)}
    # an Adam-sized step (1e-6 per weight): bf16 keeps nearly every value, float32 changes every one
    step = {k: 1e-6 * torch.randn(v.shape, generator=g).sign() for k, v in old.items()}
    new = {k: (v.float() - step[k]).to(v.dtype) for k, v in old.items()}
    new["w"][0, :8] += 1.0  # a few bf16 values do move
    index, old_buffer = pack_weights(old)
    new_index, new_buffer = pack_weights(new)
    assert index == new_index
    delta = encode_delta(new_buffer, old_buffer)
    restored = unpack_weights(index, decode_delta(delta, old_buffer))
    for name, t in new.items():
        assert torch.equal(restored[name].view(torch.uint8), t.view(torch.uint8)), name
    assert not torch.equal(restored["w"], old["w"])
    assert len(delta) < new_buffer.numel() / 10  # bf16 barely changed; the float32 bias is 256 bytes of it
    with pytest.raises(ValueError, match="one layout"):
        encode_delta(new_buffer, old_buffer[:-64])
