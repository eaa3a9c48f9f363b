import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffusers_stages
from diffusers_stages.cli import JOBS, build_parser, main
from diffusers_stages.configs import config_parser
from diffusers_stages.demo import DEMO_RUNS, budgets, demo_config, results_table, verdicts
from diffusers_stages.training import TrainingConfig

DEMO_ARGS = dict(
    dataset="digits",
    resolution=8,
    block_out_channels=[8, 16, 16],
    max_train_steps=2,
    train_batch_size=8,
    learning_rate=1e-3,
    seeds=[0, 1],
    num_inference_steps=2,
    low_nfe_steps=[1],
    fid_samples=16,
    overwrite_output_dir=False,
)


def test_demo_runs_are_training_configs(tmp_path):
    args = argparse.Namespace(**DEMO_ARGS, output_dir=str(tmp_path))
    configs = {(n, s): demo_config(args, n, s) for n in DEMO_RUNS for s in args.seeds}
    assert {c.noise_process for c in configs.values()} == {"edm", "edm_fdm"}
    assert {c.max_train_steps for c in configs.values()} == {2} and configs["baseline", 0].use_ema
    assert configs["fdm", 1].seed == 1 and configs["fdm", 1].output_dir == str(tmp_path / "fdm-seed1")
    assert not configs["baseline", 0].overwrite_output_dir  # a second demo into a used folder is refused
    with pytest.raises(ValueError, match="`max_train_steps`"):
        demo_config(argparse.Namespace(**{**DEMO_ARGS, "max_train_steps": 0}, output_dir=str(tmp_path)), "baseline", 0)


def test_demo_scores_the_default_budget_and_every_low_one():
    args = build_parser("demo").parse_args(["demo"])
    assert budgets(args) == [10, 4, 3]  # Heun NFE 19, 7 and 5: the study's FDM gain is largest at NFE 5
    assert budgets(argparse.Namespace(num_inference_steps=6, low_nfe_steps=[2])) == [6, 2]


