"""The study's report: mean +- std over seeds, the issue-18 target ratios in both feature spaces, the baseline's
plateau check, ``study.{json,md}`` and the plots. Pure bookkeeping over the cached per-run results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPACES = ("cnn", "mlp")
PLATEAU_GAIN = 0.05  # the baseline counts as trained to its plateau when the last quarter gains < 5% FID
PLATEAU_CONFIGS = ("baseline", "baseline_long")  # the baseline at the study's budget and trained twice as long

#: (target id, configuration, measure, threshold, what the paper claims)
TARGETS = [
    ("fdm_steps", "edm_fdm", "steps", 0.5, "EDM-FDM: steps to the baseline's final FID <= 0.5x"),
    ("fdm_nfe", "edm_fdm", "nfe", 1 / 3, "EDM-FDM: NFE to match the baseline at its default NFE <= 1/3"),
    ("vp_fdm_steps", "vp_fdm", "steps", 0.5, "VP-FDM: steps to the VP baseline's final FID <= 0.5x"),
    ("discrete_fdm_steps", "fdm_discrete", "steps", 0.5, "discrete FDM: steps to DDPM's final FID <= 0.5x"),
    ("ms_log_sigma_steps", "ms_log_sigma", "steps", 0.5, "multi-stage (log-sigma stages): steps <= 0.5x"),
    ("ms_balanced_steps", "ms_balanced", "steps", 0.5, "multi-stage (balanced stages): steps <= 0.5x"),
    ("ms_balanced_macs", "ms_balanced", "macs", 0.5, "multi-stage (balanced stages): training MACs <= 0.5x"),
    ("ms_od_steps", "ms_optimal_denoiser", "steps", 0.5, "multi-stage (optimal-denoiser stages): steps <= 0.5x"),
    ("ms_tailored_macs", "ms_balanced_tailored", "macs", 0.5, "multi-stage, tailored decoders: training MACs <= 0.5x"),
    ("ms_init_steps", "ms_balanced_from_unified", "steps", 0.5, "multi-stage from a unified init: steps <= 0.5x"),
    ("ms_fdm_steps", "ms_balanced_fdm", "steps", 0.35, "multi-stage + FDM: steps <= 0.35x"),
    ("ms_fdm_macs", "ms_balanced_fdm", "macs", 0.35, "multi-stage + FDM: training MACs <= 0.35x"),
    ("ms_per_sample_steps", "ms_balanced_per_sample", "steps", 0.5, "multi-stage (a stage per sample): steps <= 0.5x"),
    ("ms_uniform_draw_steps", "ms_log_sigma_uniform_draw", "steps", 0.5, "multi-stage (uniform draw): steps <= 0.5x"),
    ("deme_vs_base", "deme_lora", "deme_base", 0.8, "DeMe (LoRA): merged FID <= 0.8x the pretrained model's"),
    ("deme_vs_control", "deme_lora", "deme_control", 1.0, "DeMe (LoRA): merged FID < the equal-steps control's"),
    ("deme_full_vs_base", "deme_full", "deme_base", 0.8, "DeMe (full + EMA): merged FID <= 0.8x the pretrained"),
    ("deme_full_vs_control", "deme_full", "deme_control", 1.0, "DeMe (full + EMA): merged FID < the control's"),
    ("deme_lora_plateau_vs_base", "deme_lora_plateau", "deme_base", 0.8, "DeMe (LoRA, plateau base): merged <= 0.8x"),
    ("deme_lora_plateau_vs_control", "deme_lora_plateau", "deme_control", 1.0, "DeMe (LoRA, plateau base): < control"),
    ("deme_full_plateau_vs_base", "deme_full_plateau", "deme_base", 0.8, "DeMe (full, plateau base): merged <= 0.8x"),
    ("deme_full_plateau_vs_control", "deme_full_plateau", "deme_control", 1.0, "DeMe (full, plateau base): < control"),
    ("combo_vs_base", "ms_fdm_deme", "deme_base", 0.8, "FDM + multi-stage + DeMe: merged FID <= 0.8x its base's"),
    ("combo_vs_control", "ms_fdm_deme", "deme_control", 1.0, "FDM + multi-stage + DeMe: merged FID < the control's"),
    ("tdc_fid", "tdc", "final_fid", 1.0, "TDC: FID < the unified model's at equal training compute"),
    ("tdc_sampling_macs", "tdc", "sampling_macs", 0.8, "TDC: sampling MACs <= 0.8x the unified model's"),
    ("tdc_k075_fid", "tdc_k075", "final_fid", 1.0, "TDC (pruning ratio 0.75): FID < the unified model's"),
    ("tdc_k075_macs", "tdc_k075", "sampling_macs", 0.8, "TDC (pruning ratio 0.75): sampling MACs <= 0.8x"),
    ("tdc_snr_fid", "tdc_snr", "final_fid", 1.0, "TDC (the paper's SNR grouping): FID < the unified model's"),
    ("tdc_snr_macs", "tdc_snr", "sampling_macs", 0.8, "TDC (the paper's SNR grouping): sampling MACs <= 0.8x"),
    (
        "tdc_gradient_only_fid",
        "tdc_gradient_only",
        "final_fid",
        1.0,
        "TDC (gradient-only grouping): FID < the unified's",
    ),
    (
        "tdc_gradient_only_macs",
        "tdc_gradient_only",
        "sampling_macs",
        0.8,
        "TDC (gradient-only grouping): MACs <= 0.8x",
    ),
    ("tdc_phase1_075_fid", "tdc_phase1_075", "final_fid", 1.0, "TDC (3/4 of the budget unified): FID < the unified's"),
    (
        "tdc_phase1_075_macs",
        "tdc_phase1_075",
        "sampling_macs",
        0.8,
        "TDC (3/4 of the budget unified): sampling MACs <= 0.8x",
    ),
]


def interpolate_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First x (linearly interpolated) at which the curve ``[(x, fid), ...]`` reaches ``fid <= target``."""
    prev = None
    for x, y in points:
        if y <= target:
            if prev is None:
                return float(x)
            x0, y0 = prev
            return x0 + (x - x0) * (y0 - target) / max(y0 - y, 1e-12)
        prev = (x, y)
    return None


