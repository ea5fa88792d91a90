"""Fréchet distance, FID/KID metrics and their feature extractors; plus the one 1-vs-2-process test for the
realism metrics and the classifier scores of ``scores.py`` (one spawn, ~15 s, so marked slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torch import nn

from callbacks.metrics.realism import (
    FID,
    FID_WEIGHTS_FILE,
    KID,
    InceptionFeatures,
    build_feature_extractor,
    fid_from_moments,
    frechet_distance,
    frozen_forward,
    kid_subsets,
    mmd2_unbiased,
)
from callbacks.metrics.scores import (
    AttributeAccuracy,
    BalancedAccuracy,
    ClassifierFeatureDistance,
    SwapSuccessRate,
)
from tests.helpers.ddp import run_distributed, shard


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float64)
    return x.mean(0), torch.from_numpy(np.cov(x.numpy(), rowvar=False))


# -- frechet_distance -------------------------------------------------------------------------------------
def test_frechet_distance_closed_form_diagonal() -> None:
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.0])  # one singular covariance
    # ||Δμ||² = 1 + 0 + 4; Σ (√v1 − √v2)² = (1 − 2)² + (2 − 1)² + (3 − 0)² = 11
    fd = frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert fd.dtype == torch.float64
    assert fd.item() == pytest.approx(16.0, abs=1e-10)


def test_frechet_distance_matches_pytorch_fid() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=gen, dtype=torch.float64) @ torch.randn(
        16, 16, generator=gen, dtype=torch.float64
    )
    b = torch.randn(200, 16, generator=gen, dtype=torch.float64) * 2 + 0.5
    (mu1, s1), (mu2, s2) = _stats(a), _stats(b)
    expected = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert frechet_distance(mu1, s1, mu2, s2).item() == pytest.approx(expected, rel=1e-9)
    # fewer samples than dimensions: singular covariances, still real and matching
    (mu1, s1), (mu2, s2) = _stats(a[:10]), _stats(b[:12])
    expected = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert frechet_distance(mu1, s1, mu2, s2).item() == pytest.approx(expected, rel=1e-5)


# -- FID metric -------------------------------------------------------------------------------------------
def test_fid_running_sums_equal_formula_and_self_distance_is_zero() -> None:
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 8, generator=gen), torch.rand(33, 8, generator=gen)
    metric = FID("fid_domain", nn.Flatten(), num_features=8)
    for i in range(0, 40, 7):
        metric.update(real[i : i + 7], real=True)
    for i in range(0, 33, 5):
        metric.update(fake[i : i + 5], real=False)
    (mu1, s1), (mu2, s2) = _stats(real), _stats(fake)
    assert metric.compute().item() == pytest.approx(frechet_distance(mu1, s1, mu2, s2).item(), rel=1e-10)
    assert metric.name == "fid_domain"

    same = FID("fid_domain", nn.Flatten(), num_features=8)
    same.update(real, real=True)
    same.update(real, real=False)
    assert same.compute().item() == pytest.approx(0.0, abs=1e-9)
    assert torch.isnan(FID("fid_domain", nn.Flatten(), num_features=8).compute())


def test_fid_keeps_the_real_moments_across_reset_when_asked() -> None:
    gen = torch.Generator().manual_seed(2)
    real, fake, other = (torch.randn(20, 4, generator=gen) for _ in range(3))
    kept = FID("fid_domain", nn.Flatten(), num_features=4, reset_real=False)
    fresh = FID("fid_domain", nn.Flatten(), num_features=4)
    kept.update(real, real=True)
    kept.update(other, real=False)
    kept.reset()
    assert kept.has_real and int(kept.fake_n) == 0
    kept.update(fake, real=False)
    fresh.update(real, real=True)
    fresh.update(fake, real=False)
    assert kept.compute().item() == fresh.compute().item()
    fresh.reset()
    assert not fresh.has_real and int(fresh.real_n) == 0


def test_fid_from_moments_needs_two_samples() -> None:
    z = torch.zeros(3, dtype=torch.float64)
    assert torch.isnan(fid_from_moments(z, torch.zeros(3, 3), 1, z, torch.zeros(3, 3), 5))


def test_extractor_options_are_explicit() -> None:
    with pytest.raises(ValueError, match="needs a feature network"):
        build_feature_extractor("fid_domain")
    with pytest.raises(TypeError, match="fid_domain"):
        build_feature_extractor("fid_inception", nn.Flatten())
    with pytest.raises(ValueError, match="unknown extractor"):
        build_feature_extractor("inception")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_features"):
        FID("fid_domain", nn.Flatten())


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_feature_extractor_is_frozen_and_flags_restored() -> None:
    torch.manual_seed(0)
    net = _BNNet().train()
    net.body[1].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    metric = FID("fid_domain", net, num_features=4)
    x = torch.rand(6, 1, 8, 8)
    metric.update(x, real=True)
    metric.update(x, real=False)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-9)  # eval mode: dropout off, deterministic
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and net.body[0].training and not net.body[1].training
    assert [p.requires_grad for p in net.parameters()] == grads
    assert not frozen_forward(net, x).requires_grad


# -- fid_inception: real pytorch-fid loading code, stand-in weights ---------------------------------------
def _save_standin_inception(torch_home) -> None:
    """A randomly initialised FID Inception (pytorch-fid's patched torchvision net) under the real file name."""
    from pytorch_fid import inception as pf

    torch.manual_seed(0)
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / FID_WEIGHTS_FILE)


