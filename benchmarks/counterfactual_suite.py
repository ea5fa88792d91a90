"""How long the counterfactual metric suite takes over the 10,000 real MorphoMNIST test digits on this machine.

The suite: composition (m = 1 and 10; pixel L1 and embedding L1 on the predictors' features), reversibility,
effectiveness (predictors and morphometrics), CLD and FID with domain features, for single-parent interventions
on thickness and on intensity. Its cost is that of the metrics, so the model evaluated is the smallest
counterfactual model there is: ``CopyModel`` returns its input (x* = x), which is no method of any paper.
The evaluation models (predictors, unconditional VAE) are trained first on 8,000 of the digits for
``--epochs`` epochs (timed separately), with the project's own experiments.

Run: ``python -m benchmarks.counterfactual_suite [--root ../shared/data/morphomnist] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from callbacks.counterfactual_metrics import CounterfactualMetrics
from callbacks.metrics.minimality import CounterfactualLatentDivergence
from configs.loader import compose
from datamodules.morphomnist import MorphoMNISTDataModule
from experiments.runner import run
from lightning_modules.base import CounterfactualModule
from lightning_modules.predictors import AntiCausalPredictor
from lightning_modules.vae import VAE

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "morphomnist"


class CopyModel(CounterfactualModule):
    """x* = x: the cheapest model satisfying the contract, so that the timing is the metrics' own."""

    def abduct(self, x, pa):
        return x

    def predict(self, noise, pa):
        return noise

    def test_step(self, batch, batch_idx):
        return None


def _train(name: str, root: Path, runs: Path, epochs: int) -> Path:
    overrides = [f"data.root={root}", "data.layout=t10k_only", "data.t10k_split=[8000,1000,1000]",
                 f"trainer.max_epochs={epochs}", "trainer=cpu", "logger=none", f"paths.runs_dir={runs}",
                 "trainer.enable_progress_bar=false"]
    return Path(run(compose(name, overrides)).last_checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        predictors_ckpt = _train("predictors_morphomnist", args.root, Path(tmp), args.epochs)
        vae_ckpt = _train("vae_morphomnist", args.root, Path(tmp), args.epochs)
        t_train = time.perf_counter() - start
        predictors = AntiCausalPredictor.load_from_checkpoint(predictors_ckpt, map_location="cpu", weights_only=True)
        vae = VAE.load_from_checkpoint(vae_ckpt, map_location="cpu", weights_only=True)

    dm = MorphoMNISTDataModule(str(args.root), layout="t10k_only", t10k_split=(0, 0, 10000), batch_size=256)
    callback = CounterfactualMetrics(intervene=["thickness", "intensity"], distances=("l1", "embedding"),
                                     predictors=predictors, vae=vae, fid="fid_domain", fid_real="eval",
                                     morphometric=True, per_sample_csv=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tempfile.mkdtemp(prefix="cf-suite-"))
    start = time.perf_counter()
    trainer.test(CopyModel(), datamodule=dm, verbose=False)
    t_suite = time.perf_counter() - start

    # CLD alone on 10,000 posteriors: the set-level computation at the end (the per-batch part is the encoder).
    x = dm.dataset("test").images.float() / 255
    pa = dict(dm.dataset("test").pa)
    posteriors = [vae.posterior(b) for b in x.split(500)]
    mu, logvar = torch.cat([p[0] for p in posteriors]), torch.cat([p[1] for p in posteriors])
    cld = CounterfactualLatentDivergence(dm.attributes)
    cld.update(mu, logvar, mu, logvar, pa, pa, "thickness")
    start = time.perf_counter()
    cld.compute()
    t_cld = time.perf_counter() - start

    print(f"\nCounterfactual metric suite on {args.root} (10,000 images, 2 interventions, CopyModel)")
    print("| step | time |\n|---|---|")
    print(f"| train predictors + VAE, {args.epochs} epochs each on 8,000 digits | {t_train:.0f} s |")
    print(f"| the whole suite (trainer.test with CounterfactualMetrics) | {t_suite:.0f} s |")
    print(f"| CLD compute alone, 10,000 posteriors | {t_cld:.1f} s |")
    for key in sorted(callback.results["test"]):
        print(f"  {key} = {callback.results['test'][key]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
