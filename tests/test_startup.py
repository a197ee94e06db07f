"""Cheap start-up: models built on the meta device equal models built eagerly, and the
command line and the package import only what a run needs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from opensora_sdk.loading import meta_device, read_state_dict
from opensora_sdk.presets import BUILTIN_DIR

TRANSFORMER, VAE, TEXT = (str(BUILTIN_DIR / name) for name in ("transformer", "vae", "text_encoder"))
HEAVY = ("transformers", "torch._dynamo", "sympy", "gradio", "av", "peft", "PIL")


def modules_after(code: str) -> list[str]:
    """Which of HEAVY (and torch) a fresh interpreter has imported after running `code`."""
    probe = code + f"\nimport sys, json\nprint(json.dumps([m for m in ('torch',) + {HEAVY!r} if m in sys.modules]))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- meta_device: shape-only arithmetic --------------------------------------------------------


def test_meta_device_gives_the_shapes_and_dtypes_of_eager_arithmetic():
    def build():
        scaled = torch.randn(6, 8) / 8**0.5
        freqs = 1.0 / (10000.0 ** (torch.arange(0, 16, 2)[:8].float() / 16))
        halves = torch.arange(5) / 2  # integer / integer: floating point
        outer = torch.ones(3, 1) * torch.ones(1, 4) + 1
        table = torch.nn.init.normal_(torch.empty(4, 3), std=0.02)
        return scaled, freqs, halves, outer, table, torch.nn.Embedding(7, 5).weight

    eager = build()
    with meta_device():
        meta = build()
    assert all(m.is_meta for m in meta)
    assert [(tuple(m.shape), m.dtype) for m in meta] == [(tuple(e.shape), e.dtype) for e in eager]


def test_meta_device_reports_shapes_that_do_not_broadcast():
    with meta_device(), pytest.raises(RuntimeError, match="do not broadcast"):
        torch.empty(3, 2) * torch.empty(4, 2)


# ---- built on meta == built eagerly -------------------------------------------------------------


def eager_transformer():
    from opensora_sdk.models.auto import transformer_config
    from opensora_sdk.models.stdit3 import STDiT3

    model = STDiT3(transformer_config(TRANSFORMER))  # random init first, then the weights
    model.load_state_dict(read_state_dict(TRANSFORMER), strict=True)
    return model.eval()


def eager_vae():
    from opensora_sdk.models.auto import vae_config
    from opensora_sdk.models.vae import VideoAutoencoder

    model = VideoAutoencoder(vae_config(VAE))
    model.load_state_dict(read_state_dict(VAE), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference_t5():
    """transformers' own T5EncoderModel and tokenizer on the built-in folder."""
    from transformers import AutoTokenizer, T5EncoderModel

    return T5EncoderModel.from_pretrained(TEXT).eval(), AutoTokenizer.from_pretrained(TEXT)


def eager_text_encoder(reference_t5, model_max_length: int = 300):
    from opensora_sdk.models.text_encoder import T5TextEncoder

    return T5TextEncoder(*reference_t5, model_max_length=model_max_length)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_meta_built_models_equal_eagerly_built_ones():
    from opensora_sdk.models.auto import load_transformer, load_vae

    assert same_state(load_transformer(TRANSFORMER), eager_transformer())
    assert same_state(load_vae(VAE), eager_vae())


