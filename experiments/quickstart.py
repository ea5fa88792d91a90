"""The quick start: ``make quickstart`` (``python -m experiments.quickstart [key=value ...]``).

On the embedded synthetic faces, on the CPU and within about 15 minutes on 2 cores:

1. generate the faces in CelebA's layout (cached in ``data/``),
2. train the independent Smiling classifier (the oracle that judges edits, IFcVAE-GAN §4.1),
3. train IFcVAE-GAN and evaluate its Smiling edits on the test split against the oracle and the true
   counterfactuals,
4. print the results table; ``runs/<experiment>/latest/`` holds metrics.json, image grids, checkpoints and the
   (offline unless credentials exist) W&B run.

The budgets below are the quick start's; the experiments' own defaults train longer. Extra ``key=value``
arguments apply to both runs (e.g. ``logger=csv``).
"""

from __future__ import annotations

import sys
import time

from configs.loader import ConfigError, compose
from datamodules.base import DatasetError
from experiments.runner import EXIT_INTERRUPTED, markdown_table, run

CLASSIFIER_BUDGET = ["trainer.max_epochs=1", "trainer.limit_train_batches=150"]
IFCVAE_BUDGET = ["trainer.max_epochs=3"]  # 3 of the experiment's 8 epochs: inside 15 minutes on 2 cores


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    started = time.time()
    try:
        oracle = run(compose("classifier_smiling_synth", [*CLASSIFIER_BUDGET, *extra]))
        if oracle.interrupted:
            return EXIT_INTERRUPTED
        if not oracle.best_checkpoint:
            raise ConfigError("the classifier run produced no checkpoint")
        model = run(compose("ifcvae_smiling_synth", [
            *IFCVAE_BUDGET, f"callbacks.editing_metrics.oracle={oracle.best_checkpoint}", *extra,
        ]))
        if model.interrupted:
            return EXIT_INTERRUPTED
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    minutes = (time.time() - started) / 60
    print(f"\nQuick start finished in {minutes:.1f} min.")
    print(f"Oracle (classifier_smiling_synth): {oracle.run_dir}")
    print(markdown_table({k: v for k, v in oracle.metrics.items()}))
    print(f"\nIFcVAE-GAN (ifcvae_smiling_synth): {model.run_dir}")
    print(markdown_table(model.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
