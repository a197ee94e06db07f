"""The pipeline's memory switches, under diffusers' names: each maps onto the pipeline's one
`Placement` (`opensora_sdk.placement`: where models compute and wait), VAE tiling / slicing
(`opensora_sdk.models.vae_tiling`) or fp8 weights (`opensora_sdk.fp8`).

`OpenSoraPipeline` inherits them; they only set policy (nothing moves until a model is used).
"""

from __future__ import annotations

from opensora_sdk.placement import Placement

_UNSET = object()


class MemoryMixin:
    """Offload, block swap, VAE tiling and slicing, fp8. Expects `self.placement`,
    `self.transformer`, `self.vae`, `self.text_encoder` and `self.vae_tiling`."""

    def enable_model_cpu_offload(self, device=None) -> None:
        """Each model moves to `device` (default: the pipeline's) for its stage and back to the
        host after it: one large model on the device at a time (offload="model")."""
        self._set_placement(device, "model")

    def enable_sequential_cpu_offload(self, device=None) -> None:
        """The least device memory: as `enable_model_cpu_offload`, and STDiT3's and T5's blocks
        come to the device one at a time, just before each runs (offload="sequential"); slow."""
        self._set_placement(device, "sequential", block_swap=None)

    def enable_block_swap(self, blocks_on_device: int) -> None:
        """Keep STDiT3's first `blocks_on_device` blocks (of its 2 x depth, spatial and temporal,
        in execution order) and its small layers on the device; stream the others from pinned
        host memory, each copied while the previous block computes (`opensora_sdk.offload`);
        T5 then streams all its blocks the same way. Same output as without it."""
        from opensora_sdk.offload import check_block_swap, transformer_blocks

        check_block_swap(blocks_on_device, len(transformer_blocks(self.transformer)))
        offload = None if self.placement.offload == "sequential" else self.placement.offload
        self._set_placement(None, offload, block_swap=blocks_on_device)

    def disable_block_swap(self) -> None:
        self._set_placement(None, self.placement.offload, block_swap=None)

    def _set_placement(self, device, offload, block_swap=_UNSET) -> None:
        device = self.placement.device if device is None else device
        block_swap = getattr(self.placement, "block_swap", None) if block_swap is _UNSET else block_swap
        self.placement = Placement(device, offload, block_swap)

    def enable_vae_tiling(self, tile_size: int = 256, overlap: int = 64) -> None:
        """Decode (and encode) each frame in spatial tiles of `tile_size` pixels overlapping by
        `overlap` (less memory, slight seams): `vae_tiling=SpatialTiling(tile_size, overlap)`."""
        from opensora_sdk.models.vae_tiling import SpatialTiling

        self.vae_tiling = SpatialTiling(tile_size, overlap)

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    def enable_vae_slicing(self) -> None:
        """Run the VAE's 2D part one frame at a time (`micro_batch_size` 1 instead of the
        config's, 4 for v1.2): the same frames, a quarter of the decoder's working set."""
        config = getattr(self.vae, "config", None)
        if not hasattr(config, "micro_batch_size"):
            raise ValueError(f"{type(self.vae).__name__} has no micro_batch_size to slice by")
        if not hasattr(self, "_vae_micro_batch"):
            self._vae_micro_batch = config.micro_batch_size
        config.micro_batch_size = 1

    def disable_vae_slicing(self) -> None:
        if hasattr(self, "_vae_micro_batch"):
            self.vae.config.micro_batch_size = self._vae_micro_batch
            del self._vae_micro_batch

    def enable_fp8(self, per_channel: bool | str = True, text_encoder: bool = True) -> list[str]:
        """Store the transformer's (and T5's) Linear weights as float8 e4m3 with per-channel
        (or per_channel="per_tensor") scales, computed in the model dtype (`opensora_sdk.fp8`;
        embedders, norms and the final layer stay). Returns the transformer layers converted."""
        from opensora_sdk import fp8

        per_channel = fp8._scale_choice(per_channel) if isinstance(per_channel, str) else bool(per_channel)
        done = fp8.quantize_transformer_fp8(self.transformer, per_channel=per_channel)
        if text_encoder:
            self.text_encoder.enable_fp8(per_channel)  # a T5 not loaded yet: when it loads
        return done
