"""bench/suite.py: a quick run of two real rows and a failing one (every row's figures, the
failure reported with its error, results.json and results.md written) and the budget rule."""

import importlib.util
import json
import pathlib
import sys

import configs

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is not installed
from bench import photo_predict, suite  # noqa: E402

CPU = suite.Device("cpu", "cpu", 1, {"jax": "0"})


def broken(device, quick):
    raise RuntimeError("row broke on purpose")


def test_quick_rows_report_their_figures_and_a_failing_row(tmp_path, monkeypatch):
    """``--quick --only=plain,pseudo_masks,broken`` in this process (each row's work runs in
    child processes): the plain step with its JAX and PyTorch figures, the pseudo-mask pool
    against the official loop, and a row that raises, reported with its error."""
    monkeypatch.setattr(suite, "ROWS", [*suite.ROWS, suite.Row("broken", "a failing row",
                                                                broken, (1, 1, 1))])
    only = ["plain", "broken"]
    if importlib.util.find_spec("pydensecrf") is not None:
        only.insert(1, "pseudo_masks")
    report = suite.main(["--quick", f"--out={tmp_path}", f"--only={','.join(only)}"])
    rows = report["rows"]
    assert list(rows) == only
    plain = rows["plain"]
    assert plain["status"] == "ok", plain
    jax = plain["figures"]["jax"]
    for key in ("images_per_s", "step_s", "compile_s", "peak_mem_gib", "step_tflop"):
        assert jax[key] > 0, key
    assert jax["loss_finite"] is True and plain["figures"]["settings"]["dtype"] == "float32"
    if importlib.util.find_spec("torch") is not None:
        assert plain["figures"]["torch"]["images_per_s"] > 0
    if "pseudo_masks" in rows:
        pool = rows["pseudo_masks"]["figures"]
        assert pool["official_s_per_image"] > 0 and pool["generator_s_per_image"] > 0
        assert pool["agreement"] >= 0.999
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["error"] == "RuntimeError: row broke on purpose"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"]["broken"]["status"] == "failed" and saved["device"]["platform"] == "cpu"
    assert {"date", "command", "load", "host"} <= set(saved)
    text = (tmp_path / "results.md").read_text()
    assert "| plain | float32 | yes |" in text
    assert "- broken (a failing row): FAILED: RuntimeError: row broke on purpose" in text


def test_budget_skips_rows_that_would_not_fit_and_says_why():
    ran = []
    rows = [suite.Row(name, name, lambda d, q, name=name: ran.append(name) or {"x": 1},
                      (estimate, 100, 100)) for name, estimate in (("a", 1), ("b", 10))]
    results = suite.run_rows(rows, CPU, quick=True, budget_s=5)
    assert ran == ["a"] and results["a"]["status"] == "ok"
    assert results["b"]["status"] == "skipped" and "--budget_s=5" in results["b"]["reason"]
    missing = suite.Row("m", "m", broken, (1, 1, 1), needs=("no_such_module_here",))
    assert suite.run_rows([missing], CPU, True, None)["m"]["reason"] == (
        "needs no_such_module_here (not installed)")
    f32 = suite.Row("seam_f32", "f32", broken, (1, 1, 1))
    assert "float32: see seam" in suite.run_rows([f32], CPU, True, None)["seam_f32"]["reason"]


def test_bad_arguments_are_refused_before_any_row(tmp_path, monkeypatch):
    import pytest

    ran = []
    monkeypatch.setattr(suite, "ROWS", [suite.Row("a", "a", lambda d, q: ran.append(1) or {},
                                                  (1, 1, 1))])
    (tmp_path / "file").write_text("")
    for argv, text in (([f"--out={tmp_path / 'file'}"], "is a file, not a folder"),
                       (["--budget_s=-5"], "--budget_s=-5.0 must be a positive number"),
                       (["--budget_s=nan"], "--budget_s=nan must be a positive number"),
                       (["--only=,"], "--only=, names no row")):
        argv = [f"--out={tmp_path / 'out'}", *argv]
        with pytest.raises(SystemExit, match=text):
            suite.main(argv)
    assert not ran


def test_the_photo_row_uses_the_voc_canvas():
    assert photo_predict.CANVAS == tuple(configs.get_config("voc").data.eval_pad_to)
    assert photo_predict.PHOTO[0] * photo_predict.PHOTO[1] > 12e6


def test_the_photo_row_is_tabled():
    from bench.suite_report import photo_table

    figures = {"photo": [3024, 4032], "canvas": [512, 512], "model": {"width_div": 4,
               "blocks": "1,1,2,1"}, "eval": {"scales": [1.0], "flip": False},
               "predict_s": 1.5, "predict_host_peak_mb": 80.0, "export_load_s": 1.6,
               "export_load_host_peak_mb": 76.0, "baseline_s": 0.7, "baseline_host_peak_mb": 27.0,
               "model_alone_s": 0.4, "shrink_s": 0.9, "pil_resize_s": 0.3,
               "shrink_host_peak_mb": 75.5, "peak_rss_mb": 800.0,
               "shrink_vs_pil": {"max": 1, "share_over_1": 0.0}, "predict_equals_export": True}
    text = "\n".join(photo_table({"photo_predict": {"status": "ok", "figures": figures}}))
    assert "One 4032x3024 photo on the 512x512 canvas" in text
    assert "| pmm_jax.predict (no CRF) | 1.50 | 80.0 |" in text
    assert "predict equals export: True" in text
