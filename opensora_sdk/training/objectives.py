"""What the trainer does differently per model family (spec 7, 9.1, 9.2), as data.

    family  model   loss                                      model inputs besides x, t, y, mask    frame masks
    v1.2    STDiT3  rectified flow (5.2): logit-normal t,     fps = video fps // frame_interval,    yes (7.4)
                    resolution warp, MSE on the velocity      height, width, num_frames
    v1.1    STDiT2  IDDPM (5.3): t ~ U{0..999}, MSE on eps    num_frames (pixel), height, width,    yes ("v1.1")
                    + variational bound on the learned sigma  ar = W / H (sic), fps = video fps
    v1.0    STDiT   IDDPM as v1.1, float64 tables             none (one fixed size)                 no

v1.1 training fed `ar = W / H` (its dataset) where its inference feeds H / W, and the video's
own fps where v1.2 divides it by the frame interval (spec 9.1); both are reproduced by default
(`data.ar_condition`, `data.fps_condition` change them). v1.0 cleaned captions inside its T5
embedder for training as for inference (spec 9.2): `clean_captions`.

The family comes from the training config's model section: `model.type`, else the preset's
table (STDIT3_PRESETS, STDIT2_PRESETS, STDIT_PRESETS), else the checkpoint
(`opensora_sdk.models.auto.transformer_kind`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from opensora_sdk.configs import STDIT2_PRESETS, STDIT3_PRESETS, STDIT_PRESETS, VAE_PRESETS, AutoencoderKLConfig, preset
from opensora_sdk.schedulers.iddpm import IDDPM
from opensora_sdk.schedulers.rflow import RectifiedFlow

# Random-weight VAEs by name: the v1.2 video VAE presets and the per-frame SD VAE of v1.1 / v1.0.
SD_VAE_PRESETS = {
    "SD-VAE": AutoencoderKLConfig(),
    "SD-VAE-tiny": AutoencoderKLConfig(block_out_channels=(4, 8, 16, 16), norm_num_groups=2, sample_size=64),
}


@dataclass(frozen=True)
class TrainingFamily:
    """The training-side facts of one model family (see the module docstring)."""

    name: str  # "v1.2", "v1.1", "v1.0"
    model_type: str  # the transformer class
    presets: dict
    loss: str  # "rflow" or "iddpm"
    iddpm_table_dtype: torch.dtype | None = None
    fps_condition: str = "divided"  # the fps fed to the model: "divided" (video fps // frame_interval) or "native"
    frame_masks: bool = True
    clean_captions: bool = False
    bf16_quantization: bool = True  # the model takes official_bf16_quantization


FAMILIES = {
    "STDiT3": TrainingFamily("v1.2", "STDiT3", STDIT3_PRESETS, "rflow"),
    "STDiT2": TrainingFamily("v1.1", "STDiT2", STDIT2_PRESETS, "iddpm", torch.float32, fps_condition="native"),
    "STDiT": TrainingFamily("v1.0", "STDiT", STDIT_PRESETS, "iddpm", torch.float64, frame_masks=False,
                            clean_captions=True, bf16_quantization=False),  # fmt: skip
}


def model_family(section) -> TrainingFamily:
    """The family of a training config's `model` section (type, preset name or checkpoint)."""
    if section.from_pretrained:
        from opensora_sdk.models.auto import transformer_kind

        found, source = transformer_kind(section.from_pretrained), f"model.from_pretrained={section.from_pretrained!r}"
    else:
        tables = [kind for kind, family in FAMILIES.items() if section.preset in family.presets]
        if not tables:
            names = {kind: sorted(family.presets) for kind, family in FAMILIES.items()}
            raise ValueError(f"model.preset={section.preset!r} is not a preset; choose one of {names}")
        found, source = tables[0], f"model.preset={section.preset!r}"
    if section.type is not None and section.type != found:
        raise ValueError(f"model.type={section.type!r} but {source} is an {found}; set model.type to {found!r} or null")
    return FAMILIES[found]