def test_fid_inception_missing_weights_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        FID("fid_inception")
    message = str(info.value)
    assert FID_WEIGHTS_FILE in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "$TORCH_HOME/hub/checkpoints/" in message and "github.com/mseitzer/pytorch-fid" in message


def test_fid_inception_loads_standin_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _save_standin_inception(tmp_path)
    features = InceptionFeatures()
    saved = torch.load(tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE)
    assert torch.equal(features.net.blocks[0][0].conv.weight, saved["Conv2d_1a_3x3.conv.weight"])
    gray = torch.rand(1, 1, 28, 28)
    out = frozen_forward(features, gray)
    assert out.shape == (1, 2048)
    assert torch.equal(out, frozen_forward(features, gray.expand(-1, 3, -1, -1)))  # grayscale → 3 channels
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        features(gray * 2 - 1)
    metric, kid = FID("fid_inception", features), KID("fid_inception", features, subsets=2, subset_size=2)
    assert (
        metric.feature_net is kid.feature_net
        and metric.name == "fid_inception"
        and kid.name == "kid_inception"
    )


# -- KID --------------------------------------------------------------------------------------------------
def test_mmd2_unbiased_vs_numpy() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(6, 5)) + 0.3
    k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    expected = (kxx.sum() - np.trace(kxx)) / 42 + (kyy.sum() - np.trace(kyy)) / 30 - 2 * kxy.mean()
    assert mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(
        expected, rel=1e-12
    )


def test_kid_metric_full_subset_and_seeding() -> None:
    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(12, 5, generator=gen), torch.randn(10, 5, generator=gen) + 0.5
    metric = KID("fid_domain", nn.Flatten(), subsets=1, subset_size=10)
    metric.update(real[:5], real=True)
    metric.update(fake, real=False)
    metric.update(real[5:], real=True)
    mean, std = metric.compute()
    # one subset of 10 of each set; the fake set is used whole
    assert std.item() == 0.0 and np.isfinite(mean.item())
    full = KID("fid_domain", nn.Flatten(), subsets=1, subset_size=10)
    full.update(real[:10], real=True)
    full.update(fake, real=False)
    m1, _ = kid_subsets(real[:10], fake, subsets=1, subset_size=10)
    assert full.compute()[0].item() == pytest.approx(mmd2_unbiased(real[:10], fake).item(), rel=1e-12)
    assert m1.item() == pytest.approx(mmd2_unbiased(real[:10], fake).item(), rel=1e-12)
    # seeded and independent of the order the features arrive in
    a = kid_subsets(real, fake, subsets=5, subset_size=4, seed=3)
    b = kid_subsets(real.flip(0), fake[torch.randperm(10, generator=gen)], subsets=5, subset_size=4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="subset_size"):
        kid_subsets(real, fake, subset_size=11)


# -- one distributed run for all metrics ------------------------------------------------------------------
def _all_metrics() -> dict:
    torch.manual_seed(0)
    net = _BNNet()
    return {
        "fid": FID("fid_domain", net, num_features=4),
        "kid": KID("fid_domain", net, subsets=3, subset_size=5, seed=1),
        "sr": SwapSuccessRate(),
        "cfd": ClassifierFeatureDistance(),
        "acc": AttributeAccuracy(["a", "b"]),
        "bca": BalancedAccuracy(),
    }


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "real": torch.rand(13, 1, 8, 8, generator=gen),
        "fake": torch.rand(11, 1, 8, 8, generator=gen) ** 2,
        "plus": torch.rand(9, generator=gen),
        "minus": torch.rand(9, generator=gen),
        "orig": torch.randn(9, 3, generator=gen),
        "cf": torch.randn(9, 3, generator=gen),
        "probs": torch.rand(13, 2, generator=gen),
        "req": torch.randint(0, 2, (13, 2), generator=gen),
        "labels": torch.randint(0, 2, (13,), generator=gen),
    }


def _run_all(rank: int, world_size: int) -> dict[str, float]:
    d = {k: shard(v, rank, world_size) for k, v in _data().items()}
    m = _all_metrics()
    for i in range(0, d["real"].shape[0], 3):  # several batches per process
        m["fid"].update(d["real"][i : i + 3], real=True)
        m["kid"].update(d["real"][i : i + 3], real=True)
    m["fid"].update(d["fake"], real=False)
    m["kid"].update(d["fake"], real=False)
    m["sr"].update(d["plus"], d["minus"])
    m["cfd"].update(d["orig"], d["cf"])
    m["acc"].update(d["probs"], d["req"])
    m["bca"].update(d["probs"][:, 0], d["labels"])
    kid_mean, kid_std = m["kid"].compute()
    out = {
        "fid": m["fid"].compute().item(),
        "kid_mean": kid_mean.item(),
        "kid_std": kid_std.item(),
        "cfd": m["cfd"].compute().item(),
        "bca": m["bca"].compute().item(),
    }
    out.update({f"sr/{k}": v.item() for k, v in m["sr"].compute().items()})
    out.update({f"acc/{k}": v.item() for k, v in m["acc"].compute().items()})
    return out


# In the default suite (about 20 s): CI must keep checking that every metric is the same on 1 and 2 processes.
def test_two_processes_equal_one_process() -> None:
    single = _run_all(0, 1)
    ranks = run_distributed(_run_all, 2)
    assert ranks[0] == pytest.approx(single, rel=1e-9, abs=1e-12)
    assert ranks[1] == pytest.approx(single, rel=1e-9, abs=1e-12)
    assert all(np.isfinite(v) for v in single.values())
