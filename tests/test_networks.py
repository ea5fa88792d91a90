"""Shapes, options and rebuildability of the plain networks."""

import pytest
import torch

from lightning_modules.networks.blocks import ConvTrunk, build_network, network_config
from lightning_modules.networks.classifiers import ConvClassifier, MLPClassifier
from lightning_modules.networks.decoders import ConvDecoder
from lightning_modules.networks.discriminators import ConvDiscriminator
from lightning_modules.networks.encoders import ConvEncoder

WIDTH = 4


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_decoder_discriminator_shapes(arch, size, channels):
    x = torch.rand(2, channels, size, size)
    mu, logvar, y = ConvEncoder(size, channels, WIDTH, latent_dim=6, n_attributes=2, arch=arch)(x)
    assert mu.shape == logvar.shape == (2, 6)
    assert y.shape == (2, 2)
    logits = ConvDecoder(size, channels, WIDTH, in_features=7, arch=arch)(torch.randn(2, 7))
    assert logits.shape == (2, channels, size, size)
    assert ConvDiscriminator(size, channels, WIDTH, arch=arch)(x).shape == (2,)
    assert ConvClassifier(size, channels, WIDTH, n_outputs=3, arch=arch)(x).shape == (2, 3)


@pytest.mark.parametrize("size, stages", [(8, 1), (32, 3), (64, 4), (128, 5)])
def test_trunk_ends_at_4x4_with_capped_widths(size, stages):
    trunk = ConvTrunk(size, 3, 2)
    convs = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == stages
    assert [c.out_channels for c in convs] == [2 * min(2**i, 8) for i in range(stages)]
    assert trunk.out_features == convs[-1].out_channels * 16


def test_paper_widths_at_64():
    enc = ConvEncoder(64, 3, 64, latent_dim=100)
    convs = [m for m in enc.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (w, (5, 5), (2, 2), (2, 2)) for w in (64, 128, 256, 512)
    ]
    assert enc.mu.in_features == 512 * 4 * 4


@pytest.mark.parametrize("size", [0, 4, 48, 100])
def test_invalid_image_size_is_rejected(size):
    with pytest.raises(ValueError, match="power of two"):
        ConvEncoder(size, 3, WIDTH)


@pytest.mark.parametrize("kwargs", [{"arch": "vit"}, {"norm": "layer"}, {"init": "xavier"}])
def test_invalid_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ConvEncoder(16, 3, WIDTH, **kwargs)


def test_encoder_without_attribute_head():
    enc = ConvEncoder(16, 3, WIDTH, latent_dim=5, n_attributes=0)
    mu, logvar, y = enc(torch.rand(2, 3, 16, 16))
    assert y is None and mu.shape == (2, 5)


def test_attribute_head_trains_the_trunk():
    """E_y reads non-detached features (the official code detaches them)."""
    enc = ConvEncoder(16, 3, WIDTH, latent_dim=5)
    _, _, y = enc(torch.rand(2, 3, 16, 16))
    first_conv = enc.trunk.net[0].weight
    (grad,) = torch.autograd.grad(y.sum(), first_conv)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["none", "batch", "instance"])
def test_trunk_norm_options(norm):
    disc = ConvDiscriminator(16, 3, WIDTH, norm=norm)
    norms = [m for m in disc.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d))]
    assert (len(norms) > 0) == (norm != "none")
    assert disc(torch.rand(2, 3, 16, 16)).shape == (2,)


def test_decoder_is_dcgan_transposed_convs():
    dec = ConvDecoder(64, 3, 64, in_features=101)
    ups = [m for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels) for u in ups] == [(512, 256), (256, 128), (128, 64), (64, 3)]
    assert all(u.kernel_size == (3, 3) and u.stride == (2, 2) and u.output_padding == (1, 1) for u in ups)


def test_mlp_classifier_default_is_the_official_auxiliary_network():
    mlp = MLPClassifier()
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(100, 1000), (1000, 1000), (1000, 1)]
    assert mlp(torch.randn(4, 100)).shape == (4, 1)


def test_dcgan_init():
    torch.manual_seed(0)
    dec = ConvDecoder(32, 3, 16, in_features=11, init="dcgan")
    weights = torch.cat(
        [m.weight.flatten() for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    )
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all((m.bias == 0).all() for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d))


@pytest.mark.parametrize(
    "net",
    [
        ConvEncoder(16, 1, WIDTH, latent_dim=3, arch="resnet", norm="instance"),
        ConvDecoder(16, 1, WIDTH, in_features=4, arch="resnet"),
        ConvDiscriminator(16, 3, WIDTH, norm="batch"),
        MLPClassifier(3, (5, 7), 2),
        ConvClassifier(16, 3, WIDTH, n_outputs=2, dropout=0.1),
    ],
    ids=lambda net: type(net).__name__,
)
def test_config_rebuilds_the_same_architecture(net):
    config = network_config(net)
    assert config["_target_"].endswith(type(net).__name__)
    rebuilt = build_network(config)
    rebuilt.load_state_dict(net.state_dict())  # same parameter names and shapes
    assert network_config(rebuilt) == config
    assert all(not isinstance(v, tuple) for v in config.values())  # plain containers only


def test_build_network_passes_modules_through_and_refuses_non_modules():
    net = MLPClassifier(2, (), 1)
    assert build_network(net) is net
    with pytest.raises(TypeError, match="nn.Module"):
        build_network({"_target_": "os.getcwd"})
    with pytest.raises(TypeError, match="_target_"):
        build_network({"in_features": 3})
