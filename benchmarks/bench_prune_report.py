"""Render bench_prune.py's measurements: its RESULTS.md section and the accuracy plot.

Everything written is computed from the raw JSON (benchmarks/cache/bench_prune.json);
the section lives between ``<!-- prune:start -->`` and ``<!-- prune:end -->`` so other
benchmarks can keep their own sections in the same file.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from results_md import replace_section

START, END = "<!-- prune:start -->", "<!-- prune:end -->"
COMMAND = "python benchmarks/bench_prune.py"
CORRECTIONS = ["none", "reset", "repair", "rescale"]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _acc(rows: list[dict], method: str, sparsity: float, correction: str) -> float | None:
    for r in rows:
        if r["method"] == method and r["sparsity"] == sparsity and r["correction"] == correction:
            return r["acc"]
    return None


def _grid_tables(raw: dict) -> list[str]:
    lines = []
    for name, rows in raw["grid"].items():
        info = raw["models"][name]
        lines += [f"#### {name}: dense {_pct(info['dense']['acc'])}% ({info['eval_size']} test samples)", "",
                  "| method | sparsity | achieved | none | reset | repair | rescale |",
                  "|---|---|---|---|---|---|---|"]
        keys = sorted({(r["method"], r["sparsity"]) for r in rows}, key=lambda k: ([r["method"] for r in rows].index(k[0]), k[1]))
        for method, sparsity in keys:
            achieved = next(r["achieved"] for r in rows if r["method"] == method and r["sparsity"] == sparsity)
            cells = [_pct(_acc(rows, method, sparsity, c)) for c in CORRECTIONS]
            lines.append(f"| {method} | {sparsity} | {100 * achieved:.2f}% | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _findings(raw: dict, sparsity: float = 0.9) -> list[str]:
    """At ``sparsity``: how much of the accuracy lost by magnitude pruning the best correction recovers."""
    held, failed = [], []
    for name, rows in raw["grid"].items():
        dense = raw["models"][name]["dense"]["acc"]
        for method in ("global-magnitude", "layer-magnitude"):
            none = _acc(rows, method, sparsity, "none")
            best = max(((c, _acc(rows, method, sparsity, c)) for c in CORRECTIONS[1:]), key=lambda t: t[1] or -1)
            if none is None or best[1] is None:
                continue
            lost = dense - none
            share = (best[1] - none) / lost if lost > 0 else float("nan")
            text = (f"{name}, {method}: {_pct(none)}% -> {_pct(best[1])}% with {best[0]} "
                    f"(dense {_pct(dense)}%; recovers {100 * share:.0f}% of the loss)")
            (held if share >= 0.5 else failed).append(text)
    lines = [f"At {int(sparsity * 100)}% sparsity, the best correction recovers at least half of the accuracy "
             "lost by magnitude pruning in these cases:", ""] + [f"- {t}" for t in held]
    lines += ["", "It does NOT (less than half recovered) in these cases:", ""] + [f"- {t}" for t in failed or ["none"]]
    same = [n for n, rows in raw["grid"].items()
            if all(_acc(rows, r["method"], r["sparsity"], "repair") == _acc(rows, r["method"], r["sparsity"], "rescale")
                   for r in rows)]
    if same:
        lines += ["", f"On {', '.join(same)} the repair and rescale columns are identical: the corrected convs have no "
                  "bias and no BatchNorm after them (their norm is a GroupNorm, which the engine does not use as a "
                  "site), so the shift cannot be folded and repair applies the scale only."]
    return lines + [""]


def _sweep_table(raw: dict) -> list[str]:
    sizes = sorted({r["calib_size"] for rows in raw["sweep"].values() for r in rows})
    lines = ["| model | " + " | ".join(f"{s} samples" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name, rows in raw["sweep"].items():
        cells = []
        for s in sizes:
            accs = [r["acc"] for r in rows if r["calib_size"] == s]
            cells.append(f"{_pct(statistics.mean(accs))} ({_pct(min(accs))}–{_pct(max(accs))})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _speed_tables(raw: dict) -> list[str]:
    speed = raw.get("speed")
    if not speed:
        return []
    lines = ["Global magnitude at 90%, median of "
             f"{next(iter(speed['magnitude'].values()))['reps']} interleaved runs on copies of the same model:", "",
             "| model | ours (zeros) | ours (torch masks) | torch global_unstructured | torch / ours | same zero count |",
             "|---|---|---|---|---|---|"]
    for name, m in speed["magnitude"].items():
        med = m["median_s"]
        lines.append(f"| {name} | {1e3 * med['ours']:.1f} ms | {1e3 * med['ours_torch_style']:.1f} ms | "
                     f"{1e3 * med['torch']:.1f} ms | {m['ratio_torch_over_ours']:.2f}x "
                     f"({m['ratio_torch_over_ours_torch_style']:.2f}x vs torch masks) | {m['same_zero_count']} |")
    lines += ["", "Reset (our `repair_(repair='reset')`) vs `torch.optim.swa_utils.update_bn`, same calibration batch, "
              "on the 90%-pruned model (median seconds, accuracy after each):", "",
              "| model | batch | reset | update_bn | update_bn / reset | acc pruned | acc reset | acc update_bn |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in speed["reset"].items():
        med = r["median_s"]
        lines.append(f"| {name} | {r['calib_size']} | {1e3 * med['reset']:.1f} ms | {1e3 * med['update_bn']:.1f} ms | "
                     f"{r['ratio_update_bn_over_reset']:.2f}x | {_pct(r['acc_pruned'])}% | {_pct(r['acc']['reset'])}% | "
                     f"{_pct(r['acc']['update_bn'])}% |")
    lines += ["", "(reset needs reference statistics for its site list; collecting them took "
              + ", ".join(f"{1e3 * r['reference_stats_s']:.1f} ms on {n}" for n, r in speed["reset"].items())
              + ", not included above.)", ""]
    return lines


def _woodfisher_table(raw: dict) -> list[str]:
    records = raw.get("woodfisher")
    if not records:
        return []
    lines = ["| block size | weights | gradients | seconds | inverse-Fisher blocks | peak RSS while scoring (at start) | "
             "load average (1 min) at the end |", "|---|---|---|---|---|---|---|"]
    for r in records:
        load = r.get("loadavg_1min")
        lines.append(f"| {r['block_size']} | {r['weights']} | {r['num_grads']} | {r['seconds']:.1f} | "
                     f"{r['blocks_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB ({r.get('rss_at_start_mib', float('nan')):.0f} MiB) | {'–' if load is None else f'{load:.1f}'} |")
    return lines + [""]


def render(raw: dict, plot_name: str) -> str:
    s = raw.get("settings", {})
    lines = [START, "## Pruning: one-shot pruners, then repair", "",
             f"Reproduce: `{COMMAND}` (raw numbers: `benchmarks/cache/bench_prune.json`; "
             f"torch {s.get('torch', '?')}, {s.get('threads', '?')} threads, on a machine shared with other jobs).", "",
             f"Calibration: {s.get('calib_size')} samples of mnist:train (seed {s.get('seed')}), the same batch for the "
             f"reference statistics and the repair. Fisher and WoodFisher: {s.get('fisher_samples')} per-sample "
             "gradients (fisher mini-batch 1) from other mnist:train samples; WoodFisher block size 128, damping 1e-5, "
             "no OBS update. All conv and linear weights are prunable (classifier and first layer included). "
             "Accuracy in % on mnist:test (" + ", ".join(
                 f"{n} on its first {m['eval_size']} samples" for n, m in raw["models"].items() if m["eval_size"] < 10000
             ) + ", to keep the run affordable).", "",
             "Models:", ""]
    lines += [f"- {n}: {m['about']}; dense accuracy {_pct(m['dense']['acc'])}%" for n, m in raw["models"].items()]
    lines += ["", f"![accuracy after pruning]({plot_name})", "", "### Findings (computed from the tables below)", ""]
    lines += _findings(raw)
    lines += ["### Accuracy by method, sparsity and correction", ""] + _grid_tables(raw)
    lines += ["### Calibration size (repair `auto` after global magnitude at 90%)", "",
              "Mean accuracy over calibration seeds 0, 1, 2 (min–max):", ""] + _sweep_table(raw)
    lines += ["### Speed", ""] + _speed_tables(raw)
    lines += ["### WoodFisher cost on the ResNet-20 (0.27M prunable weights)", "",
              "Scoring with 400 per-sample gradients, rank-32 Woodbury updates, float32, in a fresh process:", ""]
    lines += _woodfisher_table(raw) + [END]
    return "\n".join(lines) + "\n"


def plot(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(raw["grid"])
    methods = list(dict.fromkeys(r["method"] for rows in raw["grid"].values() for r in rows))
    fig, axes = plt.subplots(len(names), len(methods), figsize=(3.2 * len(methods), 2.4 * len(names)),
                             sharex=True, sharey=True, squeeze=False)
    styles = {"none": ("k", "-"), "reset": ("tab:green", "--"), "repair": ("tab:blue", "-"), "rescale": ("tab:orange", ":")}
    for i, name in enumerate(names):
        rows = raw["grid"][name]
        for j, method in enumerate(methods):
            ax = axes[i][j]
            for corr, (color, ls) in styles.items():
                pts = sorted((r["sparsity"], r["acc"]) for r in rows if r["method"] == method and r["correction"] == corr)
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=color, ls=ls, marker="o", ms=3, label=corr)
            ax.axhline(100 * raw["models"][name]["dense"]["acc"], color="grey", lw=0.6)
            ax.set_title(f"{name}\n{method}", fontsize=8)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test acc %")
            if i == len(names) - 1:
                ax.set_xlabel("sparsity")
    handles = [plt.Line2D([], [], color=c, ls=ls, marker="o", ms=3, label=k) for k, (c, ls) in styles.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(raw: dict, results: Path, png: Path) -> None:
    """Replace (or append) the prune section of ``results`` and write the plot."""
    plot(raw, png)
    section = render(raw, png.name)
    replace_section(results, section)
    print(f"wrote {results} and {png}")