def build_model(section) -> torch.nn.Module:
    """The transformer of `section`: a preset with fresh weights or a checkpoint, with the
    config overrides, the attention backend and gradient checkpointing applied; train mode."""
    from opensora_sdk.models.auto import transformer_config
    from opensora_sdk.models.stdit import STDiT
    from opensora_sdk.models.stdit2 import STDiT2
    from opensora_sdk.models.stdit3 import STDiT3

    family = model_family(section)
    cls = {"STDiT3": STDiT3, "STDiT2": STDiT2, "STDiT": STDiT}[family.model_type]
    config = None  # a checkpoint without overrides: its class reads its config (config.json or all its shapes)
    if section.config_overrides or not section.from_pretrained:
        base = transformer_config(section.from_pretrained) if section.from_pretrained else preset(section.preset, family.presets)
        try:
            config = dataclasses.replace(base, **section.config_overrides)
        except TypeError:
            allowed = [f.name for f in dataclasses.fields(base)]
            raise ValueError(f"model.config_overrides={section.config_overrides!r}: unknown {type(base).__name__} field; "
                             f"allowed: {allowed}") from None  # fmt: skip
    kwargs = {}
    if family.bf16_quantization:
        kwargs["official_bf16_quantization"] = section.official_bf16_quantization
    elif section.official_bf16_quantization:
        raise ValueError(f"model.official_bf16_quantization is not available for {family.model_type} (v1.0); set it to false")
    if section.from_pretrained:
        model = cls.from_pretrained(section.from_pretrained, config=config, **kwargs)
    else:
        model = cls(config, **kwargs)
    if getattr(model.config, "freeze", None) is not None:  # STDiT2 / STDiT keep the official field as data
        warnings.warn(f"{family.model_type} config freeze={model.config.freeze!r} is not applied by this trainer: every weight trains",
                      stacklevel=2)  # fmt: skip
    model.set_attention_backend(section.attention_backend)
    model.enable_gradient_checkpointing(section.gradient_checkpointing)
    return model.train()


def vae_preset(name: str):
    """The config of a random-weight VAE: a VAE_PRESETS name (v1.2) or SD-VAE / SD-VAE-tiny."""
    table = {**VAE_PRESETS, **SD_VAE_PRESETS}
    return preset(name, table)


# --------------------------------------------------------------------------------------------
# Objectives: the per-sample loss [B] of one batch
# --------------------------------------------------------------------------------------------


class RectifiedFlowObjective:
    """v1.2 (spec 5.2): `RectifiedFlow(**fields).training_loss`."""

    def __init__(self, fields: dict):
        self.scheduler = RectifiedFlow(**fields)

    def __call__(self, model, x0, model_kwargs, mask=None, *, generator=None) -> torch.Tensor:
        return self.scheduler.training_loss(model, x0, model_kwargs, mask=mask, generator=generator)


class IDDPMObjective:
    """v1.1 / v1.0 (spec 5.3): t ~ randint(0, diffusion_steps) then the noise from `generator`;
    loss = MSE(eps_hat, eps) + the variational bound on the learned sigma (eps detached in it).
    `fields` may set `diffusion_steps` (1000); the rest is the official training setting."""

    ALLOWED = ("diffusion_steps",)

    def __init__(self, fields: dict, table_dtype: torch.dtype):
        unknown = sorted(set(fields) - set(self.ALLOWED))
        if unknown:
            raise ValueError(f"scheduler: {unknown} are not IDDPM training settings; allowed: {list(self.ALLOWED)}")
        self.scheduler = IDDPM(num_sampling_steps=None, table_dtype=table_dtype, **fields)

    def __call__(self, model, x0, model_kwargs, mask=None, *, generator=None) -> torch.Tensor:
        t = self.scheduler.sample_training_timesteps(x0.shape[0], generator=generator, device=x0.device)
        return self.scheduler.training_losses(model, x0, t, model_kwargs=model_kwargs, mask=mask, generator=generator)["loss"]


def make_objective(family: TrainingFamily, fields: dict):
    if family.loss == "rflow":
        return RectifiedFlowObjective(fields)
    return IDDPMObjective(fields, family.iddpm_table_dtype)


def model_inputs(family: TrainingFamily, batch: dict, device, ar_condition: str | None = None) -> dict:
    """The micro-conditions the family's model takes, from a collated batch (each [B] float)."""
    if family.model_type == "STDiT":
        return {}
    inputs = {key: batch[key].to(device) for key in ("fps", "height", "width", "num_frames")}
    if family.model_type == "STDiT2":
        H, W = inputs["height"].float(), inputs["width"].float()
        inputs["ar"] = H / W if ar_condition == "H/W" else W / H  # official v1.1 training: W / H (spec 9.1)
    return inputs


__all__ = ["FAMILIES", "SD_VAE_PRESETS", "TrainingFamily", "build_model", "make_objective", "model_family", "model_inputs", "vae_preset"]
