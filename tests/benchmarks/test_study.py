"""The study harness (benchmarks/study.py) end to end in its --quick form, and its bookkeeping."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("study")
    finally:
        sys.path.remove(str(BENCH))


def test_quick_study_writes_results_and_resumes_without_training(study, tmp_path, monkeypatch):
    argv = ["--quick", "--output_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results")]
    report = study.main(argv)
    results = tmp_path / "results"
    for name in ("study.json", "study.md", "study_fid_vs_steps.png", "study_fid_vs_macs.png", "study_fid_vs_nfe.png"):
        assert (results / name).exists(), name
    for config in ("baseline", "edm_fdm"):
        assert (results / "study_samples" / f"{config}.npz").exists()
        assert (tmp_path / "work" / "runs" / config / "seed0.json").exists()
    md = (results / "study.md").read_text()
    for target in sys.modules["study_report"].TARGETS:  # every target's row, run or not
        assert target[4] in md
    assert "plateau" in md and "vp_fdm" in md  # the pending hook is listed, not silently dropped
    run = report["runs"]["baseline"]["0"]
    assert run["sampling"]["nfe"] == 5 and run["sampling"]["macs"] > 0 and run["train_macs_per_step"] > 0
    assert set(run["final"]["fid"]) == {"cnn", "mlp"} and len(run["curve"]) == 2
    long = report["runs"]["baseline_long"]["0"]  # trained twice the steps, on the same checkpoint grid
    assert long["steps"] == 8 and [c["step"] for c in long["curve"]] == [2, 4, 6, 8]
    assert set(report["plateau"]) == {"baseline", "baseline_long"} and "`baseline_long`" in md
    assert set(report["nfe_ratios"]["edm_fdm"]["mlp"]) == {3, 5} and "`edm_fdm` / its baseline" in md

    def no_training(*args, **kwargs):
        raise AssertionError("the cached study trained again")

    monkeypatch.setattr(study, "train", no_training)
    again = study.main(argv)  # every (config, seed) is cached: no training, same numbers
    assert again["runs"] == json.loads(json.dumps(report["runs"]))


def test_targets_are_met_only_where_both_feature_spaces_agree():
    sys.path.insert(0, str(BENCH))
    from study_report import evaluate_target, interpolate_reach, nfe_ratios, plateau

    assert interpolate_reach([(100, 10.0), (200, 6.0), (300, 4.0)], 8.0) == pytest.approx(150.0)
    assert interpolate_reach([(100, 10.0)], 1.0) is None
    curve = [{"step": s, "fid": {"cnn": f, "mlp": f}} for s, f in [(100, 10.0), (200, 5.0), (300, 4.9), (400, 4.8)]]
    assert plateau(curve, "cnn")["flat"] and plateau(curve, "cnn")["step_within_5pct_of_final"] == 200

    def run(cnn, mlp):
        return {"curve": [{"step": 100, "fid": {"cnn": cnn, "mlp": mlp}}, {"step": 200, "fid": {"cnn": 1, "mlp": 1}}]}

    base = {"curve": [{"step": 100, "fid": {"cnn": 9, "mlp": 9}}, {"step": 400, "fid": {"cnn": 3, "mlp": 3}}]}
    target = ("t", "x", "steps", 0.5, "claim")
    agree = evaluate_target(target, {"x": {0: run(2, 2)}, "baseline": {0: base}}, {"x": "baseline"}, 13)
    assert agree["verdict"] == "met" and agree["cnn"]["mean"] == pytest.approx(0.25)
    never = {"curve": [{"step": 100, "fid": {"cnn": 2, "mlp": 9}}, {"step": 200, "fid": {"cnn": 1, "mlp": 8}}]}
    split = evaluate_target(target, {"x": {0: never}, "baseline": {0: base}}, {"x": "baseline"}, 13)
    assert split["verdict"] == "feature spaces disagree"
    assert evaluate_target(target, {}, {}, 13)["verdict"] == "not run"

    def sweep(*fids):
        return {"nfe_sweep": [{"nfe": n, "fid": {"cnn": f, "mlp": 2 * f}} for n, f in zip((5, 7), fids)]}

    ratios = nfe_ratios({0: sweep(1, 2), 1: sweep(3, 2), 2: sweep(9, 9)}, {0: sweep(2, 4), 1: sweep(2, 4)})
    assert ratios["cnn"][5] == pytest.approx({"mean": 1.0, "std": 0.5**0.5}) and ratios["mlp"][7]["mean"] == 0.5


def test_the_full_study_scores_with_the_committed_classifiers(study, monkeypatch):
    from diffusers_stages.evaluation import classifier

    def no_training(*args, **kwargs):
        raise AssertionError("a committed classifier was missing and got trained")

    monkeypatch.setattr(classifier, "train_digit_classifier", no_training)
    folder = study.parse_args([]).classifier_dir
    assert Path(folder) == BENCH / "results" / "classifiers"
    for opts in study.SPACES.values():  # the features every figure in study.md is (re)scored in
        model = classifier.load_or_train_classifier("mnist", cache_dir=folder, progress=False, **opts)
        assert type(model) is classifier.classifier_class(opts["architecture"]) and model.config.test_accuracy > 0.97
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # stored in float16 (< 2 MiB), run in float32
