"""EE transforms and stage layouts of the vision classifiers, ResNet and ViT (DESIGN.md §5).

Tiny random models of each family are converted in memory (the converter's two passes) and loaded strictly into
a fresh model of the same architecture; then

    logits_EE(pixel_values)[..., pi] == logits_original(pixel_values)      (relative error <= 1e-4)

BatchNorm statistics, norm weights and biases get non-trivial random values so that folding them is really tested.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig
from transformers.models.resnet.modeling_resnet import ResNetConvLayer, ResNetShortCut

from hss_ee_hf.artifacts.layouts import resnet_layers, stage_layout
from hss_ee_hf.artifacts.stages import stage_matrix
from hss_ee_hf.ee.resnet import ResNetSpec
from hss_ee_hf.ee.vision import BATCH_NORM_EPS
from hss_ee_hf.ee.vit import ViTSpec
from hss_ee_hf.errors import ConversionError, UnsupportedArchitectureError
from hss_ee_hf.ring.csprng import ChaChaStream

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LOGITS_RTOL = 1e-4
NUM_LABELS = 10
# Larger than HF's 0.02 so ViT attention is far from uniform: a wrong q/k/v transform then moves the logits.
VIT_INIT_STD = 0.15

CONFIGS = {
    "resnet-bottleneck": lambda: ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], layer_type="bottleneck", num_labels=NUM_LABELS
    ),
    # stage 0 keeps its channels, so its layers have identity shortcuts; stage 1's first layer projects
    "resnet-basic": lambda: ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", num_labels=NUM_LABELS
    ),
    # same channels in and out of stage 0 but a stride of 2: the shortcut comes from the stride alone
    "resnet-downsample": lambda: ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[2, 1],
        layer_type="bottleneck",
        downsample_in_first_stage=True,
        downsample_in_bottleneck=True,
        num_labels=NUM_LABELS,
    ),
    "vit": lambda: ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=NUM_LABELS,
        initializer_range=VIT_INIT_STD,
    ),
}
SPECS = {"resnet": ResNetSpec, "vit": ViTSpec}


def _seed(tag: str) -> bytes:
    """A fixed ChaCha20 seed per test case, so a failure reproduces."""
    return hashlib.sha256(tag.encode()).digest()


def _images(tag: str, shape: tuple[int, ...]) -> torch.Tensor:
    return ChaChaStream(_seed(tag)).normal(shape).to(torch.float32)


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, norm weights and biases (HF initialises them to 0/1)."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dim() != 1 or not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=gen))
            else:
                t.add_(0.3 * torch.randn(t.shape, generator=gen))
        if isinstance(model.config, ViTConfig):
            for name, t in model.named_parameters():
                if name.endswith(("cls_token", "position_embeddings")):
                    t.copy_(0.5 * torch.randn(t.shape, generator=gen))


def _build(name: str, config=None):
    config = config or CONFIGS[name]()
    torch.manual_seed(int.from_bytes(_seed(name)[:4], "little"))  # the tiny model's weights only
    model = AutoModelForImageClassification.from_config(config).to(torch.float32).eval()
    _randomize(model, torch.Generator().manual_seed(int.from_bytes(_seed("stats:" + name)[:4], "little")))
    return config, model


def _convert(config, model, rng: ChaChaStream, state_dict=None):
    """The converter's two passes, in memory: read the folded vectors, then transform tensor by tensor."""
    spec = SPECS[config.model_type](config, rng)
    sd = state_dict if state_dict is not None else model.state_dict()
    spec.source_names = set(sd)
    small = {n: t for n, t in sd.items() if spec.needs_first_pass(n)}
    assert small, "the first pass must collect the norm vectors"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        emitted = spec.transform(name, tensor, small)
        assert not set(emitted) & set(out), f"{name} emitted a tensor twice"
        out.update(emitted)
    ee_model = AutoModelForImageClassification.from_config(spec.ee_config(copy.deepcopy(config))).eval()
    ee_model.load_state_dict(out, strict=True)
    return spec, out, ee_model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request):
    config, model = _build(request.param)
    spec, out, ee_model = _convert(config, model, ChaChaStream(_seed("ee:" + request.param)))
    return request.param, config, model, spec, out, ee_model


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / expected.abs().max().item()


