"""Minimality of counterfactuals: the Counterfactual Latent Divergence (CLD) of the benchmark's eq. (9).

Melistas et al., "Benchmarking Counterfactual Image Generation", §3.3 and Table 5:

    CLD = log(w1 · exp P(S_x* ≤ div) + w2 · exp P(S_x ≥ div))                                       (9)

"where div is the distance of the counterfactuals x* from the factuals x, S_x, S_x* are the sets of all
distances of the factual image to the images that have the same label as the factual and the counterfactual,
respectively: S_x = {d(x, x') | pa_x' = pa_x}, S_x* = {d(x, x') | pa_x' = pa_x*}, where x' is any image from
the data distribution and pa_x' is the variable being intervened upon."

How this module reads it, for a counterfactual x* of factual x made by intervening on parent v:

* ``d`` is the KL divergence between the full diagonal Gaussian posteriors ``q(z|·) = N(μ, diag exp(logvar))``
  of an *unconditional* VAE (mean **and** variance; the reference code reads the mean as a log-scale). The
  candidate image is the first argument and the factual the second, so that ``div = KL(q(z|x*) ‖ q(z|x))``
  and every element of the sets, ``KL(q(z|x') ‖ q(z|x))``, measure the same thing with x' in the place of x*.
  The reference divides by the latent dimension; a common scale does not change any probability, so we don't.
* ``pa`` is parent v only, the one intervened upon *for this sample* (never another sample's parent).
  Binary and categorical parents compare by value; continuous parents by equal-width bin of the raw value
  (``Attribute.bins`` / ``Attribute.bin_index``; 10 equal-width bins over [low, high] when the attribute has
  none, the paper's footnote 11).
* x' runs over the real (factual) images of the evaluated set, except x itself (its zero distance to itself is
  not a distance to "other" images).
* ``P(S ≤ div)`` is the fraction of the set's elements ≤ div. A sample with an empty S_x or S_x* has no score
  and is left out of the means (as the reference does); ``n`` counts the scored samples.

``w1 + w2 = 1`` keeps CLD in [0, 1]; the benchmark uses ``w1 = 0.8, w2 = 0.2``. Lower is better: far enough
from the factual's class (P(S_x ≥ div) low) but not farther than real images of the counterfactual's class
are (P(S_x* ≤ div) low).

Cost: the N × N divergences are computed in chunks of rows with two matrix products per chunk (closed-form
KL expanded into dot products, float64), never a Python loop over pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules.base import Attribute
from lightning_modules.networks import distributions

__all__ = [
    "CounterfactualLatentDivergence",
    "cld_from_probabilities",
    "cld_probabilities",
    "gaussian_kl",
    "pairwise_gaussian_kl",
]

# -- functional cores -------------------------------------------------------------------------------------
def gaussian_kl(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor) -> Tensor:
    """KL(N(μ_p, diag σ_p²) ‖ N(μ_q, diag σ_q²)) summed over the last dimension, elementwise over the rest, in
    float64 (``lightning_modules.networks.distributions.gaussian_kl``)."""
    mu_p, logvar_p, mu_q, logvar_q = (t.to(torch.float64) for t in (mu_p, logvar_p, mu_q, logvar_q))
    return distributions.gaussian_kl(mu_p, logvar_p, mu_q, logvar_q).sum(dim=-1)


def pairwise_gaussian_kl(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor) -> Tensor:
    """[P, Q] matrix of KL(p_i ‖ q_j) for posteriors p [P, D] and q [Q, D], by two matrix products:

    ``2·KL = Σ logvar_q_j − Σ logvar_p_i + (σ_p_i² + μ_p_i²)·(1/σ_q_j²) − 2 μ_p_i·(μ_q_j/σ_q_j²)
    + Σ μ_q_j²/σ_q_j² − D`` (float64).
    """
    return _kl_rows_q(mu_p, logvar_p, mu_q, logvar_q).T


def _kl_rows_q(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor) -> Tensor:
    """[Q, P] matrix of KL(p_j ‖ q_i), contiguous with one row per q (the layout the CLD chunks need)."""
    mu_p, logvar_p, mu_q, logvar_q = (t.to(torch.float64) for t in (mu_p, logvar_p, mu_q, logvar_q))
    prec_q = torch.exp(-logvar_q)
    out = prec_q @ (logvar_p.exp() + mu_p.square()).T
    out.addmm_(mu_q * prec_q, mu_p.T, alpha=-2.0)
    per_q = logvar_q.sum(-1) + (mu_q.square() * prec_q).sum(-1) - mu_q.shape[-1]
    out += per_q[:, None]
    out -= logvar_p.sum(-1)[None, :]
    return out.mul_(0.5)


def cld_probabilities(
    div: Tensor,
    fact_mu: Tensor,
    fact_logvar: Tensor,
    fact_code: Tensor,
    cf_code: Tensor,
    intervened: Tensor,
    ref_mu: Tensor | None = None,
    ref_logvar: Tensor | None = None,
    ref_codes: Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``P(S_x* ≤ div)`` and ``P(S_x ≥ div)`` per sample (float64 [N]; NaN where the set is empty).

    :param div: [N] divergences ``KL(q(z|x*_i) ‖ q(z|x_i))``.
    :param fact_mu, fact_logvar: [N, D] posteriors of the factuals.
    :param fact_code, cf_code: [N] codes (``Attribute.codes``) of the intervened parent's factual and
        counterfactual values.
    :param intervened: [N] index of the intervened parent (a column of ``ref_codes``).
    :param ref_mu, ref_logvar, ref_codes: the real images x' ([M, D], [M, D], [M, V] codes of every parent);
        ``None``: the factuals themselves, each sample's own factual excluded (then ``ref_codes`` must be given).
    :param chunk_size: rows of the [N, M] divergence matrix held at once (memory ~ 3 · chunk_size · M · 8 B).
    """
    if ref_codes is None:
        raise ValueError("ref_codes (the codes of every parent of the reference images) are required")
    exclude_self = ref_mu is None
    if exclude_self:
        ref_mu, ref_logvar = fact_mu, fact_logvar
        if ref_codes.shape[0] != fact_mu.shape[0]:
            raise ValueError("without a separate reference set, ref_codes must describe the factuals")
    n = div.shape[0]
    p_cf_le = torch.empty(n, dtype=torch.float64, device=div.device)
    p_fact_ge = torch.empty_like(p_cf_le)
    codes_by_parent = ref_codes.T.contiguous()  # [V, M]
    div = div.to(torch.float64)
    for start in range(0, n, max(1, int(chunk_size))):
        rows = slice(start, min(start + chunk_size, n))
        # S[i, j] = KL(q(z|x'_j) ‖ q(z|x_i)), the candidate first as for div.
        s = _kl_rows_q(ref_mu, ref_logvar, fact_mu[rows], fact_logvar[rows])
        codes = codes_by_parent[intervened[rows]]  # [c, M]: each row's own intervened parent
        in_fact = codes == fact_code[rows, None]
        in_cf = codes == cf_code[rows, None]
        if exclude_self:
            local = torch.arange(s.shape[0], device=s.device)
            in_fact[local, start + local] = False
            in_cf[local, start + local] = False
        d = div[rows, None]
        p_cf_le[rows] = (in_cf & (s <= d)).sum(1).to(torch.float64) / in_cf.sum(1).to(torch.float64)
        p_fact_ge[rows] = (in_fact & (s >= d)).sum(1).to(torch.float64) / in_fact.sum(1).to(torch.float64)
    return p_cf_le, p_fact_ge  # 0/0 = NaN marks an empty set


