"""`llmprune compare`: runs side by side (dense first, then method x pattern) and PNG plots of them.

Reads the JSON reports written by ``llmprune prune --report`` and ``llmprune eval --report``.
matplotlib is imported only when plots are written (``pip install llmprune[eval]``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .errors import UsageError

METHOD_ORDER = {"dense": 0, "magnitude": 1, "wanda": 2, "sparsegpt": 3}
ERROR_KEYS = ("reconstruction_error", "recon_error", "error")  # per-layer error, where a report records one


def load_reports(paths) -> list[dict]:
    if not paths:
        raise UsageError("compare: give one or more report files, e.g. llmprune compare run1.json run2.json")
    reports = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"compare: {path} is not a file; give the JSON written by --report")
        try:
            report = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"compare: {path} is not JSON ({exc}); give the JSON written by --report") from None
        if not isinstance(report, dict) or not ("perplexity" in report or "zero_shot" in report):
            raise UsageError(f"compare: {path} is not an llmprune report (no 'perplexity' or 'zero_shot' section)")
        report["_path"] = str(path)
        reports.append(report)
    return reports


def _metrics(report: dict, which: str | None) -> dict:
    """Column -> value for one run; ``which`` is 'dense'/'pruned' in a prune report, None in an eval report."""
    out = {}
    for name, row in report.get("perplexity", {}).items():
        value = row.get(which) if which else row.get("perplexity")
        if value is not None:
            out[f"ppl {name}"] = value
    zs = report.get("zero_shot") or {}
    for name, task in zs.get("tasks", {}).items():
        r = task.get(which) if which else task
        if r:
            out[f"{name} acc"] = r.get("acc")
            if r.get("acc_norm") is not None:
                out[f"{name} acc_norm"] = r["acc_norm"]
    mean = (zs.get("mean") or {}).get(which or "")
    if mean:
        out["mean acc"] = mean.get("acc")
    return out


def runs_of(reports: list[dict]) -> list[dict]:
    """One entry per evaluated model: the dense one(s) and every pruned one."""
    runs = []
    for rep in reports:
        if "method" in rep:  # a prune report: dense and pruned
            dense = _metrics(rep, "dense")
            if dense:
                runs.append({"method": "dense", "pattern": "-", "sparsity": 0.0, "metrics": dense, "layers": [],
                             "model": rep["model"].get("spec")})
            structured = rep.get("structured")  # a structured run: its structures, and the fraction it removed
            pattern = ",".join(structured["settings"]["structures"]) if structured else rep["pattern"]
            sparsity = structured["removed_fraction"] if structured else rep.get("sparsity_overall")
            runs.append({"method": rep["method"], "pattern": pattern, "sparsity": sparsity,
                         "metrics": _metrics(rep, "pruned"), "layers": rep.get("layers", []),
                         "model": rep["model"].get("spec")})
        else:  # an eval report: one model as it is
            spec = rep.get("model", {}).get("spec", rep["_path"])
            runs.append({"method": f"eval {spec}", "pattern": "-", "sparsity": None, "metrics": _metrics(rep, None),
                         "layers": [], "model": spec})
    return runs


def table_rows(reports: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows (dense first, then method x pattern) and the metric columns, in order of first appearance."""
    runs = runs_of(reports)
    dense = [r for r in runs if r["method"] == "dense"]
    rows = []
    if dense:  # several reports of one model repeat the dense run: one row, all its metrics
        merged = dict(dense[0])
        merged["metrics"] = {}
        for d in dense:
            for k, v in d["metrics"].items():
                merged["metrics"].setdefault(k, v)
        rows.append(merged)
    rest = [r for r in runs if r["method"] != "dense"]
    rest.sort(key=lambda r: (METHOD_ORDER.get(r["method"], 9), r["method"], r["pattern"] != "unstructured",
                             r["pattern"], r["sparsity"] or 0.0))
    rows += rest
    columns = []
    for r in rows:
        for k in r["metrics"]:
            if k not in columns:
                columns.append(k)
    ppl = [c for c in columns if c.startswith("ppl ")]
    acc = [c for c in columns if not c.startswith("ppl ") and c != "mean acc"]
    return rows, ppl + acc + (["mean acc"] if "mean acc" in columns else [])