def _check_equivariant(model, ee_model, pi: torch.Tensor, pixel_values: torch.Tensor, **kwargs) -> None:
    with torch.no_grad():
        ref = model(pixel_values=pixel_values, **kwargs).logits
        ee = ee_model(pixel_values=pixel_values, **kwargs).logits
    assert ref.abs().max().item() > 1e-3, "degenerate model: logits are all ~0"
    assert _relative_error(ee[..., pi], ref) <= LOGITS_RTOL
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(pi.numel())
    assert torch.equal(inv[ee.argmax(-1)], ref.argmax(-1)), "top-1 labels differ"  # EE label pi[t] is label t
    # control: without un-permuting, the logits do not match (the labels really are permuted)
    assert _relative_error(ee, ref) > 0.1


def test_logits_are_equivariant(converted):
    name, config, model, spec, _, ee_model = converted
    pi = spec.vocab_perm
    assert torch.equal(torch.sort(pi).values, torch.arange(NUM_LABELS))
    inputs = spec.verification_inputs(batch=3)
    assert set(inputs) == {"pixel_values"}
    assert torch.equal(spec.ee_inputs(inputs)["pixel_values"], inputs["pixel_values"])  # images stay plain
    _check_equivariant(model, ee_model, pi, inputs["pixel_values"])
    _check_equivariant(model, ee_model, pi, _images("x:" + name, (2, config.num_channels, 32, 32)))


def test_resnet_other_image_sizes(converted):
    """ResNet is fully convolutional: padding, pooling and strides commute with the transforms at any size."""
    name, config, model, spec, _, ee_model = converted
    if config.model_type != "resnet":
        pytest.skip("ResNet only")
    _check_equivariant(model, ee_model, spec.vocab_perm, _images("odd:" + name, (2, 3, 45, 70)))


def test_vit_interpolated_position_embeddings(converted):
    """Interpolating the position embeddings acts on positions, so it commutes with the rotation of channels."""
    name, config, model, spec, _, ee_model = converted
    if config.model_type != "vit":
        pytest.skip("ViT only")
    pixels = _images("interp:" + name, (2, 3, 48, 40))
    _check_equivariant(model, ee_model, spec.vocab_perm, pixels, interpolate_pos_encoding=True)


def test_every_weight_was_transformed(converted):
    _, config, model, _, out, ee_model = converted
    sd = model.state_dict()
    assert set(out) == set(ee_model.state_dict()) == set(sd)
    weights = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weights
    for module in weights:
        n = module + ".weight"
        original, ee = sd[n].to(torch.float64), out[n].to(torch.float64)
        assert ee.shape == original.shape, n
        # not merely perturbed: the secret transforms change it at the scale of the weight itself
        assert (ee - original).abs().max().item() > 0.1 * original.abs().max().item(), n
    if config.model_type == "resnet":
        for n, t in out.items():
            if n.endswith(".normalization.weight"):
                assert torch.all(t == 1), n
            elif n.endswith(".normalization.running_mean"):
                assert torch.all(t == 0), n
            elif n.endswith(".normalization.running_var"):
                assert torch.all(t == torch.tensor(1.0 - BATCH_NORM_EPS, dtype=torch.float32)), n
            elif n.endswith(".normalization.num_batches_tracked"):
                assert t.dtype == torch.int64 and torch.equal(t, sd[n]), n
            elif n.endswith(".normalization.bias"):
                assert not torch.allclose(t, sd[n]), n
        convs = [n for n in out if n.endswith(".convolution.weight")]
        assert not any(n.replace(".weight", ".bias") in out for n in convs)  # still bias-free convolutions
    else:
        norms = [n for n in out if "layernorm" in n]
        assert norms
        for n in norms:
            expected = 1.0 if n.endswith(".weight") else 0.0
            assert torch.all(out[n] == expected), n
        for n in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"):
            assert (out[n] - sd[n]).abs().max().item() > 0.1 * sd[n].abs().max().item(), n


def test_resnet_plan_matches_modules(converted):
    """The shortcuts derived from the config are the ones transformers builds."""
    name, config, model, spec, _, _ = converted
    if config.model_type != "resnet":
        pytest.skip("ResNet only")
    modules = dict(model.named_modules())
    built = {n for n, m in modules.items() if isinstance(m, (ResNetConvLayer, ResNetShortCut))}
    assert set(spec.conv_modules()) == built
    layers = resnet_layers(config)
    assert len(layers) == sum(config.depths)
    for layer in layers:
        has_projection = isinstance(modules[layer.prefix + "shortcut"], ResNetShortCut)
        assert layer.shortcut == has_projection, layer.prefix
    flags = [layer.shortcut for layer in layers]
    assert any(flags) and (name == "resnet-downsample" or not all(flags))  # both kinds are exercised


