"""``make bench``: speed of the pieces a run spends its time in, written to docs/benchmarks.md.

Measures, on this machine: synthetic-face rendering, reading a cached DataModule epoch, one IFcVAE-GAN training
step (all four players) at several widths and one classifier step. Timings are medians over repeats after
warm-up. ``python -m benchmarks --quick`` runs fewer repeats; ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from configs.loader import compose, instantiate
from datamodules.synthetic.faces import SyntheticFacesBuilder
from datamodules.synthetic.faces_factors import sample_factors
from datamodules.synthetic.faces_render import render_faces

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_render(repeats: int) -> list[tuple[str, str]]:
    factors = sample_factors(200, seed=0)
    t = _median_time(lambda: render_faces(factors, 64, 0.02), repeats, warmup=1)
    t128 = _median_time(lambda: render_faces(factors, 128, 0.02), max(1, repeats // 2), warmup=1)
    return [("render 200 faces, 64 px", f"{t:.2f} s ({200 / t:.0f} img/s)"),
            ("render 200 faces, 128 px", f"{t128:.2f} s ({200 / t128:.0f} img/s)")]


def bench_loader(repeats: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        builder = SyntheticFacesBuilder(n_train=2048, n_val=64, n_test=64, image_size=64)
        start = time.perf_counter()
        builder.build(tmp)
        build_s = time.perf_counter() - start
        dm = instantiate({"_target_": "datamodules.celeba.CelebADataModule", "root": tmp, "attributes": ["Smiling"],
                          "crop_size": None, "batch_size": 64, "cache": "always"})
        dm.setup("fit")
        loader = dm.train_dataloader()
        t = _median_time(lambda: sum(1 for _ in loader), repeats, warmup=1)
    return [("build 2,176 faces (render + JPEG + files)", f"{build_s:.1f} s"),
            ("one cached epoch of 2,048 images, batch 64", f"{t:.2f} s ({2048 / t:.0f} img/s)")]


def _step_fn(model, batch) -> Callable[[], None]:
    opts = model.configure_optimizers()
    opts = opts if isinstance(opts, list) else [opts]
    model.optimizers = lambda: opts
    model.manual_backward = lambda loss: loss.backward()
    model.log_dict = lambda *a, **k: None
    model.log = lambda *a, **k: None
    return lambda: model.training_step(batch, 0)


def bench_ifcvae(repeats: int, widths: list[int]) -> list[tuple[str, str]]:
    rows = []
    batch = {"x": torch.rand(64, 3, 64, 64), "pa": {"Smiling": (torch.rand(64) > 0.5).float()}}
    for width in widths:
        torch.manual_seed(0)
        model = instantiate(compose("ifcvae_smiling_synth", [f"model._width={width}"]).model)
        t = _median_time(_step_fn(model, batch), repeats)
        rows.append((f"IFcVAE-GAN training step, 64 px, batch 64, width {width}", f"{t:.3f} s"))
    return rows


def bench_classifier(repeats: int) -> list[tuple[str, str]]:
    model = instantiate(compose("classifier_smiling_synth").model)
    batch = {"x": torch.rand(64, 3, 64, 64), "pa": {"Smiling": (torch.rand(64) > 0.5).float()}}
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt

    def step():
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()

    model.log = lambda *a, **k: None
    model.log_dict = lambda *a, **k: None
    t = _median_time(step, repeats)
    return [("classifier training step, 64 px, batch 64 (width 32)", f"{t:.3f} s")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    rows = []
    rows += bench_render(repeats)
    rows += bench_loader(repeats)
    rows += bench_ifcvae(repeats, [16, 32] if args.quick else [16, 32, 64])
    rows += bench_classifier(repeats)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset"),
    }
    text = ["# Benchmarks", "", "Written by `make bench` (`python -m benchmarks`); medians after warm-up.", "",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
            "| what | time |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]]
    report = "\n".join(text) + "\n"
    print(report)
    if not args.no_write:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