def fid_at(points: list[tuple[float, float]], x: float) -> float:
    """The curve's FID at ``x`` (linear interpolation, clamped to its ends)."""
    xs, ys = zip(*points)
    return float(np.interp(x, xs, ys))


def plateau(curve: list[dict], space: str) -> dict:
    """The gain over the last quarter of training, ``(FID(3/4 S) - FID(S)) / FID(3/4 S)`` (flat when < 5%), and the
    first checkpoint whose FID is within 5% of the final one."""
    points = [(c["step"], c["fid"][space]) for c in curve]
    last, final = points[-1]
    start = fid_at(points, 0.75 * last)
    gain = (start - final) / start if start > 0 else 0.0
    near = next(x for x, y in points if y <= (1 + PLATEAU_GAIN) * final)
    return {"gain_last_quarter": gain, "flat": gain < PLATEAU_GAIN, "step_within_5pct_of_final": near}


def seed_ratio(measure: str, run: dict, base: dict, space: str, default_nfe: int) -> float | None:
    """One seed's ratio of ``run`` to ``base`` for ``measure`` (``None``: never reached)."""
    if measure in ("steps", "macs"):
        key = "step" if measure == "steps" else "train_macs"
        target = base["curve"][-1]["fid"][space]
        reach = interpolate_reach([(c[key], c["fid"][space]) for c in run["curve"]], target)
        return None if reach is None else reach / base["curve"][-1][key]
    if measure == "nfe":
        target = {s["nfe"]: s["fid"][space] for s in base["nfe_sweep"]}.get(default_nfe, base["final"]["fid"][space])
        reached = [s["nfe"] for s in run["nfe_sweep"] if s["fid"][space] <= target]
        return min(reached) / default_nfe if reached else None
    if measure == "deme_base":
        return run["final"]["fid"][space] / run["base_final"]["fid"][space]
    if measure == "deme_control":
        return run["final"]["fid"][space] / run["control"]["final"]["fid"][space]
    if measure == "final_fid":
        return run["final"]["fid"][space] / base["final"]["fid"][space]
    if measure == "sampling_macs":
        return run["sampling"]["macs"] / base["sampling"]["macs"]
    raise ValueError(f"`measure` must be steps|macs|nfe|deme_base|deme_control|final_fid|sampling_macs: {measure!r}")


