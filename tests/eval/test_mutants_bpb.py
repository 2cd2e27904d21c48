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
