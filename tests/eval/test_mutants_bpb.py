"""scored_bytes pinned to its definition: the byte counts come back in token_bytes' own dtype, with 0
(in that dtype) at ignored targets."""
import torch

from nanopipe.eval.bpb import scored_bytes


def test_scored_bytes_keeps_token_bytes_dtype():
    y = torch.tensor([0, -1, 2, 4, -100], dtype=torch.int64)
    for dtype in (torch.int32, torch.int16, torch.float32):
        tb = torch.tensor([1, 2, 3, 1, 0], dtype=dtype)
        valid, nbytes = scored_bytes(y, tb)
        assert valid.tolist() == [True, False, True, True, False]
        assert nbytes.dtype == dtype
        assert nbytes.tolist() == [1, 0, 3, 0, 0]


def test_scored_bytes_moves_token_bytes_to_the_targets_device():
    # token_bytes is built on the CPU while the targets live on the model's device (a GPU in training).
    # The meta device stands in for that GPU here: like a CUDA tensor it cannot be indexed across
    # devices ("Tensor on device cpu is not on the expected device meta"), so a lookup that skips the
    # move fails, and the results land on the targets' device only when token_bytes was moved there.
    y = torch.tensor([0, -1, 2, 4], dtype=torch.int64, device="meta")
    tb = torch.tensor([1, 2, 3, 1, 0], dtype=torch.int32)
    valid, nbytes = scored_bytes(y, tb)
    assert valid.device.type == "meta" and nbytes.device.type == "meta"
    assert nbytes.shape == (4,) and nbytes.dtype == torch.int32
    assert tb.device.type == "cpu"  # the caller's table is not moved in place