def evaluate_target(target: tuple, results: dict, baselines: dict, default_nfe: int) -> dict:
    """A target's ratio per seed and space, mean +- std, met / not met per space, and the verdict (met or not met
    only where both spaces agree)."""
    tid, name, measure, threshold, claim = target
    row = {"id": tid, "config": name, "measure": measure, "threshold": threshold, "claim": claim}
    runs, base_runs = results.get(name, {}), results.get(baselines.get(name), {})
    seeds = [s for s in runs if s in base_runs or measure.startswith("deme")]
    if not seeds:
        return dict(row, verdict="not run")
    for space in SPACES:
        ratios = [seed_ratio(measure, runs[s], base_runs.get(s), space, default_nfe) for s in seeds]
        reached = [r for r in ratios if r is not None]
        strict = measure in ("deme_control", "final_fid")
        ok = len(reached) == len(ratios) and (
            np.mean(reached) < threshold if strict else np.mean(reached) <= threshold
        )
        row[space] = {
            "per_seed": dict(zip(map(str, seeds), ratios)),
            "mean": float(np.mean(reached)) if reached else None,
            "std": float(np.std(reached, ddof=1)) if len(reached) > 1 else 0.0 if reached else None,
            "reached": f"{len(reached)}/{len(ratios)}",
            "met": bool(ok),
        }
    met = {row[s]["met"] for s in SPACES}
    row["verdict"] = ("met" if met == {True} else "not met") if len(met) == 1 else "feature spaces disagree"
    return row


def nfe_ratios(runs: dict, base_runs: dict) -> dict:
    """Per feature space and NFE: the run's / its baseline's final-model FID, mean and std over the seeds both ran."""
    seeds = [s for s in runs if s in base_runs]
    out = {}
    for space in SPACES:
        per_nfe = {}
        for s in seeds:
            base = {p["nfe"]: p["fid"][space] for p in base_runs[s]["nfe_sweep"]}
            for p in runs[s]["nfe_sweep"]:
                per_nfe.setdefault(p["nfe"], []).append(p["fid"][space] / base[p["nfe"]])
        out[space] = {n: {"mean": float(np.mean(r)), "std": float(np.std(r, ddof=1)) if len(r) > 1 else 0.0}
                      for n, r in sorted(per_nfe.items())}  # fmt: skip
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.2f} +- {std:.2f}"


def config_rows(results: dict) -> list[dict]:
    """Per configuration: final FIDs (mean +- std over seeds) in both spaces, NFE, sampling and training MACs."""
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        any_run = next(iter(runs.values()))
        macs = any_run.get("train_macs_per_step")
        rows.append({
            "config": name,
            "seeds": len(runs),
            **{f"final_fid_{s}": mean_std([r["final"]["fid"][s] for r in runs.values()]) for s in SPACES},
            "nfe": any_run["sampling"]["nfe"],
            "sampling_macs": any_run["sampling"]["macs"],
            "train_macs_per_step": macs,
        })  # fmt: skip
    return rows


