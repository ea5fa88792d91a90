"""The benchmark-table printer reads metrics.json files and puts the paper's values beside ours."""

from __future__ import annotations

import json

from experiments.tables import composition_table, effectiveness_table, load, main, realism_table


def _run(tmp_path, metrics, std=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": metrics, **({"std": std} if std else {})}))
    return tmp_path


def test_rows_hold_ours_and_the_papers(tmp_path):
    metrics = {"test/composition/l1/1": 5.0, "test/composition/l1/10": 12.25, "test/composition/embedding/1": 0.5,
               "test/effectiveness/do_thickness/thickness": 0.2, "test/fid_domain": 3.5, "test/cld": 0.3}
    runs = {"HVAE": load(_run(tmp_path / "a", metrics, {"test/composition/l1/1": 0.25})),
            "mine": load(_run(tmp_path / "b", metrics))}
    table = composition_table(runs).splitlines()
    assert table[2] == "| HVAE | 5.000 ± 0.250 (0.438) | 12.250 (1.550) | 0.500 (0.009) | – (0.038) |"
    assert table[3] == "| mine | 5.000 (–) | 12.250 (–) | 0.500 (–) | – (–) |"
    assert effectiveness_table(runs).splitlines()[2].startswith("| HVAE | 0.200 (0.086) | – (0.224) |")
    assert realism_table(runs).splitlines()[2] == "| HVAE | 3.500 (5.362) | 0.300 (0.272) | – (0.112) | – (0.736) |"


def test_a_missing_run_is_named(tmp_path, capsys):
    assert main([f"GAN={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere/metrics.json does not exist" in capsys.readouterr().err


def test_truth_table_reads_the_true_counterfactual_errors(tmp_path):
    from experiments.tables import truth_table

    run = load(_run(tmp_path, {"test/true_cf/do_thickness/mse": 0.5, "test/true_cf/do_intensity/l1": 0.25,
                               "test/true_cf/do_thickness/effect_mse": 0.125,
                               "test/true_cf/do_intensity/preservation_mse": 0.0625}))
    table = truth_table({"m": run}).splitlines()
    assert table[0].startswith("| model | MSE do(t) | MSE do(i) | effect do(t) | effect do(i) | preservation do(t) |")
    assert table[2] == "| m | 0.500 | – | 0.125 | – | – | 0.062 | – | 0.250 |"


def test_reference_rows_and_failures_follow_the_models(tmp_path, capsys):
    from experiments.tables import failures, with_references

    reference = {"test/reference/identity/true_cf/do_thickness/effect_mse": 0.2,
                 "test/reference/identity/morpho_effectiveness/do_thickness/thickness": 0.87,
                 "test/reference/mean/true_cf/do_thickness/effect_mse": 0.3}
    good = {"test/true_cf/do_thickness/effect_mse": 0.1, "test/morpho_effectiveness/do_thickness/thickness": 0.2,
            **reference}
    bad = {**good, "test/true_cf/do_thickness/effect_mse": 0.25,
           "test/reference/identity/true_cf/do_thickness/effect_mse": 0.2001}
    runs = {"good": load(_run(tmp_path / "g", good)), "bad": load(_run(tmp_path / "b", bad))}
    rows = with_references(runs)
    assert list(rows) == ["good", "bad", "*x\\* = x* (reference)", "*mean image* (reference)"]
    assert rows["*x\\* = x* (reference)"][0]["test/true_cf/do_thickness/effect_mse"] == 0.2
    assert "'identity' differs from the first run's" in capsys.readouterr().err
    assert [line.split(":")[0] for line in failures(runs)] == ["- bad"]
    table = effectiveness_table(rows, "morpho_effectiveness").splitlines()
    assert table[2].startswith("| good | 0.200 (0.870) |")
    assert table[4].startswith("| *x\\* = x* (reference) | 0.870 (0.870) |")


def test_cdvae_tables_put_the_papers_values_beside_ours(tmp_path, capsys):
    from experiments.tables import cdvae_accuracy_table, cdvae_fid_table, cdvae_truth_table

    metrics = {"test/fid_domain": 12.5, "test/edit/Bangs/flip_acc": 0.75, "test/acc/oracle/Bangs": 0.986,
               "test/edit/Smiling/flip_acc": 0.5, "test/true_cf/do_Male/mse": 0.0125}
    runs = {"CDVAE-GAN": load(_run(tmp_path / "a", metrics)), "mine": load(_run(tmp_path / "b", {}))}
    fid = cdvae_fid_table(runs).splitlines()
    assert fid[2] == "| CDVAE-GAN | 12.500 (34.24) | domain |"
    assert fid[3] == "| mine | – (–) | – |"
    accuracy = cdvae_accuracy_table(runs).splitlines()
    assert accuracy[0] == "| attribute | oracle on real test images | CDVAE-GAN | mine |"
    assert accuracy[2] == "| Bangs | 98.6% (87.2%) | 75.0% (73.79%) | – (–) |"
    assert accuracy[8] == "| Smiling | – (88.4%) | 50.0% (81.62%) | – (–) |"
    assert cdvae_truth_table(runs).splitlines()[2] == "| CDVAE-GAN | – | – | – | 0.013 | – | – | – |"
    assert main(["--cdvae", f"VAE={tmp_path / 'a'}"]) == 0
    assert "| VAE | 12.500 (122.86) | domain |" in capsys.readouterr().out
