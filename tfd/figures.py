"""Figures rendered from result files (the TFD paper's Figures 2-4 and sample grids).

Every figure is drawn only from what its input files hold, and written as both `<stem>.png`
(150 dpi) and `<stem>.pdf`, each atomically (`eval.io.atomic_write`: temp file in the same folder,
then `os.replace`).

    convergence  FID vs training iterations per run, first crossings of FID thresholds (Fig. 2)
    samples      a grid of generated samples: one row per class, first N of each class
    diversity    per class, one row per sample file, titled with the row's max pairwise SSIM (Fig. 3)
    ablation     FID vs training iterations per ablation variant, budgets marked (Fig. 4)
    prompts      text-to-image comparison: a row per prompt (caption below), a column per method (Fig. 1)
    modes        the `shapes` benchmark: per sample file, the sample mass of each sub-mode (by true-
                 frequency rank, pooled over classes) and off-mode, against the true frequencies

Command line: `tfd figure <kind> ...` (via `add_figure_parser`) or `python -m tfd.figures <kind> ...`.
matplotlib (Agg backend) and pandas are imported only when a figure is drawn, so building the
`tfd` parser stays cheap.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np

from eval.errors import UserError

DPI = 150
X_LABELS = {"step": "training iterations", "generator_updates": "generator updates",
            "train_wall_s": "training wall-clock (s)"}


# ---------------------------------------------------------------- helpers

def _plt():
    """pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _require(path) -> Path:
    """The path, or FileNotFoundError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def _stem(out_stem) -> Path:
    """`out_stem` without a trailing .png/.pdf (either is accepted)."""
    p = Path(out_stem)
    return p.with_suffix("") if p.suffix.lower() in (".png", ".pdf") else p


def save_figure(fig, out_stem) -> list[Path]:
    """Write `fig` as <stem>.png and <stem>.pdf atomically (`eval.io.atomic_write`), close it,
    return the two paths."""
    from eval.io import atomic_write

    plt = _plt()
    stem = _stem(out_stem)
    paths = []
    try:
        for fmt in ("png", "pdf"):
            meta = {"CreationDate": None} if fmt == "pdf" else None  # reproducible PDFs
            paths.append(atomic_write(stem.with_name(f"{stem.name}.{fmt}"), lambda f: fig.savefig(
                f, format=fmt, dpi=DPI, bbox_inches="tight", metadata=meta)))
    finally:
        plt.close(fig)
    return paths


def _read_csv(path):
    """A table csv of `tfd table` / `tfd ablation` as a DataFrame, read and checked by
    `tfd.tables.read_csv` (FileNotFoundError naming a missing file, BadFile a damaged one)."""
    from tfd.tables import read_csv
    return read_csv(path)


def fid_column(columns) -> str:
    """The first column named `fid*` that is not a sample count (`*_n`; `eval.metrics.fid_key`);
    ValueError if none."""
    from eval.metrics import fid_key

    col = fid_key(columns)
    if col is not None:
        return col
    raise UserError(f"no FID column (a name starting with 'fid', not ending with '_n') in {list(columns)}")


def _need_columns(df, cols, path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")


def first_crossing(steps, fids, threshold: float):
    """First step (in step order) whose FID is <= threshold; None if never (NaN never crosses)."""
    order = np.argsort(np.asarray(steps), kind="stable")
    for i in order:
        if fids[i] <= threshold:
            s = steps[i]
            return int(s) if float(s).is_integer() else float(s)
    return None


def load_samples(npz_path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int labels) from a sample npz, read and checked by
    `eval.sample.read_samples` (seeds not required); BadFile naming the file when it has no labels."""
    from eval.errors import BadFile
    from eval.sample import read_samples

    z = read_samples(_require(npz_path), need_seeds=False)
    if z["arr_1"] is None:
        raise BadFile(npz_path, "no condition ids", key="arr_1", expected="one label / prompt id per image")
    return z["arr_0"], z["arr_1"]


def class_indices(labels: np.ndarray, c: int, per_class: int, source="") -> np.ndarray:
    """Indices of the first `per_class` samples of class c in file order (ValueError if none)."""
    if per_class < 1:
        raise UserError(f"per_class must be >= 1, got {per_class}")
    idx = np.flatnonzero(labels == c)[:per_class]
    if len(idx) == 0:
        raise UserError(f"{source}: no samples of class {c}" if source else f"no samples of class {c}")
    return idx