def write_report(results: dict, variants: list, settings: dict, results_dir: Path) -> dict:
    """``study.json``, ``study.md`` and the three plots into ``results_dir``; returns the report."""
    baselines = {v.name: v.baseline for v in variants}
    baselines.update({t[1]: baselines.get(t[1], "baseline") for t in TARGETS})
    report = {
        "settings": settings,
        "plateau": {
            name: {s: {str(k): plateau(r["curve"], s) for k, r in results[name].items()} for s in SPACES}
            for name in PLATEAU_CONFIGS
            if results.get(name)
        },
        "configs": config_rows(results),
        "targets": [evaluate_target(t, results, baselines, settings["default_nfe"]) for t in TARGETS],
        "nfe_ratios": {
            name: nfe_ratios(results[name], results[baselines[name]])
            for name in dict.fromkeys(t[1] for t in TARGETS if t[2] == "nfe")
            if results.get(name) and results.get(baselines[name])
        },
        "pending": {v.name: v.pending for v in variants if v.pending},
        "runs": {name: {str(k): r for k, r in runs.items()} for name, runs in results.items()},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    (results_dir / "study.md").write_text(markdown(report) + "\n")
    plot_curves(results, results_dir)
    return report


def _ratio_cell(cell: dict | None) -> str:
    if not cell or cell["mean"] is None:
        return "not reached" if cell else "-"
    return f"{cell['mean']:.2f} +- {cell['std']:.2f} ({cell['reached']}, {'met' if cell['met'] else 'not met'})"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Study: {s['steps']} steps, batch {s['batch_size']}, {s['resolution']}x{s['resolution']} MNIST, seeds "
        f"{s['seeds']}, final FID on {s['final_samples']} samples (curves {s['curve_samples']}) against "
        f"{s['num_real_images']} real images at {s['default_nfe']} NFE; device {s['device']}.",
        "",
        "Baseline plateau (FID gain over the last quarter of the curve, flat when < 5%; first checkpoint within 5% of the "
        "final FID):",
        "",
    ]
    for name, spaces in report["plateau"].items():
        cells = "; ".join(
            f"{space}: "
            + ", ".join(
                f"seed {k} {p['gain_last_quarter']:.1%} ({'flat' if p['flat'] else 'NOT flat'}, "
                f"step {p['step_within_5pct_of_final']})"
                for k, p in per.items()
            )
            for space, per in spaces.items()
        )  # fmt: skip
        lines.append(f"- `{name}`: {cells}")
    lines += [
        "",
        "| config | seeds | final FID (CNN) | final FID (MLP) | NFE | sampling MACs | training MACs / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["configs"]:
        train_macs = f"{r['train_macs_per_step']:.3g}" if r["train_macs_per_step"] else "-"
        lines.append(
            f"| {r['config']} | {r['seeds']} | {r['final_fid_cnn']} | {r['final_fid_mlp']} | {r['nfe']} | "
            f"{r['sampling_macs']:.3g} | {train_macs} |"
        )
    lines += ["", "| target | config | ratio (CNN) | ratio (MLP) | verdict |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['claim']} | {t['config']} | {_ratio_cell(t.get('cnn'))} | {_ratio_cell(t.get('mlp'))} | "
            f"{t['verdict']} |"
        )
    for name, spaces in report["nfe_ratios"].items():
        lines += ["", f"`{name}` / its baseline, final-model FID against NFE (mean +- std over seeds):", ""]
        lines += [f"| NFE | {' | '.join(spaces)} |", "|---" * (len(spaces) + 1) + "|"]
        for n in next(iter(spaces.values())):
            cells = " | ".join(f"{spaces[sp][n]['mean']:.2f} +- {spaces[sp][n]['std']:.2f}" for sp in spaces)
            lines.append(f"| {n} | {cells} |")
    if report["pending"]:
        lines += ["", "Not run (hooks waiting for library options):", ""]
        lines += [f"- `{name}`: {why}" for name, why in report["pending"].items()]
    return "\n".join(lines)


def plot_curves(results: dict, results_dir: Path) -> None:
    """``study_fid_vs_{steps,macs,nfe}.png``: mean over seeds with the min-max band, one panel per feature space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of = {
        "steps": ("curve", "step", "training steps"),
        "macs": ("curve", "train_macs", "training MACs"),
        "nfe": ("nfe_sweep", "nfe", "NFE (final model)"),
    }
    for name, (series, key, label) in axes_of.items():
        fig, axes = plt.subplots(1, len(SPACES), figsize=(5 * len(SPACES), 4))
        for ax, space in zip(axes, SPACES):
            for config, runs in results.items():
                curves = [[(p[key], p["fid"][space]) for p in r[series]] for r in runs.values() if r.get(series)]
                if not curves or len({len(c) for c in curves}) != 1:
                    continue
                xs = np.mean([[x for x, _ in c] for c in curves], axis=0)
                ys = np.array([[y for _, y in c] for c in curves])
                ax.plot(xs, ys.mean(0), marker="o", label=config)
                ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2)
            ax.set(xlabel=label, ylabel=f"FID ({space} features)", yscale="log", title=space)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results_dir / f"study_fid_vs_{name}.png", dpi=90)
        plt.close(fig)