def test_t5_built_on_meta_equals_transformers_from_pretrained(reference_t5, monkeypatch):
    """transformers' T5EncoderModel, built on meta and assigned: the tensors, dtypes (float16
    keeps `wo` in float32), tokenizer and identity of transformers' own `from_pretrained`."""
    from transformers.models.t5.modeling_t5 import T5EncoderModel, T5PreTrainedModel

    from opensora_sdk.models.text_encoder import T5TextEncoder

    inits = []
    monkeypatch.setattr(T5PreTrainedModel, "_init_weights", lambda self, module: inits.append(module))
    ours, reference = T5TextEncoder.from_pretrained(TEXT), eager_text_encoder(reference_t5)
    assert type(ours.model) is T5EncoderModel and type(ours.tokenizer) is type(reference.tokenizer)
    assert inits == []  # nothing initialised: every tensor came from the file
    assert same_state(ours.model, reference.model)
    assert ours.model.encoder.embed_tokens.weight is ours.model.shared.weight
    assert ours.identity == reference.identity  # embedding caches stay valid
    half = T5TextEncoder.from_pretrained(TEXT, dtype="fp16").model
    monkeypatch.undo()
    import transformers

    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    theirs = T5EncoderModel.from_pretrained(TEXT, **{name: torch.float16})
    assert {k: v.dtype for k, v in half.state_dict().items()} == {k: v.dtype for k, v in theirs.state_dict().items()}
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_a_full_t5_in_shards_loads_its_encoder_strictly(tmp_path):
    """As a T5 v1.1 XXL folder: the weights of a whole T5 (decoder and LM head too) in .bin
    shards with an index; the encoder is assigned from them and the rest is skipped."""
    from opensora_sdk.loading import CheckpointError
    from opensora_sdk.models.text_encoder import T5TextEncoder

    ours = T5TextEncoder.from_pretrained(TEXT, model_max_length=24)
    folder = tmp_path / "t5"
    ours.model.save_pretrained(folder)
    ours.tokenizer.save_pretrained(folder)
    saved = T5TextEncoder.from_pretrained(folder, model_max_length=24)  # as transformers saves it
    assert same_state(saved.model, ours.model) and saved.identity == ours.identity
    (folder / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in ours.model.state_dict().items()}
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.ones(3, 3)
    state["lm_head.weight"] = torch.ones(4, 3)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    again = T5TextEncoder.from_pretrained(folder, model_max_length=24)
    assert torch.equal(again.encode("a blue ball").y, ours.encode("a blue ball").y)
    lost = "encoder.final_layer_norm.weight"  # a shard set without one encoder tensor
    for name, part in shards.items():
        torch.save({k: state[k] for k in part if k != lost}, folder / name)
    with pytest.raises(CheckpointError, match=r"(?s)missing.*encoder\.final_layer_norm\.weight") as err:
        T5TextEncoder.from_pretrained(folder, model_max_length=24)
    assert str(folder) in str(err.value)


def test_a_generation_from_meta_built_models_equals_one_from_eager_models(reference_t5):
    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.presets import get_preset

    fast = OpenSoraPipeline.from_preset(device="cpu", progress=False)
    p = get_preset("builtin")
    transformer = eager_transformer()
    text = eager_text_encoder(reference_t5, transformer.config.model_max_length)
    eager = OpenSoraPipeline(transformer, eager_vae(), text, family=p.family,
                             defaults=p.defaults, device="cpu", progress=False, max_latent_frames=p.max_latent_frames)
    kwargs = dict(seed=11, num_steps=2)
    a = fast("a yellow square moving right on a gray background", **kwargs)
    b = eager("a yellow square moving right on a gray background", **kwargs)
    assert a.frames.shape == (17, 64, 64, 3) and a.frames.std() > 0
    assert np.array_equal(a.frames, b.frames)


# ---- what gets imported ----------------------------------------------------------------------


def test_import_opensora_sdk_imports_no_heavy_module():
    assert modules_after("import opensora_sdk; opensora_sdk.STDiT3Config") == []


def test_cli_help_and_bad_input_do_not_import_torch():
    assert modules_after("from opensora_sdk.cli import main\nmain(['--help'])") == []
    assert modules_after("from opensora_sdk.cli import main\nmain(['generate', '--seed', 'x'])") == []


def test_loading_the_builtin_pipeline_imports_no_front_end_or_training_module():
    loaded = modules_after("from opensora_sdk import OpenSoraPipeline\nOpenSoraPipeline.from_preset(device='cpu')")
    assert "torch" in loaded and "transformers" not in loaded  # T5 loads when a prompt needs it
    assert not {"gradio", "peft", "av"} & set(loaded), loaded
    loaded = modules_after("from opensora_sdk import OpenSoraPipeline\n"
                           "OpenSoraPipeline.from_preset(device='cpu')('a red circle', num_steps=1, progress=False)")
    assert "transformers" in loaded  # transformers' T5 (which imports torch._dynamo itself)
    assert not {"gradio", "peft"} & set(loaded), loaded
