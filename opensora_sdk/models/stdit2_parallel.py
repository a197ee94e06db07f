"""STDiT2 (v1.1) and STDiT (v1.0) with their tokens sharded over a process group (spec section 8).

Both models have one block stack whose blocks do spatial attention, temporal attention,
cross-attention and the MLP in turn. They are sharded as STDiT3 is in its "ulysses" and
"allgather_kv" modes (`stdit3_parallel`, whose spatial attention this module reuses):

    tokens [B, T*S, C] after patch + position embedding
      -> pad S to S_pad = P*ceil(S/P), keep this rank's S_l = S_pad/P positions   [B, T*S_l, C]
      -> every block: spatial attention over all S (all-to-all of heads, or all-gathered K/V,
         padded keys masked); temporal attention, cross-attention (token-wise, any batch) and
         the MLP on the shard, no communication
      -> final layer on the shard -> gather the (small) output                    [B, T*S, K]

`model.set_sequence_parallel_group(group, mode)` attaches a `StackSequenceParallel`; every rank
of the group must then call the model with the same inputs, and each returns the full output.
Gradients: shard "down", gather "up" (spec 8), so the ranks' parameter gradients average to the
single-process gradient (DDP's all-reduce does it; else `distributed.average_gradients`).

Difference from the official v1.0 code (spec 8): it split the flattened sequence along T and
communicated in temporal attention too; splitting S gives the same result with one exchange per
block, and works for the v1.1 model the same way.
"""

from __future__ import annotations

import torch

from opensora_sdk.distributed import gather_forward_split_backward, split_forward_gather_backward
from opensora_sdk.models.stdit3_parallel import SequenceParallel, _key_mask, _pad_to, _Shard

MODES = ("auto", "ulysses", "allgather_kv")


class StackSequenceParallel(SequenceParallel):
    """How STDiT2 / STDiT shard their tokens over `group` ("auto": "ulysses" when P divides the
    head count, else "allgather_kv"; see `stdit3_parallel` for the two)."""

    def __init__(self, group, num_heads: int, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(
                f"sequence-parallel mode={mode!r} is not available for STDiT2 / STDiT; choose one of {list(MODES)} "
                "('dsp' needs separate spatial and temporal blocks, as STDiT3 has)"
            )
        super().__init__(group, num_heads, mode)

    def shard(self, x: torch.Tensor, T: int, S: int) -> tuple[torch.Tensor, int, _Shard]:
        """Tokens [B, T*S, C] -> (this rank's tokens [B, T*S_l, C], S_l, the per-forward shard)."""
        B, N, C = x.shape
        S_pad = -(-S // self.size) * self.size
        x = _pad_to(x.view(B, T, S, C), 2, S_pad)  # [B, T, S_pad, C]
        x = split_forward_gather_backward(x, 2, self.group, "down")  # [B, T, S_l, C]
        return x.flatten(1, 2), S_pad // self.size, _Shard(self, spatial_keys=_key_mask(S, S_pad, x.device))

    def gather(self, x: torch.Tensor, T: int, S: int) -> torch.Tensor:
        """This rank's final-layer output [B, T*S_l, K] -> every rank's [B, T*S, K]."""
        S_l = x.shape[1] // T
        x = gather_forward_split_backward(x.unflatten(1, (T, S_l)), 2, self.group, "up")  # [B, T, S_pad, K]
        return x[:, :, :S].flatten(1, 2)


def make_sequence_parallel(group, num_heads: int, mode: str = "auto") -> StackSequenceParallel | None:
    """The `sequence_parallel` attribute of an STDiT2 / STDiT for `group` (None or one rank: off)."""
    from opensora_sdk.distributed import group_size

    if group is None or group_size(group) == 1:
        if mode not in MODES:
            raise ValueError(f"sequence-parallel mode={mode!r} is not available for STDiT2 / STDiT; choose one of {list(MODES)}")
        return None
    return StackSequenceParallel(group, num_heads, mode)


__all__ = ["MODES", "StackSequenceParallel", "make_sequence_parallel"]