def _forward_order(model: nn.Module, pixel_values: torch.Tensor) -> list[str]:
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(names[m])) for m in names]
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stage_layout_names_every_weight_once_in_forward_order(name):
    config, model = _build(name)
    layout = stage_layout(config)
    parts = [p for s in layout for p in s.parts]
    assert len({s.name for s in layout}) == len(layout)
    assert len({p.module for p in parts}) == len(parts)
    modules = dict(model.named_modules())
    for p in parts:
        expected = "conv2d" if isinstance(modules[p.module], nn.Conv2d) else "linear"
        assert isinstance(modules[p.module], (nn.Conv2d, nn.Linear)), p.module
        assert p.kind == expected, p.module
    pixels = _images("order:" + name, (1, 3, 32, 32))
    assert [p.module for p in parts] == _forward_order(model, pixels)
    assert [p.module for p in parts if p.permuted_output] == [parts[-1].module]
    assert layout[-1].name == "classifier"
    if config.model_type == "vit":
        assert [p.module.rsplit(".", 1)[-1] for p in layout[1].parts] == ["q_proj", "k_proj", "v_proj"]


def _im2col_conv(x: torch.Tensor, conv: nn.Conv2d, matrix: torch.Tensor) -> torch.Tensor:
    """What the client computes: `F.unfold` patches (channel-major) times the server's `(out, in*kh*kw)` matrix."""
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    height = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0]
    width = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1]
    out = patches.transpose(1, 2) @ matrix.T  # (batch, L, out)
    return out.transpose(1, 2).reshape(x.shape[0], matrix.shape[0], height + 1, width + 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_im2col_stages_match_conv2d(name):
    config, model = _build(name)
    spec, out, _ = _convert(config, model, ChaChaStream(_seed("im2col:" + name)))
    modules = dict(model.named_modules())
    conv_parts = [p for s in stage_layout(config) for p in s.parts if p.kind == "conv2d"]
    assert len(conv_parts) == sum(isinstance(m, nn.Conv2d) for m in modules.values())
    stream = ChaChaStream(_seed("patches:" + name))
    for part in conv_parts:
        conv = modules[part.module]
        assert conv.groups == 1
        for size in (17, 32):
            x = stream.normal((2, conv.in_channels, size, size)).to(torch.float32)
            w = out[part.weight]
            matrix = stage_matrix(part, w)
            assert matrix.shape == (conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
            got = _im2col_conv(x, conv, matrix)
            expected = F.conv2d(x, w, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
            assert got.shape == expected.shape, part.module
            assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item(), part.module


_QKV_OLD = {"q": "query", "k": "key", "v": "value"}


def _old_vit_name(name: str) -> str:
    """transformers 4.x names of a ViTForImageClassification tensor (what Hub checkpoints hold)."""
    name = re.sub(r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1.", name)
    name = re.sub(r"\.attention\.([qkv])_proj\.", lambda m: f".attention.attention.{_QKV_OLD[m.group(1)]}.", name)
    name = name.replace(".attention.o_proj.", ".attention.output.dense.")
    return name.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")


def test_vit_accepts_transformers4_names():
    config, model = _build("vit")
    sd = model.state_dict()
    old = {_old_vit_name(n): t for n, t in sd.items()}
    assert (
        "vit.encoder.layer.1.attention.attention.key.weight" in old and "vit.encoder.layer.0.output.dense.bias" in old
    )
    assert {ViTSpec.canonical_name(n) for n in old} == set(sd)
    _, new_out, _ = _convert(config, model, ChaChaStream(_seed("names")))
    spec, old_out, ee_model = _convert(config, model, ChaChaStream(_seed("names")), state_dict=old)
    assert set(old_out) == set(new_out) == set(sd)  # the EE checkpoint always has the current names
    for n in sd:
        assert torch.equal(old_out[n], new_out[n]), n
    _check_equivariant(model, ee_model, spec.vocab_perm, spec.verification_inputs()["pixel_values"])


def test_vit_drops_pooler_and_mask_token():
    config, model = _build("vit")
    sd = dict(model.state_dict())
    sd["vit.pooler.dense.weight"] = torch.ones(config.hidden_size, config.hidden_size)
    sd["vit.pooler.dense.bias"] = torch.ones(config.hidden_size)
    sd["vit.embeddings.mask_token"] = torch.ones(1, 1, config.hidden_size)
    _, out, _ = _convert(config, model, ChaChaStream(_seed("pooler")), state_dict=sd)
    assert not any(n.startswith("vit.pooler.") or n.endswith("mask_token") for n in out)


def test_vit_without_qkv_bias_refuses_a_layernorm_bias():
    config = CONFIGS["vit"]()
    config.qkv_bias = False
    config, model = _build("vit", config)
    with pytest.raises(ConversionError, match="q_proj.bias is missing"):
        _convert(config, model, ChaChaStream(_seed("nobias")))
    with torch.no_grad():
        for layer in model.vit.layers:
            layer.layernorm_before.bias.zero_()
    spec, out, ee_model = _convert(config, model, ChaChaStream(_seed("nobias")))
    assert "vit.layers.0.attention.q_proj.bias" not in out
    _check_equivariant(model, ee_model, spec.vocab_perm, spec.verification_inputs()["pixel_values"])


def test_resnet_checkpoint_that_disagrees_with_its_config_is_refused():
    config, model = _build("resnet-basic")
    sd = model.state_dict()
    other = CONFIGS["resnet-basic"]()
    other.hidden_sizes = [16, 16]  # now stage 0's first layer would need a projection shortcut
    spec = ResNetSpec(other, ChaChaStream(_seed("mismatch")))
    spec.source_names = set(sd)
    small = {n: t for n, t in sd.items() if spec.needs_first_pass(n)}
    with pytest.raises(ConversionError, match="does not match its config"):
        spec.transform(
            "resnet.embedder.embedder.convolution.weight", sd["resnet.embedder.embedder.convolution.weight"], small
        )


def test_unknown_tensor_and_family_are_refused():
    config, model = _build("resnet-basic")
    spec = ResNetSpec(config, ChaChaStream(_seed("unknown")))
    with pytest.raises(ConversionError, match="unexpected layout"):
        spec.transform("resnet.encoder.stages.9.layers.0.layer.0.convolution.weight", torch.zeros(8, 8, 3, 3), {})
    with pytest.raises(UnsupportedArchitectureError):
        stage_layout(types.SimpleNamespace(model_type="convnext"))
    headless = CONFIGS["vit"]()
    headless.num_labels = 0
    with pytest.raises(UnsupportedArchitectureError, match="num_labels=0"):
        ViTSpec(headless, ChaChaStream(_seed("headless")))


@pytest.mark.slow
def test_resnet50_shape_is_equivariant():
    """The real ResNet-50 architecture (`ResNetConfig()` defaults) with random weights and BatchNorm statistics."""
    start = time.perf_counter()
    config = ResNetConfig(num_labels=1000)
    assert (list(config.hidden_sizes), list(config.depths), config.layer_type) == (
        [256, 512, 1024, 2048],
        [3, 4, 6, 3],
        "bottleneck",
    )
    config, model = _build("resnet-50", config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 25_000_000 < n_params < 26_000_000  # ResNet-50's 25.6 M
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 53
    spec, _, ee_model = _convert(config, model, ChaChaStream(_seed("ee:resnet-50")))
    assert len(stage_layout(config)) == 54
    _check_equivariant(model, ee_model, spec.vocab_perm, _images("resnet-50", (2, 3, 224, 224)))
    assert time.perf_counter() - start < 300


@pytest.mark.parametrize("name", ["resnet-bottleneck", "vit"])
def test_ee_checkpoint_loads_with_from_pretrained(name, tmp_path):
    """Saved as the converter writes it (every tensor float32, current names), HF loads it as a plain checkpoint."""
    from safetensors.torch import save_file

    config, model = _build(name)
    spec, out, _ = _convert(config, model, ChaChaStream(_seed("saved:" + name)))
    save_file({n: t.to(torch.float32).contiguous() for n, t in out.items()}, str(tmp_path / "model.safetensors"))
    ee_config = spec.ee_config(copy.deepcopy(config))
    ee_config.architectures = [spec.architecture_for(config)]
    ee_config.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded).__name__ == spec.architectures[0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _check_equivariant(model, loaded.eval(), spec.vocab_perm, spec.verification_inputs()["pixel_values"])


@pytest.mark.slow
def test_vit_base_shape_is_equivariant():
    """The real ViT-B/16 architecture (`ViTConfig()` defaults) with random weights and norms."""
    config = ViTConfig(num_labels=1000, initializer_range=0.05)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (768, 12, 224, 16)
    config, model = _build("vit-base", config)
    spec, _, ee_model = _convert(config, model, ChaChaStream(_seed("ee:vit-base")))
    _check_equivariant(model, ee_model, spec.vocab_perm, spec.verification_inputs(batch=2)["pixel_values"])