def _montage(images: np.ndarray, grid: np.ndarray, pad: int = 1):
    """Tile images[grid] (grid [rows, cols], -1 = empty cell) with `pad` px gaps.

    Gaps and empty cells are masked (gray) / transparent (RGB) so they show the figure background."""
    _, h, w, ch = images.shape
    rows, cols = grid.shape
    H, W = rows * (h + pad) - pad, cols * (w + pad) - pad
    out = np.zeros((H, W, 4), np.float64)  # RGBA in [0, 1]; alpha 0 = gap
    for r in range(rows):
        for k in range(cols):
            if grid[r, k] < 0:
                continue
            img = images[grid[r, k]].astype(np.float64) / 255.0
            y, x = r * (h + pad), k * (w + pad)
            out[y:y + h, x:x + w, :3] = img if ch == 3 else img[..., :1]
            out[y:y + h, x:x + w, 3] = 1.0
    if ch == 3:
        return out
    return np.ma.masked_array(out[..., 0] * 255.0, mask=out[..., 3] == 0)


def _show(ax, images: np.ndarray, grid: np.ndarray) -> None:
    """Draw the montage of images[grid] on ax: exact pixels, fixed 0-255 range, gray for 1 channel."""
    plt = _plt()
    m = _montage(images, grid)
    if images.shape[-1] == 1:
        cmap = plt.get_cmap("gray").with_extremes(bad=(1, 1, 1, 0))
        ax.imshow(m, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(m, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


# ---------------------------------------------------------------- figures

def plot_convergence(conv_csv, out_stem, thresholds=(), x: str = "step", title: str | None = None) -> dict:
    """FID vs training progress for every run in `conv_csv` (the paper's Figure 2).

    Columns: run, optional label (legend; else run), step, generator_updates, train_wall_s, the
    FID column (see `fid_column`). Log y; a dashed line per threshold and, per run, a marker at the
    first step with FID <= threshold; runs with one label (a row's training replicas) share a colour
    and a legend entry. Returns {run: {threshold: first step or None}}."""
    df = _read_csv(conv_csv)
    if df.empty:
        raise UserError(f"{conv_csv}: no convergence records: no run of the table keeps one (set train.eval_every "
                        "> 0 on a run to record its FID while it trains)")
    fid = fid_column(df.columns)
    _need_columns(df, ["run", "step", x], conv_csv)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    crossings = {}
    colours: dict[str, str] = {}  # training replicas of one row (one label) share a colour and a legend entry
    for run, g in df.groupby("run", sort=False):
        g = g.sort_values("step", kind="stable")
        label = str(g["label"].dropna().iloc[0]) if "label" in g and g["label"].notna().any() else str(run)
        (line,) = ax.plot(g[x], g[fid], marker=".", ms=3, lw=1.2, color=colours.get(label),
                          label=label if label not in colours else None)
        colours.setdefault(label, line.get_color())
        steps, fids, xs = g["step"].to_numpy(), g[fid].to_numpy(float), g[x].to_numpy()
        crossings[str(run)] = {}
        for thr in thresholds:
            s = first_crossing(steps, fids, thr)
            crossings[str(run)][thr] = s
            if s is not None:
                i = int(np.flatnonzero(steps == s)[0])
                ax.plot([xs[i]], [fids[i]], marker="o", ms=7, mfc="none", mew=1.5, color=line.get_color())
    for thr in thresholds:
        ax.axhline(thr, ls="--", lw=0.9, color="0.4", label=f"{fid} = {thr:g}")
    ax.set_yscale("log")
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(fid)
    ax.set_title(title if title is not None else f"{fid} vs {X_LABELS.get(x, x)}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, out_stem)
    return crossings


def plot_sample_grid(npz_path, out_stem, title: str, classes=None, per_class: int = 10) -> np.ndarray:
    """Rows = classes (default: all present, sorted), columns = the first `per_class` samples of
    the class in file order. Returns the [rows, cols] sample indices shown (-1: class ran short)."""
    images, labels = load_samples(npz_path)
    classes = sorted(int(c) for c in np.unique(labels)) if classes is None else [int(c) for c in classes]
    grid = np.full((len(classes), per_class), -1, np.int64)
    short = []
    for r, c in enumerate(classes):
        idx = class_indices(labels, c, per_class, str(npz_path))
        grid[r, :len(idx)] = idx
        if len(idx) < per_class:
            short.append(f"class {c}: n={len(idx)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * per_class + 0.8), max(1.5, 0.45 * len(classes) + 0.8)))
    _show(ax, images, grid)
    h = images.shape[1]
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(len(classes))], [str(c) for c in classes])
    ax.tick_params(axis="y", length=0)
    ax.set_ylabel("class")
    ax.set_title(title + (f" ({', '.join(short)})" if short else ""), fontsize="medium")
    save_figure(fig, out_stem)
    return grid


def plot_diversity(npz_by_label: dict, out_stem, classes, per_class: int = 8) -> dict:
    """The paper's Figure 3: for each class, one row per sample file showing its first
    `per_class` samples of that class, titled with the max pairwise SSIM of exactly those samples
    (`eval.ssim.max_pairwise_ssim`). Returns {label: {class: max SSIM, None if < 2 samples}}."""
    from eval.ssim import max_pairwise_ssim
    loaded = {label: load_samples(p) for label, p in npz_by_label.items()}
    classes = [int(c) for c in classes]
    rows, out = [], {label: {} for label in loaded}
    for c in classes:
        for label, (images, labels) in loaded.items():
            idx = class_indices(labels, c, per_class, str(npz_by_label[label]))
            v = max_pairwise_ssim(images[idx], labels[idx])[1][c] if len(idx) >= 2 else None
            out[label][c] = v
            text = f"{label}, class {c}: max SSIM " + (f"{v:.2f}" if v is not None else "n/a")
            if len(idx) < per_class:
                text += f" (n={len(idx)})"
            rows.append((images, idx, text))
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(max(4.0, 0.5 * per_class + 0.6), 0.78 * len(rows) + 0.3))
    for ax, (images, idx, text) in zip(axes[:, 0], rows):
        grid = np.full((1, per_class), -1, np.int64)
        grid[0, :len(idx)] = idx
        _show(ax, images, grid)
        ax.set_title(text, fontsize="small", loc="left")
    fig.tight_layout()
    save_figure(fig, out_stem)
    return out


def plot_ablation(curves_csv, out_stem, title: str, budgets=()) -> dict:
    """The paper's Figure 4: FID vs training iterations per variant, one panel per `ablation`
    (columns: ablation, variant, run, step, FID column); dotted verticals at the budgets.
    Returns {ablation: [variants in legend order]}."""
    df = _read_csv(curves_csv)
    fid = fid_column(df.columns)
    _need_columns(df, ["ablation", "variant", "run", "step"], curves_csv)
    ablations = list(dict.fromkeys(df["ablation"]))
    if not ablations:
        raise UserError(f"{curves_csv}: no rows")
    plt = _plt()
    fig, axes = plt.subplots(1, len(ablations), squeeze=False, figsize=(5.2 * len(ablations), 3.8))
    shown = {}
    for ax, abl in zip(axes[0], ablations):
        d = df[df["ablation"] == abl]
        shown[str(abl)] = []
        for k, (variant, g) in enumerate(d.groupby("variant", sort=False)):
            for j, (_, r) in enumerate(g.groupby("run", sort=False)):
                r = r.sort_values("step", kind="stable")
                ax.plot(r["step"], r[fid], color=f"C{k}", lw=1.2, marker=".", ms=3,
                        label=str(variant) if j == 0 else None)
            shown[str(abl)].append(str(variant))
        for b in budgets:
            ax.axvline(b, ls=":", lw=1.0, color="0.3")
        ax.set_yscale("log")
        ax.set_xlabel("training iterations")
        ax.set_ylabel(fid)
        if len(ablations) > 1:
            ax.set_title(str(abl), fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_stem)
    return shown


def _prompt_table(prompts):
    """A `PromptTable` as is, or one read from a path with `eval.conditions.load_prompt_table`."""
    from eval.conditions import PromptTable, load_prompt_table
    return prompts if isinstance(prompts, PromptTable) else load_prompt_table(prompts)


def plot_prompt_grid(npz_by_label: dict, prompts, out_stem, rows=6, title: str | None = None,
                     wrap: int = 80) -> dict:
    """The paper's Figure 1 analogue: one row per prompt, one column per sample file (the dict's
    labels, in order, as column titles); each cell is the first sample of that file whose
    condition id (`arr_1`) is the row's prompt id, and the row's caption is written under it
    (wrapped at `wrap` characters).

    `prompts`: an `eval.conditions.PromptTable` or a path to one (`load_prompt_table`). `rows`: an
    int N = the first N prompts, in prompt-table order, that every file has a sample of (fewer if
    fewer exist), or a list of prompt ids shown in the given order. Images must share H x W
    (1 or 3 channels; grey is shown as RGB when another file is RGB). Returns
    {"prompt_ids": [...], "labels": [...], "files": [...]}.

    ValueError (naming the file) when a requested prompt id has no sample in a file, or when a
    file's H x W differs from the first file's; ValueError also for no files, rows < 1, a prompt
    id not in the table, or (rows an int) no prompt present in every file."""
    if not npz_by_label:
        raise UserError("no sample files given")
    table = _prompt_table(prompts)
    labels, files = [str(k) for k in npz_by_label], [str(v) for v in npz_by_label.values()]
    loaded = [load_samples(f) for f in files]
    h, w = loaded[0][0].shape[1:3]
    for f, (images, _) in zip(files, loaded):
        if images.shape[1:3] != (h, w):
            raise UserError(f"{f}: images are {images.shape[1]}x{images.shape[2]}, but {files[0]} has "
                             f"{h}x{w} (all files must share H x W)")
    if isinstance(rows, (int, np.integer)):
        if rows < 1:
            raise UserError(f"rows must be >= 1, got {rows}")
        present = set(table.ids).intersection(*(set(c.tolist()) for _, c in loaded))
        ids = [i for i in table.ids if i in present][:int(rows)]
        if not ids:
            raise UserError(f"no prompt of {table.source or 'the prompt table'} has a sample in every file "
                             f"({', '.join(files)})")
    else:
        ids = [int(i) for i in rows]
        if not ids:
            raise UserError("rows: empty list of prompt ids")
        unknown = [i for i in ids if i not in table.row_of]
        if unknown:
            raise UserError(f"prompt id(s) {unknown} not in the prompt table {table.source or '(in memory)'}")
    channels = 3 if any(im.shape[-1] == 3 for im, _ in loaded) else 1
    cells = np.zeros((len(ids), len(files), h, w, channels), np.uint8)
    for k, (f, (images, conds)) in enumerate(zip(files, loaded)):
        for r, i in enumerate(ids):
            hit = np.flatnonzero(conds == i)
            if len(hit) == 0:
                raise UserError(f"{f}: no sample of prompt id {i} ({table.captions([i])[0]!r})")
            cells[r, k] = images[hit[0]]  # broadcasts a grey image to RGB when needed
    captions = table.captions(ids)
    cols, cell_in = len(files), 1.8
    lines = [textwrap.wrap(c, wrap) or [""] for c in captions]
    plt = _plt()
    fig, axes = plt.subplots(len(ids), 1, squeeze=False, figsize=(
        max(3.0, cell_in * cols), sum(cell_in + 0.16 * len(x) + 0.15 for x in lines) + 0.4))
    flat = cells.reshape(-1, h, w, channels)
    for r, ax in enumerate(axes[:, 0]):
        _show(ax, flat, np.arange(r * cols, (r + 1) * cols)[None])
        ax.set_xlabel("\n".join(lines[r]), fontsize="small")
    top = axes[0, 0]
    top.set_xticks([k * (w + 1) + (w - 1) / 2 for k in range(cols)],
                   ["\n".join(textwrap.wrap(lab, 24)) or lab for lab in labels], fontsize="small")
    top.tick_params(axis="x", length=0, top=True, labeltop=True, bottom=False, labelbottom=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_stem)
    return {"prompt_ids": ids, "labels": labels, "files": files}


# ---------------------------------------------------------------- command line

def mode_mass_by_rank(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """The sample mass of the shapes benchmark's sub-modes by true-frequency rank, pooled over the
    classes: (float64 [12], mean over classes of the share of samples read (`eval.modes.read_modes`)
    as that class's rank-k sub-mode; the mean share off-mode). Comparable to the true Zipf profile,
    which every class shares by rank (`eval.modes.TRUE_FREQ`)."""
    from eval import modes as M
    hist = M.class_histogram(M.read_modes(images), labels).astype(np.float64)
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    order = np.argsort(-M.TRUE_FREQ, axis=1, kind="stable")          # [C, 12] sub-modes by rank
    by_rank = np.take_along_axis(share[:, :-1], order, axis=1).mean(0)
    return by_rank, float(share[:, -1].mean())


def plot_modes(npz_by_label: dict, out_stem, title: str | None = None) -> dict:
    """One panel per sample file (a table row): bars of its sample mass per sub-mode rank 1..12 and
    off-mode (`mode_mass_by_rank`), the true frequency as a line, the rare ranks shaded. Returns
    {label: {"by_rank": [12 floats], "off": float}}."""
    from eval import modes as M
    true = np.sort(M.TRUE_FREQ[0])[::-1]
    rare_from = int((true > M.RARE_MAX_FREQ).sum())                 # ranks rare_from+1.. are rare
    out = {}
    plt = _plt()
    n = len(npz_by_label)
    fig, axes = plt.subplots(n, 1, squeeze=False, sharex=True, figsize=(6.0, 1.5 * n + 0.6))
    x = np.arange(1, M.SUBMODES + 2)
    for ax, (label, path) in zip(axes[:, 0], npz_by_label.items()):
        by_rank, off = mode_mass_by_rank(*load_samples(path))
        out[label] = {"by_rank": [float(v) for v in by_rank], "off": off}
        ax.bar(x[:-1], by_rank, color="tab:blue", label="samples")
        ax.bar(x[-1], off, color="tab:red", label="off-mode")
        ax.plot(x[:-1], true, "k.-", lw=1, label="true")
        ax.axvspan(rare_from + 0.5, M.SUBMODES + 0.5, color="0.9", zorder=0)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize="small", loc="left")
    axes[-1, 0].set_xticks(x, [str(k) for k in x[:-1]] + ["off"])
    axes[-1, 0].set_xlabel("sub-mode, by true frequency rank (shaded: rare); mean over classes")
    axes[0, 0].legend(fontsize="x-small", ncol=3, loc="upper right")
    fig.suptitle(title or "Sample mass per sub-mode vs the true frequency", fontsize="medium")
    fig.tight_layout()
    save_figure(fig, out_stem)
    return out


def _cmd_convergence(args):
    res = plot_convergence(args.csv, args.out, thresholds=args.thresholds, x=args.x, title=args.title)
    print(f"convergence figure ({len(res)} runs) -> {_stem(args.out)}.png/.pdf")


def _cmd_samples(args):
    grid = plot_sample_grid(args.samples, args.out, args.title, classes=args.classes, per_class=args.per_class)
    print(f"sample grid ({grid.shape[0]} classes x {grid.shape[1]}) -> {_stem(args.out)}.png/.pdf")


def parse_label_path(item: str) -> tuple[str, str]:
    """'LABEL=PATH' -> (LABEL, PATH), split at the last '=' (labels may hold '=', e.g. 'λ=0')."""
    label, sep, path = item.rpartition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=NPZ, got {item!r}")
    return label, path


def _cmd_diversity(args):
    res = plot_diversity(dict(args.samples), args.out, args.classes, per_class=args.per_class)
    for label, per in res.items():
        print(f"{label}: " + ", ".join(f"class {c} {'n/a' if v is None else f'{v:.3f}'}" for c, v in per.items()))
    print(f"diversity figure -> {_stem(args.out)}.png/.pdf")


def _cmd_ablation(args):
    res = plot_ablation(args.csv, args.out, args.title, budgets=args.budgets)
    print(f"ablation figure ({', '.join(res)}) -> {_stem(args.out)}.png/.pdf")


def _cmd_prompts(args):
    rows = args.prompt_ids if args.prompt_ids else args.rows
    res = plot_prompt_grid(dict(args.samples), args.prompts, args.out, rows=rows, title=args.title)
    print(f"prompt grid ({len(res['prompt_ids'])} prompts x {len(res['labels'])} methods; prompt ids "
          f"{res['prompt_ids']}) -> {_stem(args.out)}.png/.pdf")


def _cmd_modes(args):
    res = plot_modes(dict(args.samples), args.out, title=args.title)
    for label, r in res.items():
        print(f"{label}: off-mode {r['off']:.3f}, by rank " + " ".join(f"{v:.3f}" for v in r["by_rank"]))
    print(f"modes figure -> {_stem(args.out)}.png/.pdf")


def add_figure_commands(sub) -> None:
    """Add the `convergence`, `samples`, `diversity`, `ablation`, `prompts`, `modes` subcommands to `sub`."""
    out_help = "output stem: writes STEM.png and STEM.pdf"
    s = sub.add_parser("convergence", help="FID vs training iterations per run (paper Fig. 2)")
    s.add_argument("--csv", required=True, help="convergence csv (tfd table --convergence)")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--thresholds", type=float, nargs="*", default=[], help="FID thresholds to mark")
    s.add_argument("--x", default="step", choices=sorted(X_LABELS), help="x axis column (default: step)")
    s.add_argument("--title", default=None)
    s.set_defaults(fn=_cmd_convergence)
    s = sub.add_parser("samples", help="grid of samples: a row per class")
    s.add_argument("--samples", required=True, help="sample npz (arr_0 uint8 NHWC, arr_1 labels)")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--title", required=True)
    s.add_argument("--classes", type=int, nargs="*", default=None, help="default: all classes present")
    s.add_argument("--per-class", type=int, default=10)
    s.set_defaults(fn=_cmd_samples)
    s = sub.add_parser("diversity", help="per class, a row per sample file with its max SSIM (paper Fig. 3)")
    s.add_argument("--samples", type=parse_label_path, nargs="+", required=True, metavar="LABEL=NPZ",
                   help="one or more LABEL=NPZ (split at the last '=')")
    s.add_argument("--classes", type=int, nargs="+", required=True)
    s.add_argument("--per-class", type=int, default=8)
    s.add_argument("--out", required=True, help=out_help)
    s.set_defaults(fn=_cmd_diversity)
    s = sub.add_parser("ablation", help="FID vs training iterations per ablation variant (paper Fig. 4)")
    s.add_argument("--csv", required=True, help="long csv: ablation, variant, run, step, fid*")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--title", required=True)
    s.add_argument("--budgets", type=float, nargs="*", default=[], help="iteration budgets to mark")
    s.set_defaults(fn=_cmd_ablation)
    s = sub.add_parser("prompts", help="text-to-image comparison: a row per prompt, a column per method (paper Fig. 1)",
                       description="Text-to-image comparison grid (the TFD paper's Figure 1): one row per prompt with "
                                   "its caption underneath, one column per sample file.")
    s.add_argument("--samples", type=parse_label_path, nargs="+", required=True, metavar="LABEL=NPZ",
                   help="one or more LABEL=NPZ (split at the last '='), one column each, in order")
    s.add_argument("--prompts", required=True, help="prompt table (.jsonl/.csv/.txt/.pkl) giving the captions")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--rows", type=int, default=6,
                   help="the first N prompts (table order) that every file has a sample of (default: 6)")
    g.add_argument("--prompt-ids", type=int, nargs="+", default=None, help="explicit prompt ids, one row each")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--title", default=None)
    s.set_defaults(fn=_cmd_prompts)
    s = sub.add_parser("modes", help="shapes benchmark: sample mass per sub-mode vs the true frequency, "
                                     "a panel per row")
    s.add_argument("--samples", type=parse_label_path, nargs="+", required=True, metavar="LABEL=NPZ",
                   help="one or more LABEL=NPZ (split at the last '='), one panel each, in order")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--title", default=None)
    s.set_defaults(fn=_cmd_modes)


def add_figure_parser(sub) -> argparse.ArgumentParser:
    """Add the `figure` subcommand (with its own subcommands) to an `add_subparsers()` object."""
    p = sub.add_parser("figure", help="render a figure (PNG + PDF) from result files",
                       description="render a figure (PNG + PDF) from result files")
    add_figure_commands(p.add_subparsers(dest="figure", required=True))
    return p


def main(argv=None) -> None:
    """`python -m tfd.figures <convergence|samples|diversity|ablation|prompts|modes> ...` (a leading `figure`
    is allowed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["figure"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m tfd.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_figure_commands(p.add_subparsers(dest="figure", required=True))
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"tfd figure {args.figure}: error: {e}")


if __name__ == "__main__":
    main()
