"""BatchNorm folding (indexer/encoders/fold.py): the encoders run with their norms merged into their convolutions,
so the folded network must give the unfolded one's embeddings and sparsity, and folding must refuse what it
cannot prove."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from indexer.encoders import load_encoder
from indexer.encoders.efficientnet import load_efficientnet_lite0_classifier
from indexer.encoders.fold import StaticSameConv2d, fold_batchnorm, fold_same_padding
from indexer.sparsity.recorder import SparsityRecorder, activation_layers

PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pets"


def _photos() -> torch.Tensor:
    enc = load_encoder("efficientnet-lite0")
    paths = sorted(PETS.glob("*/*/*.jpg"))[::95]
    return torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in paths])


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def _randomise_norms(model: nn.Module) -> None:
    """Running statistics and affine parameters far from the identity, so that a fold that ignored one shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)


def test_efficientnet_encoder_is_folded_with_the_same_embeddings_and_layer_names() -> None:
    enc = load_encoder("efficientnet-lite0")
    plain = load_efficientnet_lite0_classifier()  # the same weights, not folded
    assert enc.folded == {"batchnorm": 49, "same_padding": 5}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.model.modules())
    assert load_encoder("efficientnet-lite0", fold=False).folded == {}
    # Sparsity is recorded at the activations: the same modules under the same names.
    assert [n for n, _ in activation_layers(enc.model)] == [n for n, _ in activation_layers(plain)]
    x = _photos().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ours = enc.model(x)
        theirs = plain.forward_head(plain.forward_features(x), pre_logits=True)
    assert _cosines(ours, theirs).min() >= 0.9999


def test_folded_sparsity_matches_unfolded() -> None:
    enc = load_encoder("efficientnet-lite0")
    plain = load_efficientnet_lite0_classifier()
    plain.reset_classifier(0)
    x = _photos()
    ids = [f"p{i}" for i in range(len(x))]
    tables = []
    for model in (enc.model, plain):
        with SparsityRecorder(model, "encoder", method="exact") as rec:
            with rec.record(ids), torch.inference_mode():
                model(x)
            tables.append(rec.frame())
    folded, unfolded = tables
    assert folded[["id", "layer_name", "metric"]].equals(unfolded[["id", "layer_name", "metric"]])
    assert (folded["value"] - unfolded["value"]).abs().max() < 1e-3


def test_timm_cnn_with_random_norm_statistics_folds_exactly() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    _randomise_norms(model)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 96, 96)
    assert fold_batchnorm(model, x[:2]) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        assert _cosines(model(x), reference(x)).min() >= 0.99999


class _NormOfTheInput(nn.Module):
    """Registers conv then norm, but the norm normalises the block's input, not the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bn(x)


class _ConvOutputUsedTwice(nn.Module):
    """The norm does take the conv's output, but the un-normalised output is used as well (a fold would change
    that use)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean(dim=(2, 3))


@pytest.mark.parametrize("cls", [_NormOfTheInput, _ConvOutputUsedTwice])
def test_a_fold_that_would_change_the_network_is_not_made(cls: type[nn.Module],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    _randomise_norms(model)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = model(x)
    with caplog.at_level(logging.WARNING, logger="indexer.encoders.fold"):
        assert fold_batchnorm(model, x) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
    # The first is refused before folding (its norm is not fed by the conv); the second only by the output check.
    assert ("folding undone" in caplog.text) == (cls is _ConvOutputUsedTwice)


def test_a_training_mode_norm_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].train()
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == 0
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("grid", [16, 0], ids=["latent-grid", "latent-vector"])
def test_the_vae_indexes_with_a_folded_channels_last_encoder_and_the_same_posterior(grid: int) -> None:
    from indexer.latents import TrainedModels, vae_for_inference, vae_vectors
    from indexer.models.vae import ConvVAE, VAEConfig

    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(latent_grid=grid)).eval()
    _randomise_norms(vae)
    trained = copy.deepcopy(vae)
    assert vae_for_inference(vae) == len(vae.config.channels)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vae.encoder.modules())
    x = torch.rand(6, 3, 64, 64)
    ours = vae_vectors(TrainedModels(vae=vae), x)
    with torch.inference_mode():
        mu, logvar = trained.encode(x)
    assert torch.allclose(torch.from_numpy(ours["vae_mu"]), mu, atol=1e-4, rtol=1e-4)
    assert torch.allclose(torch.from_numpy(ours["vae_logvar"]), logvar, atol=1e-4, rtol=1e-4)
    # Decoding (the latent explorer) is untouched.
    with torch.inference_mode():
        assert torch.equal(vae.decode(mu), trained.decode(mu))


