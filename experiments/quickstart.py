"""The quick start: ``make quickstart`` (``python -m experiments.quickstart [key=value ...]``).

On the embedded synthetic faces, on the CPU:

1. generate the faces in CelebA's layout (cached in ``data/``);
2. train the independent classifier of the ten rendered attributes (``classifier_faces_synth``): it judges whether
   an edit shows the requested Smiling value (the oracle of IFcVAE-GAN §4.1) and whether the other nine attributes
   are kept;
3. train IFcVAE-GAN and evaluate its Smiling edits on the test split against that judge, against the true
   counterfactuals, and beside the reference counterfactuals (x* = x, the mean training face, the nearest training
   face with the requested Smiling value) under the same protocol;
4. print a short summary: the edit success, the effect and preservation errors beside the two references, the
   verdicts, and where the image grids are. ``runs/<experiment>/latest/`` holds metrics.json, metrics.md (every
   metric, model and references side by side), the grids, checkpoints and the (offline unless credentials exist)
   W&B run.

The budgets below are the quick start's; the experiments' own defaults train longer. Extra ``key=value``
arguments apply to both runs (e.g. ``logger=csv``).
"""

from __future__ import annotations

import sys
import time

from configs.loader import ConfigError, compose
from experiments.cli import EXIT_INTERRUPTED, report, split_debug
from experiments.report import summary_lines, verdicts
from experiments.runner import run

# 32x32 faces: at the same wall time IFcVAE-GAN trains about four times the steps it could at 64x64, which is what
# a CPU quick start can afford (docs/results.md has the 64x64 runs).
RESOLUTION = ["data.image_size=32"]
JUDGE = "classifier_faces_synth"
JUDGE_BUDGET = [*RESOLUTION, "trainer.max_epochs=1", "trainer.limit_train_batches=100"]
MODEL = "ifcvae_smiling_synth"
MODEL_BUDGET = [*RESOLUTION, "model._width=32", "trainer.max_epochs=3"]
# One null intervention for composition (the experiment measures 1 and 10): ten chains of the model and of the
# three references over the test split are a minute that the quick start does not have.
EVALUATION = ["callbacks.counterfactual_metrics.composition_m=[1]"]


def main(argv: list[str] | None = None) -> int:
    extra, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    started = time.time()
    try:
        judge = run(compose(JUDGE, [*JUDGE_BUDGET, *extra]))
        if judge.interrupted:
            return EXIT_INTERRUPTED
        if not judge.best_checkpoint:
            raise ConfigError(f"the {JUDGE} run produced no checkpoint")
        model = run(compose(MODEL, [
            *MODEL_BUDGET, *EVALUATION, f"callbacks.editing_metrics.oracle={judge.best_checkpoint}",
            f"callbacks.editing_metrics.preservation_oracle={judge.best_checkpoint}", *extra,
        ]))
        if model.interrupted:
            return EXIT_INTERRUPTED
    except Exception as err:  # one line for every failure (experiments.cli); --debug shows the traceback
        if debug:
            raise
        return report(err)
    minutes = (time.time() - started) / 60
    judged = verdicts(model.metrics)
    failed = sorted({v.what for v in judged if not v.passes})
    accuracy = judge.metrics.get("test/acc_mean")
    print(f"\nQuick start finished in {minutes:.1f} min.")
    print(f"Judge ({JUDGE}): mean test accuracy over its ten attributes "
          f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} ({judge.run_dir})")
    print(f"\nIFcVAE-GAN ({MODEL}, {' '.join(MODEL_BUDGET)}) editing Smiling on the test faces:")
    print("\n".join(summary_lines(model.metrics)))
    print("\nVerdict: " + (f"FAILS {', '.join(failed)} against the reference counterfactuals." if failed
                           else "beats the reference counterfactuals on every verdict."))
    print(f"Image grid (factual | reconstruction | do(Smiling=0) | do(Smiling=1) | truth): "
          f"{model.run_dir / 'images' / 'test_cf_grid.png'}")
    print(f"Every metric beside the references: {model.run_dir / 'metrics.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