def test_demo_table_reports_mean_std_per_seed_and_ratio():
    fids = {"baseline": [{7: 10.0, 19: 4.0}, {7: 30.0, 19: 6.0}], "fdm": [{7: 5.0, 19: 5.0}, {7: 15.0, 19: 5.0}]}
    rows = results_table(fids)
    assert "| fdm | 7 | 10.00 ± 7.07 | 5.00, 15.00 | 0.50 |" in rows
    assert "| baseline | 19 | 5.00 ± 1.41 | 4.00, 6.00 | 1.00 |" in rows
    assert verdicts(fids) == [
        "fdm at NFE 7: 0.50x the baseline's FID over 2 seeds: wins",
        "fdm at NFE 19: 1.00x the baseline's FID over 2 seeds: does not win",
    ]


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    argv = [f"--{k}={v}" for k, v in DEMO_ARGS.items() if not isinstance(v, (bool, list))]
    argv += ["--block_out_channels", "8", "16", "16", "--seeds", "0", "1", "--low_nfe_steps", "1"]
    assert main(["demo", *argv, "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "comparison.png").exists() and "| fdm | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "fdm-seed1" / "model_index.json").exists()


REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPTS = {
    "train": "train_multistage.py",
    "train-lora": "train_stage_lora.py",
    "merge": "merge_stage_adapters.py",
    "tdc": "train_tdc.py",
}


def _python(code: str, *args, cwd=None, env=None) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_help_lists_every_job_without_importing_torch_or_diffusers():
    out = _python(
        "import contextlib, io, sys\n"
        "from diffusers_stages.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules)\n"
        "print(heavy, buf.getvalue())",
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.startswith("[] usage: diffusers-stages")
    for job in ("train", "train-lora", "merge", "tdc", "cluster", "demo"):
        assert re.search(rf"\n    {job}\s", out), job
    assert "accelerate launch -m diffusers_stages.cli" in out and "developer" not in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"diffusers-stages {diffusers_stages.__version__}"


def test_lazy_package_keeps_the_public_api():
    assert "TrainingConfig" in diffusers_stages.__all__ and "TrainingConfig" in dir(diffusers_stages)
    from diffusers_stages import TrainingConfig as lazy

    assert lazy is TrainingConfig
    assert all(getattr(diffusers_stages, name) is not None for name in diffusers_stages.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusers_stages.nope  # noqa: B018


def test_each_subpackage_imports_first():
    """With a lazy package init, no import cycle is hidden by the order of the init's imports."""
    subpackages = sorted(p.parent.name for p in (REPO / "diffusers_stages").glob("*/__init__.py"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n    " + (
        "[sys.modules.pop(m) for m in list(sys.modules) if m.startswith('diffusers_stages')]"
    )
    _python(code, *(f"diffusers_stages.{name}" for name in subpackages), env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_flags_are_the_config_fields(job):
    cls = JOBS[job].load(JOBS[job].config)
    parser = build_parser(job)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[job]
    flags = {o for a in sub._actions for o in a.option_strings} - {"-h", "--help"}
    expected = {o for a in config_parser(cls)._actions for o in a.option_strings} - {"-h", "--help"}
    assert flags == expected and "--output_dir" in flags


def test_job_rejects_a_bad_value_with_the_config_message(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--max_train_steps", "0"])
    assert "`max_train_steps`" in capsys.readouterr().err


def test_train_subcommand_trains(tmp_path):
    flags = ["--dataset_name", "digits", "--resolution", "8", "--max_train_samples", "16", "--train_batch_size", "8"]
    flags += ["--block_out_channels", "16", "32", "--num_inference_steps", "1", "--validation_steps", "0"]
    flags += ["--report_to", "none", "--max_train_steps", "1", "--output_dir", str(tmp_path / "run")]
    assert main(["train", *flags]) == 0
    assert (tmp_path / "run" / "model_index.json").exists()


def _checkout_copy(tmp_path) -> Path:
    """A copy of this checkout's package and scripts (not installed anywhere)."""
    copy = tmp_path / "checkout"
    for folder in ("diffusers_stages", "training", "model_cards"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


# runs each script's --help in one interpreter (torch imported once), forgetting the package and sys.path between
# scripts, and prints, per script, the file the package came from and the help text
HELP_OF_EACH_SCRIPT = """
import contextlib, io, json, runpy, sys
path, results = list(sys.path), {}
for script in sys.argv[1:]:
    for name in [m for m in sys.modules if m.split(".")[0] == "diffusers_stages"]:
        del sys.modules[name]
    sys.path[:], sys.argv, buf = path, [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        runpy.run_path(script, run_name="__main__")
    results[script] = [sys.modules["diffusers_stages"].__file__, buf.getvalue()]
print(json.dumps(results))
"""


def test_every_script_runs_from_an_uninstalled_checkout(tmp_path):
    """Each script's ``--help`` imports the package of its own checkout, whatever is installed (cwd elsewhere, no
    PYTHONPATH); the job scripts' help is their subcommand's help."""
    copy = _checkout_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    scripts = sorted((copy / "training").glob("*.py"))
    assert {p.name for p in scripts} >= set(JOB_SCRIPTS.values())
    results = json.loads(_python(HELP_OF_EACH_SCRIPT, *scripts, cwd=tmp_path, env=env))
    for script in scripts:
        package, out = results[str(script)]
        assert package == str(copy / "diffusers_stages" / "__init__.py"), script.name
        assert f"usage: {script.name}" in out
        job = next((j for j, s in JOB_SCRIPTS.items() if s == script.name), None)
        if job is not None:
            sub = build_parser(job)._subparsers._group_actions[0].choices[job]
            options = [" ".join(text.split("options:")[1].split()) for text in (out, sub.format_help())]
            assert options[0] == options[1]


@pytest.mark.slow
def test_accelerate_launch_module(tmp_path):
    flags = ["--dataset_name", "digits", "--resolution", "8", "--max_train_samples", "16", "--train_batch_size", "8"]
    flags += ["--block_out_channels", "16", "32", "--num_inference_steps", "1", "--validation_steps", "0"]
    flags += ["--report_to", "none", "--max_train_steps", "1", "--output_dir", str(tmp_path / "run")]
    launch = ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusers_stages.cli", "train"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, *launch, *flags], check=True, capture_output=True, timeout=600, env=env)
    assert (tmp_path / "run" / "model_index.json").exists()