@pytest.mark.parametrize(("kernel", "stride", "size"), [(3, 2, (224, 224)), (5, 2, (112, 112)), (3, 2, (31, 40)),
                                                        (5, 1, (14, 15)), (3, 2, (7, 7)), (1, 2, (9, 8))])
def test_static_same_padding_computes_what_timm_conv2d_same_does(kernel: int, stride: int,
                                                                 size: tuple[int, int]) -> None:
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    for groups, cin, cout in ((1, 3, 8), (6, 6, 6)):  # a stem-like and a depthwise convolution
        conv = Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=True).eval()
        ours = StaticSameConv2d(conv)
        x = torch.randn(2, cin, *size)
        with torch.inference_mode():
            expected, got = conv(x), ours(x)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-5)
            # Channels-last, as the encoders run.
            assert torch.allclose(ours.to(memory_format=torch.channels_last)(
                x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
    assert set(ours.state_dict()) == set(conv.state_dict())


def test_static_same_padding_follows_new_weights() -> None:
    from timm.layers.conv2d_same import Conv2dSame

    conv = Conv2dSame(3, 4, 3, 2).eval()
    ours = StaticSameConv2d(conv)
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        ours(x)  # the padded kernel of the old weights is made here
    ours.weight = nn.Parameter(ours.weight * 2)  # what a later BatchNorm fold does
    with torch.no_grad():
        conv.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(ours(x), conv(x), atol=1e-5)


def test_efficientnet_same_padding_fold_gives_the_unfolded_embeddings() -> None:
    enc = load_encoder("efficientnet-lite0", fold=False)
    reference = copy.deepcopy(enc.model)
    x = _photos().contiguous(memory_format=torch.channels_last)
    assert fold_same_padding(enc.model, x[:2]) == 5
    assert sum(isinstance(m, StaticSameConv2d) for m in enc.model.modules()) == 5
    with torch.inference_mode():
        assert _cosines(enc.model(x), reference(x)).min() >= 0.99999


def test_folded_encoder_loads_under_inference_mode_and_backpropagates_to_its_input() -> None:
    # The VAE's report loads the encoder inside inference_mode; its perceptual loss backpropagates through the
    # same network to the reconstruction after inference-mode passes (the fold's own probe is one).
    with torch.inference_mode():
        enc = load_encoder("efficientnet-lite0")
    assert enc.folded == {"batchnorm": 49, "same_padding": 5}
    enc = load_encoder("efficientnet-lite0")
    plain = load_encoder("efficientnet-lite0", fold=False)
    x = torch.rand(2, 3, 224, 224)
    grads = []
    for model in (enc.model, plain.model):
        with torch.inference_mode():
            model(x)
        xi = x.clone().requires_grad_(True)
        model(xi.contiguous(memory_format=torch.channels_last)).square().sum().backward()
        grads.append(xi.grad)
    assert _cosines(grads[0], grads[1]).min() >= 0.9999


def test_a_padding_fold_that_changes_the_output_is_undone(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from timm.layers.conv2d_same import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 4, 3, 2), nn.Flatten()).eval()
    original = model[0]
    monkeypatch.setattr(StaticSameConv2d, "forward", lambda self, x: Conv2dSame.forward(self, x) + 1.0)
    with caplog.at_level(logging.WARNING, logger="indexer.encoders.fold"):
        assert fold_same_padding(model, torch.randn(2, 3, 16, 16)) == 0
    assert model[0] is original and "padding fold undone" in caplog.text