def cld_from_probabilities(p_cf_le: Tensor, p_fact_ge: Tensor, w1: float = 0.8, w2: float = 0.2) -> Tensor:
    """Eq. (9) per sample: ``log(w1·exp P(S_x* ≤ div) + w2·exp P(S_x ≥ div))``."""
    return torch.log(w1 * torch.exp(p_cf_le) + w2 * torch.exp(p_fact_ge))


# -- torchmetrics wrapper ---------------------------------------------------------------------------------
class CounterfactualLatentDivergence(Metric):
    """CLD over a whole set, with the factuals of the set as the real images x'.

    ``update(fact_mu, fact_logvar, cf_mu, cf_logvar, pa, cf_pa, intervened)``: posteriors [B, D] (mean and
    **log-variance**) of the unconditional VAE on the factuals and the counterfactuals, the factual and
    counterfactual parents (name -> values [B] in batch units) and the intervened parent: a name for the whole
    batch or a long tensor [B] of indices into ``attributes``.

    ``compute()`` returns ``cld`` (mean of eq. (9) over scored samples), ``p_sx_star_le_div`` and
    ``p_sx_ge_div`` (means of the two probabilities, Table 5's columns (ii) and (iii)), ``n`` (scored samples),
    and the same four per intervened parent as ``<key>/<parent>``. All per-sample values are a function of the
    set alone: the gathered rows are put in a canonical order before chunking and summing, so the result is
    the same bit for bit whatever the batch order or the number of processes.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, attributes: Sequence[Attribute], w1: float = 0.8, w2: float = 0.2, chunk_size: int = 1024,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attributes = tuple(attributes)
        if not self.attributes:
            raise ValueError("CLD needs at least one attribute")
        if w1 < 0 or w2 < 0 or not math.isclose(w1 + w2, 1.0):
            raise ValueError(f"w1 and w2 must be non-negative and sum to 1, got {w1}, {w2}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.w1, self.w2, self.chunk_size = float(w1), float(w2), int(chunk_size)
        for name in ("fact_mu", "fact_logvar", "cf_mu", "cf_logvar", "fact_codes", "cf_code", "intervened"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def _index(self, intervened: str | Tensor, n: int, device: torch.device) -> Tensor:
        names = [a.name for a in self.attributes]
        if isinstance(intervened, str):
            if intervened not in names:
                raise ValueError(f"intervened parent {intervened!r} is not among {names}")
            return torch.full((n,), names.index(intervened), dtype=torch.long, device=device)
        index = torch.as_tensor(intervened, device=device).reshape(-1).long()
        if index.numel() != n or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < len(names)):
            raise ValueError(f"intervened must hold {n} indices into {names}")
        return index

    def update(self, fact_mu: Tensor, fact_logvar: Tensor, cf_mu: Tensor, cf_logvar: Tensor,
               pa: Mapping[str, Tensor], cf_pa: Mapping[str, Tensor], intervened: str | Tensor) -> None:
        shape = fact_mu.shape
        if fact_mu.ndim != 2 or any(t.shape != shape for t in (fact_logvar, cf_mu, cf_logvar)):
            raise ValueError("posteriors must all have the same shape [B, D]")
        index = self._index(intervened, shape[0], fact_mu.device)
        fact_codes = torch.stack([a.codes(pa[a.name]).to(fact_mu.device) for a in self.attributes], dim=1)
        cf_codes = torch.stack([a.codes(cf_pa[a.name]).to(fact_mu.device) for a in self.attributes], dim=1)
        for name, value in (("fact_mu", fact_mu), ("fact_logvar", fact_logvar), ("cf_mu", cf_mu),
                            ("cf_logvar", cf_logvar)):
            getattr(self, name).append(value.detach().to(torch.float64))
        self.fact_codes.append(fact_codes)
        self.cf_code.append(cf_codes.gather(1, index[:, None])[:, 0])
        self.intervened.append(index)

    def _canonical(self) -> dict[str, Tensor]:
        data = {n: dim_zero_cat(getattr(self, n)) for n in
                ("fact_mu", "fact_logvar", "cf_mu", "cf_logvar", "fact_codes", "cf_code", "intervened")}
        keys = torch.cat([data["intervened"][:, None].double(), data["cf_code"][:, None].double(),
                          data["fact_codes"].double(), data["fact_mu"], data["fact_logvar"], data["cf_mu"],
                          data["cf_logvar"]], dim=1)
        perm = torch.arange(keys.shape[0], device=keys.device)
        for k in reversed(range(keys.shape[1])):  # lexicographic order by stable sorts, last key first
            perm = perm[torch.argsort(keys[perm, k], stable=True)]
        return {n: v[perm] for n, v in data.items()}

    def per_sample(self) -> dict[str, Tensor]:
        """Per-sample ``cld``, ``p_sx_star_le_div``, ``p_sx_ge_div`` (NaN: unscored) and ``intervened``, in the
        canonical order."""
        d = self._canonical()
        div = gaussian_kl(d["cf_mu"], d["cf_logvar"], d["fact_mu"], d["fact_logvar"])
        fact_code = d["fact_codes"].gather(1, d["intervened"][:, None])[:, 0]
        p_cf_le, p_fact_ge = cld_probabilities(div, d["fact_mu"], d["fact_logvar"], fact_code, d["cf_code"],
                                               d["intervened"], ref_codes=d["fact_codes"],
                                               chunk_size=self.chunk_size)
        return {"cld": cld_from_probabilities(p_cf_le, p_fact_ge, self.w1, self.w2),
                "p_sx_star_le_div": p_cf_le, "p_sx_ge_div": p_fact_ge, "intervened": d["intervened"]}

    def compute(self) -> dict[str, Tensor]:
        state = self.fact_mu
        if (sum(t.shape[0] for t in state) if isinstance(state, list) else state.shape[0]) == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
            groups = [""] + [f"/{a.name}" for a in self.attributes]
            out = {}
            for g in groups:
                out.update({f"cld{g}": nan, f"p_sx_star_le_div{g}": nan, f"p_sx_ge_div{g}": nan,
                            f"n{g}": torch.tensor(0, device=self.device)})
            return out
        s = self.per_sample()
        scored = s["cld"].isfinite()
        out = self._summary(s, scored, "")
        for k, a in enumerate(self.attributes):
            out.update(self._summary(s, scored & (s["intervened"] == k), f"/{a.name}"))
        return out

    @staticmethod
    def _summary(s: Mapping[str, Tensor], mask: Tensor, suffix: str) -> dict[str, Tensor]:
        n = mask.sum()
        out = {f"n{suffix}": n}
        for key in ("cld", "p_sx_star_le_div", "p_sx_ge_div"):
            values = s[key][mask]
            out[f"{key}{suffix}"] = values.sum() / n if n > 0 else torch.tensor(float("nan"), dtype=torch.float64,
                                                                                 device=values.device)
        return out
