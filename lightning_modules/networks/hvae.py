"""A conditional VDVAE-style hierarchical VAE (counterfactual_benchmark §3.2 eqs. 2-4 and App. A.3; Child, "Very
deep VAEs", 2021; Ribeiro et al., "High fidelity image counterfactuals with probabilistic causal models", 2023).

One network for every dataset: resolutions, blocks per resolution, widths and latent channels are arguments.

**Architecture strings** (VDVAE's notation):

* encoder ``"32b3d2,16b3d2,8b3d2,4b3d4,1b4"``: stage i at resolution R has n ``Rb{n}`` residual blocks of width
  ``widths[i]`` and, with ``d{k}``, one more block that average-pools by k and widens to ``widths[i + 1]``;
* decoder ``"1b4,4b4,8b4,16b4,32b4"``: n top-down blocks at each resolution, coarse to fine, the width at a
  resolution being the encoder's there (``widths`` read from the finest resolution).

**Encoder**: a 7x7 stem, then bottleneck residual blocks (GELU, 1x1 -> kxk -> kxk -> 1x1 at width/``bottleneck``);
the last activation at each resolution feeds the posteriors of that resolution.

**Top-down decoder**: every block is a stochastic layer z_i with ``latent_channels`` channels at its resolution.
With the parents as constant maps pa (the conditioning vector broadcast over the resolution):

    p(z_i | z_<i)           = N(p_loc, exp(p_logscale)²), (p_loc, p_logscale, p_feat) = prior_i(g_i [, pa])
    q(z_i | z_<i, x, pa)    = N(q_loc, exp(q_logscale)²), (q_loc, q_logscale) = posterior_i(h, pa, a_R(x))
    h <- res_i(h + p_feat + proj_i([z_i, pa]))        eq. 2: h_i = h_{i+1} + f_ω^i(z_i, pa_x)
    g_{i+1} = proj'_i([z_i, p_feat])                   the next prior's input: z and prior features, never pa

so the prior over z_{1:L} does not depend on the parents (eq. 3; the latents are exogenous noise of a
Markovian SCM). With ``cond_prior=True`` the prior also reads pa, as the reference does for CelebA; the latents
are then no longer independent of the parents (a deliberate option, off by default for MorphoMNIST). Learned
bias maps (zero at start) initialise h and g at the coarsest resolution and are added after each nearest-
neighbour upsampling (up to ``bias_max_res``). The last layer of every prior branch is zero-initialised (the
prior starts at N(0, I) and adds no features) and the residual branches are scaled by 1/sqrt(#blocks).

**Likelihood**: 1x1 convolutions of the final h give the discretized Gaussian's mean and log-scale per pixel
and channel (``lightning_modules.likelihoods``), in [-1, 1] pixel units; the log-scale is floored at −9.

Deviations from the reference: one class for every dataset (the reference keeps three copies); its
conditioning-dropout copy of the parents, which is never used, is not reproduced; RGB channels are modelled
independently given h (the reference's CelebA model adds autoregressive channel coefficients, which make the
residual abduction depend on the channel order); every block is stochastic (the reference's ``z_max_res`` is
never below the image size in its configs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.networks import distributions
from lightning_modules.networks.blocks import remember_config

MIN_LOGSCALE = -9.0  # floor of the pixel log-scale, as published

_ENC_STAGE = re.compile(r"^(\d+)b(\d+)(?:d(\d+))?$")
_DEC_STAGE = re.compile(r"^(\d+)b(\d+)$")


def parse_encoder_arch(arch: str) -> list[tuple[int, int, int | None]]:
    """``"32b3d2,16b3d2,1b4"`` -> [(resolution, blocks, downsampling factor or None), ...]."""
    stages = []
    for part in arch.replace(" ", "").split(","):
        m = _ENC_STAGE.match(part)
        if m is None:
            raise ValueError(f"encoder stage {part!r} of {arch!r} is not of the form '<res>b<blocks>[d<factor>]'")
        stages.append((int(m[1]), int(m[2]), int(m[3]) if m[3] else None))
    for (res, _, down), (nxt, _, _) in zip(stages[:-1], stages[1:], strict=True):
        if down is None or res % down or res // down != nxt:
            raise ValueError(f"encoder {arch!r}: stage {res} must downsample to the next resolution {nxt} "
                             f"(write {res}b<n>d{res // nxt if nxt and res % nxt == 0 else '?'})")
    if stages[-1][2] is not None:
        raise ValueError(f"encoder {arch!r}: the last stage cannot downsample")
    return stages


def parse_decoder_arch(arch: str) -> list[tuple[int, int]]:
    """``"1b4,4b4,32b4"`` -> [(resolution, blocks), ...], coarse to fine."""
    stages = []
    for part in arch.replace(" ", "").split(","):
        m = _DEC_STAGE.match(part)
        if m is None or int(m[2]) < 1:
            raise ValueError(f"decoder stage {part!r} of {arch!r} is not of the form '<res>b<blocks>' (blocks >= 1)")
        stages.append((int(m[1]), int(m[2])))
    resolutions = [r for r, _ in stages]
    if resolutions != sorted(set(resolutions)):
        raise ValueError(f"decoder {arch!r}: resolutions must increase strictly, got {resolutions}")
    return stages


def gaussian_kl(
    q_loc: torch.Tensor, q_logscale: torch.Tensor, p_loc: torch.Tensor, p_logscale: torch.Tensor
) -> torch.Tensor:
    """KL[N(q_loc, σ_q²) ‖ N(p_loc, σ_p²)] per element, σ = exp(logscale) (``networks.distributions``, whose
    log-variances are 2·logscale)."""
    return distributions.gaussian_kl(q_loc, 2 * q_logscale, p_loc, 2 * p_logscale)


class BottleneckBlock(nn.Module):
    """GELU-conv 1x1 -> kxk -> kxk -> 1x1 through ``mid_width`` channels, an optional residual connection
    (1x1 projection when the width changes) and an optional average-pool by ``down``."""

    def __init__(
        self, in_width: int, mid_width: int, out_width: int, kernel_size: int = 3, residual: bool = True,
        down: int | None = None,
    ):
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.GELU(), nn.Conv2d(in_width, mid_width, 1),
            nn.GELU(), nn.Conv2d(mid_width, mid_width, kernel_size, padding=pad),
            nn.GELU(), nn.Conv2d(mid_width, mid_width, kernel_size, padding=pad),
            nn.GELU(), nn.Conv2d(mid_width, out_width, 1),
        )
        self.residual = residual
        self.skip = nn.Conv2d(in_width, out_width, 1) if residual and in_width != out_width else None
        self.down = down

    @property
    def last(self) -> nn.Conv2d:
        return self.body[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.residual:
            out = out + (x if self.skip is None else self.skip(x))
        if self.down:
            out = F.avg_pool2d(out, self.down)
        return out


class TopDownBlock(nn.Module):
    """One stochastic layer of the decoder (see the module docstring)."""

    def __init__(
        self, resolution: int, width: int, out_width: int, latent_channels: int, context_dim: int,
        bottleneck: int, cond_prior: bool, last: bool,
    ):
        super().__init__()
        mid, k = max(1, width // bottleneck), 3 if resolution > 2 else 1
        self.resolution, self.latent_channels, self.cond_prior = resolution, latent_channels, cond_prior
        self.prior = BottleneckBlock(width + (context_dim if cond_prior else 0), mid, 2 * latent_channels + width,
                                     k, residual=False)
        self.posterior = BottleneckBlock(2 * width + context_dim, mid, 2 * latent_channels, k, residual=False)
        self.z_proj = nn.Conv2d(latent_channels + context_dim, width, 1)
        self.res = BottleneckBlock(width, mid, out_width, k)
        self.next_prior_input = None if last else nn.Conv2d(latent_channels + width, out_width, 1)

    def prior_stats(self, g: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.prior(torch.cat([g, pa], 1) if self.cond_prior else g)
        c = self.latent_channels
        return out[:, :c], out[:, c:2 * c], out[:, 2 * c:]

    def posterior_stats(self, h: torch.Tensor, pa: torch.Tensor, act: torch.Tensor):
        return self.posterior(torch.cat([h, pa, act], 1)).chunk(2, dim=1)


@dataclass
class LatentLayer:
    """One stochastic layer of a posterior pass: the sample and both distributions' parameters."""

    z: torch.Tensor
    q_loc: torch.Tensor
    q_logscale: torch.Tensor
    p_loc: torch.Tensor
    p_logscale: torch.Tensor

    def kl(self) -> torch.Tensor:
        """KL[q ‖ p] of this layer per sample [B], summed over channels and positions."""
        return gaussian_kl(self.q_loc, self.q_logscale, self.p_loc, self.p_logscale).flatten(1).sum(1)


