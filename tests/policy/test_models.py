"""The weight-sync wire format and its checksum."""

import torch

from policy.models import pack_state, state_checksum, unpack_state


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, generator=g), "half": torch.randn(4, generator=g).to(torch.bfloat16),
            "ids": torch.arange(7), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
            "strided": torch.randn(4, 6, generator=g).t()}


def test_pack_round_trip_is_bit_exact():
    state = _state()
    got = unpack_state(pack_state(state))
    assert list(got) == list(state)
    for k, t in state.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert state_checksum(got) == state_checksum(state)


def test_checksum_sees_one_flipped_bit_a_dtype_and_a_name():
    state, want = _state(), state_checksum(_state())
    flipped = dict(state, w=state["w"].clone())
    flipped["w"].view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of one element
    assert state_checksum(flipped) != want
    assert state_checksum(dict(state, ids=state["ids"].to(torch.int32))) != want
    renamed = {("v" if k == "w" else k): t for k, t in state.items()}
    assert state_checksum(renamed) != want