def fmt(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if column.startswith("ppl ") else f"{value:.3f}"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("compare: plots need matplotlib; pip install 'llmprune[eval]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def layer_axis(layers: list[dict]) -> tuple[list[str], list[tuple[int, str]]]:
    """Each layer's Linear type (the last part of its name), and the (position, label) of each decoder block's
    first layer: the x axis of the per-layer plots, read from names such as ``model.layers.7.mlp.up_proj``."""
    kinds, ticks, last = [], [], None
    for i, layer in enumerate(layers):
        name = layer["name"]
        kinds.append(name.rsplit(".", 1)[-1])
        found = re.search(r"\.(\d+)\.", name)
        block = found.group(1) if found else name
        if block != last:
            ticks.append((i, block))
            last = block
    return kinds, ticks


def _layer_plot(plt, runs: list[dict], key, ylabel: str, path: Path, log: bool = False) -> Path:
    """One panel per run (none hides another), one marker colour per Linear type, x ticks at decoder blocks.

    Sparsity is drawn on a fixed 0-1 axis with the run's overall sparsity dashed: a layer at 0.5000011 sits on
    the line, not on a spike of an auto-scaled axis."""
    keys = key if isinstance(key, list) else [key] * len(runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 2.0 * len(runs)), squeeze=False, layout="constrained")
    colours = {}
    for ax, r, k in zip(axes[:, 0], runs, keys):
        kinds, ticks = layer_axis(r["layers"])
        for kind in dict.fromkeys(kinds):
            colour = colours.setdefault(kind, f"C{len(colours) % 10}")
            xs = [i for i, t in enumerate(kinds) if t == kind]
            ax.plot(xs, [r["layers"][i][k] for i in xs], marker="o", markersize=3, linestyle="none", color=colour,
                    label=kind)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0.0, 1.0)
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            if r.get("sparsity") is not None:
                ax.axhline(r["sparsity"], color="0.4", linestyle="--", linewidth=0.8,
                           label=f"overall {r['sparsity']:.4f}")
        step = max(1, len(ticks) // 16)
        ax.set_xticks([t[0] for t in ticks[::step]], [t[1] for t in ticks[::step]], fontsize=8)
        ax.set_xlim(-1, len(r["layers"]))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"{r['method']} {r['pattern']}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=8, loc="lower right" if not log else "upper right")
    axes[-1, 0].set_xlabel("decoder block (Linear layers in model order)")
    path = _save(fig, path)
    plt.close(fig)
    return path


def write_plots(reports: list[dict], folder: Path) -> list[Path]:
    """perplexity_vs_sparsity.png, layer_sparsity.png and (where recorded) layer_error.png; returns the paths."""
    rows, columns = table_rows(reports)
    pruned = [r for r in rows if r["layers"]]
    ppl_cols = [c for c in columns if c.startswith("ppl ")]
    if not pruned and not ppl_cols:
        raise UsageError("compare: nothing to plot (no pruned run and no perplexity); pass --no-plots for the table only")
    plt = _pyplot()
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--plots {folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    dense = next((r for r in rows if r["method"] == "dense"), None)

    if ppl_cols and pruned:
        fig, axes = plt.subplots(1, len(ppl_cols), figsize=(5.5 * len(ppl_cols), 4), squeeze=False)
        for ax, col in zip(axes[0], ppl_cols):
            methods = dict.fromkeys(r["method"] for r in pruned)
            for method in methods:
                pts = sorted((r["sparsity"], r["metrics"][col], r["pattern"]) for r in pruned
                             if r["method"] == method and r["metrics"].get(col) is not None)
                line = [p for p in pts if p[2] == "unstructured"]  # N:M runs are single marked points
                if dense is not None and dense["metrics"].get(col) is not None:
                    line = [(0.0, dense["metrics"][col], "dense")] + line
                (handle,) = ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=method)
                for x, y, pattern in pts:
                    if pattern != "unstructured":
                        ax.plot([x], [y], marker="s", linestyle="none", color=handle.get_color())
                        ax.annotate(pattern, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("sparsity (zeros / pruned weights)")
            ax.set_ylabel(f"perplexity ({col[4:]})")
            ax.set_title(f"{col[4:]} perplexity vs sparsity (squares: N:M)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        written.append(_save(fig, folder / "perplexity_vs_sparsity.png"))
        plt.close(fig)

    if pruned:
        written.append(_layer_plot(plt, pruned, "sparsity", "sparsity (zeros / weights)", folder / "layer_sparsity.png"))
        with_error = []
        for r in pruned:
            key = next((k for k in ERROR_KEYS if all(layer.get(k) is not None for layer in r["layers"])), None)
            if key is not None:
                with_error.append((r, key))
        if with_error:
            written.append(_layer_plot(plt, [r for r, _ in with_error], [k for _, k in with_error],
                                       "reconstruction error", folder / "layer_error.png", log=True))
    return written