@dataclass
class HVAEOutput:
    """The pixel likelihood's mean and log-scale [B, C, H, W] and, for a posterior pass, the latent layers."""

    loc: torch.Tensor
    logscale: torch.Tensor
    layers: list[LatentLayer]


class ConditionalHVAENetwork(nn.Module):
    """Encoder, top-down decoder and pixel likelihood of the conditional HVAE (see the module docstring).

    :param image_size: input resolution (must be the encoder's first resolution).
    :param image_channels: C.
    :param context_dim: width of the parents' conditioning vector (``datamodules.base.condition_vector``).
    :param encoder_arch, decoder_arch: architecture strings (module docstring).
    :param widths: channels per encoder stage, finest first (one per resolution).
    :param latent_channels: channels of every z_i.
    :param bottleneck: width / bottleneck channels inside each block.
    :param cond_prior: the priors also read the parents.
    :param bias_max_res: learned bias maps at resolutions up to this one.
    """

    def __init__(
        self,
        image_size: int = 32,
        image_channels: int = 1,
        context_dim: int = 12,
        encoder_arch: str = "32b3d2,16b3d2,8b3d2,4b3d4,1b4",
        decoder_arch: str = "1b4,4b4,8b4,16b4,32b4",
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        latent_channels: int = 16,
        bottleneck: int = 4,
        cond_prior: bool = False,
        bias_max_res: int = 64,
    ):
        super().__init__()
        remember_config(self, locals())
        enc, dec = parse_encoder_arch(encoder_arch), parse_decoder_arch(decoder_arch)
        widths = [int(w) for w in widths]
        if len(widths) != len(enc):
            raise ValueError(f"widths {widths} must give one width per encoder stage ({len(enc)} in {encoder_arch!r})")
        if enc[0][0] != image_size:
            raise ValueError(f"encoder {encoder_arch!r} starts at {enc[0][0]}x{enc[0][0]} but image_size is {image_size}")
        width_at = {res: w for (res, _, _), w in zip(enc, widths, strict=True)}
        missing = [r for r, _ in dec if r not in width_at]
        if missing or dec[-1][0] != image_size:
            raise ValueError(f"decoder {decoder_arch!r} must use the encoder's resolutions {sorted(width_at)} and end "
                             f"at image_size {image_size}")
        self.image_size, self.image_channels, self.context_dim = image_size, image_channels, context_dim

        # encoder
        self.stem = nn.Conv2d(image_channels, widths[0], 7, padding=3)
        enc_blocks: list[nn.Module] = []
        for i, (_, n, down) in enumerate(enc):
            enc_blocks += [BottleneckBlock(widths[i], max(1, widths[i] // bottleneck), widths[i]) for _ in range(n)]
            if down:
                enc_blocks.append(BottleneckBlock(widths[i], max(1, widths[i] // bottleneck), widths[i + 1], down=down))
        self.encoder_blocks = nn.ModuleList(enc_blocks)

        # decoder
        layers = [(res, width_at[res]) for res, n in dec for _ in range(n)]
        self.decoder_blocks = nn.ModuleList(
            TopDownBlock(res, w, layers[min(i + 1, len(layers) - 1)][1], latent_channels, context_dim, bottleneck,
                         cond_prior, last=i == len(layers) - 1)
            for i, (res, w) in enumerate(layers)
        )
        self.bias = nn.ParameterDict({
            str(res): nn.Parameter(torch.zeros(1, width_at[res], res, res)) for res, _ in dec if res <= bias_max_res
        })
        self.out_loc = nn.Conv2d(widths[0], image_channels, 1)
        self.out_logscale = nn.Conv2d(widths[0], image_channels, 1)
        self._scale_initial_weights()

    def _scale_initial_weights(self) -> None:
        with torch.no_grad():
            enc_scale = math.sqrt(1.0 / len(self.encoder_blocks))
            for block in self.encoder_blocks:
                block.last.weight.mul_(enc_scale)
            dec_scale = math.sqrt(1.0 / len(self.decoder_blocks))
            for block in self.decoder_blocks:
                block.z_proj.weight.mul_(dec_scale)
                block.res.last.weight.mul_(dec_scale)
                block.prior.last.weight.zero_()
                block.prior.last.bias.zero_()

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, height, width) of every z_i, top (coarsest) first."""
        return [(b.latent_channels, b.resolution, b.resolution) for b in self.decoder_blocks]

    @property
    def latent_dim(self) -> int:
        return sum(c * h * w for c, h, w in self.latent_shapes)

    # -- passes --------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """x in [-1, 1] -> the last activation at each resolution."""
        if x.shape[-1] != self.image_size or x.shape[1] != self.image_channels:
            raise ValueError(f"this HVAE was built for {self.image_channels}x{self.image_size}x{self.image_size} "
                             f"images, got {tuple(x.shape[1:])}")
        h = self.stem(x)
        acts = {h.shape[-1]: h}
        for block in self.encoder_blocks:
            h = block(h)
            acts[h.shape[-1]] = h
        return acts

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, latent_temperature: float = 1.0
    ) -> HVAEOutput:
        """Posterior pass: z_i = q_loc + t·σ_q·n_i (``latent_temperature`` t; 0 gives the posterior means)."""
        return self._top_down(context, acts=self.encode(x), temperature=latent_temperature)

    def decode(self, latents: Sequence[torch.Tensor], context: torch.Tensor) -> HVAEOutput:
        """The likelihood at given latents (one per layer) and parents."""
        if len(latents) != len(self.decoder_blocks):
            raise ValueError(f"expected {len(self.decoder_blocks)} latents, got {len(latents)}")
        return self._top_down(context, latents=latents)

    def sample(self, context: torch.Tensor, temperature: float = 1.0) -> HVAEOutput:
        """Prior pass: z_i = p_loc + t·σ_p·n_i."""
        return self._top_down(context, temperature=temperature)

    def _top_down(
        self, context: torch.Tensor, acts: dict[int, torch.Tensor] | None = None,
        latents: Sequence[torch.Tensor] | None = None, temperature: float = 1.0,
    ) -> HVAEOutput:
        if context.shape[1] != self.context_dim:
            raise ValueError(f"the parents' conditioning vector has {context.shape[1]} columns; this HVAE was built "
                             f"with context_dim={self.context_dim}")
        n = context.shape[0]
        first = self.decoder_blocks[0].resolution
        h = g = self.bias[str(first)].expand(n, -1, -1, -1) if str(first) in self.bias else None
        if h is None:
            raise ValueError(f"the coarsest resolution {first} needs a bias map: set bias_max_res >= {first}")
        layers: list[LatentLayer] = []
        for i, block in enumerate(self.decoder_blocks):
            res = block.resolution
            pa = context[:, :, None, None].expand(-1, -1, res, res)
            if h.shape[-1] < res:
                bias = self.bias[str(res)] if str(res) in self.bias else 0.0
                h = bias + F.interpolate(h, size=(res, res))
                g = bias + F.interpolate(g, size=(res, res))
            p_loc, p_logscale, p_feat = block.prior_stats(g, pa)
            if acts is not None:
                q_loc, q_logscale = block.posterior_stats(h, pa, acts[res])
                z = _reparameterise(q_loc, q_logscale, temperature)
                layers.append(LatentLayer(z, q_loc, q_logscale, p_loc, p_logscale))
            elif latents is not None:
                z = latents[i]
            else:
                z = _reparameterise(p_loc, p_logscale, temperature)
            h = block.res(h + p_feat + block.z_proj(torch.cat([z, pa], 1)))
            if block.next_prior_input is not None:
                g = block.next_prior_input(torch.cat([z, p_feat], 1))
        return HVAEOutput(self.out_loc(h), self.out_logscale(h).clamp(min=MIN_LOGSCALE), layers)


def _reparameterise(loc: torch.Tensor, logscale: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return loc
    return loc + temperature * torch.exp(logscale) * torch.randn_like(loc)
