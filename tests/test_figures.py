"""tfd.figures: files written (PNG + PDF), threshold crossings, SSIM titles, grid indices, CLI."""
import argparse

import numpy as np
import pandas as pd
import pytest

from tfd import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_figure(stem):
    png, pdf = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert pdf.read_bytes()[:4] == b"%PDF"
    leftovers = [p.name for p in stem.parent.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers


def make_npz(path, n=60, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, channels), dtype=np.uint8)
    labels = np.arange(n) % 10
    np.savez(path, arr_0=images, arr_1=labels, seeds=np.arange(n))
    return images, labels


@pytest.fixture
def conv_csv(tmp_path):
    rows = []
    curves = {"a": [300, 120, 30, 19, 9, 7.5], "b": [300, 200, 150, 80, 25, 21]}
    for run, fids in curves.items():
        for k, f in enumerate(fids):
            rows.append({"run": run, "label": f"method {run}", "step": 100 * k, "generator_updates": 20 * k,
                         "train_wall_s": 1.5 * k, "fid_digits": f, "fid_digits_n": 500})
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter
    path = tmp_path / "conv.csv"
    df.to_csv(path, index=False)
    return path, curves


def expected_crossing(fids, thr):
    for k, f in enumerate(fids):
        if f <= thr:
            return 100 * k
    return None


def test_convergence_crossings_and_files(tmp_path, conv_csv):
    path, curves = conv_csv
    stem = tmp_path / "figs" / "sub" / "convergence"
    res = figures.plot_convergence(path, stem, thresholds=(20, 8, 1))
    assert_figure(stem)
    assert res == {run: {thr: expected_crossing(f, thr) for thr in (20, 8, 1)} for run, f in curves.items()}
    assert res["a"][20] == 300 and res["a"][8] == 500 and res["b"][8] is None  # sanity of the fixture
    figures.plot_convergence(path, tmp_path / "wall", thresholds=(20,), x="train_wall_s", title="t")
    assert_figure(tmp_path / "wall")


def test_convergence_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        figures.plot_convergence(tmp_path / "nope.csv", tmp_path / "x")
    p = tmp_path / "nofid.csv"
    pd.DataFrame({"run": ["a"], "step": [0], "fid_digits_n": [500]}).to_csv(p, index=False)
    with pytest.raises(ValueError, match="FID column"):
        figures.plot_convergence(p, tmp_path / "x")


def test_fid_column_rule():
    assert figures.fid_column(["run", "fid_n", "fid_digits_n", "fid_digits", "fid"]) == "fid_digits"
    assert figures.fid_column(["run", "fid"]) == "fid"


def test_sample_grid_indices(tmp_path):
    make_npz(tmp_path / "s.npz", n=60)
    stem = tmp_path / "grid"
    grid = figures.plot_sample_grid(tmp_path / "s.npz", stem, "samples", per_class=4)
    assert grid.shape == (10, 4)
    assert np.array_equal(grid, np.array([[c + 10 * k for k in range(4)] for c in range(10)]))
    assert_figure(stem)
    # chosen classes in the given order; a class that runs short is padded with -1
    grid = figures.plot_sample_grid(tmp_path / "s.npz", tmp_path / "g2", "t", classes=[7, 2], per_class=8)
    assert np.array_equal(grid, [[7, 17, 27, 37, 47, 57, -1, -1], [2, 12, 22, 32, 42, 52, -1, -1]])
    with pytest.raises(ValueError, match="class 11"):
        figures.plot_sample_grid(tmp_path / "s.npz", tmp_path / "g3", "t", classes=[11])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        figures.plot_sample_grid(tmp_path / "missing.npz", tmp_path / "g3", "t")


def test_sample_grid_rgb(tmp_path):
    make_npz(tmp_path / "rgb.npz", n=20, channels=3)
    grid = figures.plot_sample_grid(tmp_path / "rgb.npz", tmp_path / "rgb", "rgb", classes=[0, 1], per_class=2)
    assert np.array_equal(grid, [[0, 10], [1, 11]])
    assert_figure(tmp_path / "rgb")


def skimage_max_ssim(images):
    from skimage.metrics import structural_similarity

    from eval.ssim import ssim_settings
    st = ssim_settings(8, 8)
    best = -np.inf
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            v = structural_similarity(images[i, ..., 0].astype(np.float64), images[j, ..., 0].astype(np.float64),
                                      gaussian_weights=True, sigma=st["win_sigma"], win_size=st["win_size"],
                                      use_sample_covariance=False, data_range=255)
            best = max(best, v)
    return best


def test_diversity_ssim_matches_skimage(tmp_path):
    pytest.importorskip("skimage")
    imgs0, labels0 = make_npz(tmp_path / "l0.npz", n=60, seed=1)
    imgs1, labels1 = make_npz(tmp_path / "l1.npz", n=60, seed=2)
    # make samples 0 and 3 of class 5 identical in the second file -> max SSIM exactly 1
    idx5 = np.flatnonzero(labels1 == 5)
    imgs1[idx5[3]] = imgs1[idx5[0]]
    np.savez(tmp_path / "l1.npz", arr_0=imgs1, arr_1=labels1, seeds=np.arange(60))
    by_label = {"without anchor-margin (λ=0)": tmp_path / "l0.npz", "with anchor-margin (λ=1)": tmp_path / "l1.npz"}
    stem = tmp_path / "div"
    res = figures.plot_diversity(by_label, stem, classes=[0, 5], per_class=4)
    assert_figure(stem)
    for label, (imgs, labels) in zip(by_label, [(imgs0, labels0), (imgs1, labels1)]):
        for c in (0, 5):
            shown = imgs[np.flatnonzero(labels == c)[:4]]
            assert res[label][c] == pytest.approx(skimage_max_ssim(shown), abs=1e-9)
    assert res["with anchor-margin (λ=1)"][5] == pytest.approx(1.0, abs=1e-12)
    assert res["without anchor-margin (λ=0)"][5] < 0.9
    # only the shown samples count: with per_class=3 the duplicate (4th sample) is not shown
    res3 = figures.plot_diversity({"x": tmp_path / "l1.npz"}, tmp_path / "div3", classes=[5], per_class=3)
    assert res3["x"][5] < 0.9
    with pytest.raises(ValueError, match="class 12"):
        figures.plot_diversity({"x": tmp_path / "l1.npz"}, tmp_path / "d", classes=[12])


def test_ablation(tmp_path):
    rows = []
    for abl, variants in {"kernel": ["laplace", "gaussian"], "anchor": ["λ=0", "λ=1"]}.items():
        for v, scale in zip(variants, (1.0, 2.0)):
            for seed in (0, 1):
                for k in range(5):
                    rows.append({"ablation": abl, "variant": v, "run": f"{abl}_{v}_{seed}", "step": 100 * k,
                                 "fid": scale * 200 / (k + 1) + seed})
    p = tmp_path / "abl.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    res = figures.plot_ablation(p, tmp_path / "abl", "ablations", budgets=(200, 300))
    assert res == {"kernel": ["laplace", "gaussian"], "anchor": ["λ=0", "λ=1"]}
    assert_figure(tmp_path / "abl")


def test_cli_parser(tmp_path, conv_csv, capsys):
    path, _ = conv_csv
    parser = argparse.ArgumentParser(prog="tfd")
    sub = parser.add_subparsers(dest="cmd", required=True)
    figures.add_figure_parser(sub)
    args = parser.parse_args(["figure", "convergence", "--csv", str(path), "--out", str(tmp_path / "c"),
                              "--thresholds", "20", "8"])
    assert args.thresholds == [20.0, 8.0]
    args.fn(args)
    assert_figure(tmp_path / "c")
    make_npz(tmp_path / "s.npz", n=30)
    args = parser.parse_args(["figure", "diversity", "--samples", f"a (λ=0)={tmp_path / 's.npz'}",
                              f"b={tmp_path / 's.npz'}", "--classes", "0", "3", "--per-class", "3",
                              "--out", str(tmp_path / "d")])
    assert args.samples[0] == ("a (λ=0)", str(tmp_path / "s.npz"))
    args.fn(args)
    assert_figure(tmp_path / "d")
    args = parser.parse_args(["figure", "samples", "--samples", str(tmp_path / "s.npz"), "--out",
                              str(tmp_path / "g.png"), "--title", "T", "--classes", "1", "2", "--per-class", "2"])
    args.fn(args)
    assert_figure(tmp_path / "g")  # a .png suffix on --out is taken as the stem
    with pytest.raises(SystemExit):
        parser.parse_args(["figure", "diversity", "--samples", "nolabel", "--classes", "0", "--out", "x"])
    # python -m tfd.figures entry point, and its error message for a missing file
    with pytest.raises(SystemExit, match="missing.csv"):
        figures.main(["ablation", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "a"), "--title", "T"])
    figures.main(["figure", "convergence", "--csv", str(path), "--out", str(tmp_path / "m")])
    assert_figure(tmp_path / "m")


def make_prompt_npz(path, table, n=9, seed=0, size=8, channels=3, skip=()):
    """Samples with prompt ids `table.for_samples(i)` (the suite's rule), leaving out ids in `skip`."""
    from eval.sample import save_npz
    rng = np.random.default_rng(seed)
    conds = table.for_samples(np.arange(n))
    keep = ~np.isin(conds, list(skip))
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)[keep]
    save_npz(path, {"arr_0": images, "arr_1": conds[keep], "seeds": np.arange(n, dtype=np.int64)[keep],
                    "conditions_sha256": np.array(table.sha256)})
    return path


@pytest.fixture
def prompt_table():
    from eval.conditions import PromptTable
    return PromptTable(ids=(5, 7, 9), texts=("a one", "a two " + "with a long caption " * 8, "a three"))


def test_prompt_grid(tmp_path, prompt_table):
    files = {"SDXL teacher (25 steps)": make_prompt_npz(tmp_path / "t.npz", prompt_table, seed=1),
             "DMD2": make_prompt_npz(tmp_path / "d.npz", prompt_table, seed=2, channels=1),  # grey with RGB
             "TFD (ours, λ=1)": make_prompt_npz(tmp_path / "f.npz", prompt_table, seed=3, skip=(7,))}
    stem = tmp_path / "fig1"
    res = figures.plot_prompt_grid(files, prompt_table, stem, rows=6, title="text-to-image")
    assert_figure(stem)
    # first prompts (table order) present in every file: 7 is missing from the TFD file
    assert res == {"prompt_ids": [5, 9], "labels": list(files), "files": [str(p) for p in files.values()]}
    res = figures.plot_prompt_grid(files, prompt_table, tmp_path / "one", rows=1)
    assert res["prompt_ids"] == [5]
    # explicit ids, in the given order; the prompt table may come from a file
    prompt_table.save_jsonl(tmp_path / "prompts.jsonl")
    two = {k: files[k] for k in list(files)[:2]}
    res = figures.plot_prompt_grid(two, tmp_path / "prompts.jsonl", tmp_path / "ids", rows=[9, 7, 5])
    assert res["prompt_ids"] == [9, 7, 5]
    assert_figure(tmp_path / "ids")


def test_prompt_grid_errors(tmp_path, prompt_table):
    ok = make_prompt_npz(tmp_path / "ok.npz", prompt_table)
    short = make_prompt_npz(tmp_path / "short.npz", prompt_table, skip=(7,))
    big = make_prompt_npz(tmp_path / "big.npz", prompt_table, size=16)
    with pytest.raises(ValueError, match=r"short\.npz: no sample of prompt id 7"):
        figures.plot_prompt_grid({"a": ok, "b": short}, prompt_table, tmp_path / "x", rows=[5, 7])
    with pytest.raises(ValueError, match=r"big\.npz: images are 16x16"):
        figures.plot_prompt_grid({"a": ok, "b": big}, prompt_table, tmp_path / "x")
    with pytest.raises(ValueError, match="not in the prompt table"):
        figures.plot_prompt_grid({"a": ok}, prompt_table, tmp_path / "x", rows=[4])
    with pytest.raises(ValueError, match="rows must be >= 1"):
        figures.plot_prompt_grid({"a": ok}, prompt_table, tmp_path / "x", rows=0)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        figures.plot_prompt_grid({"a": tmp_path / "missing.npz"}, prompt_table, tmp_path / "x")
    assert not list(tmp_path.glob("x.*"))


def test_prompt_grid_cli(tmp_path, prompt_table, capsys):
    from tfd import cli
    prompt_table.save_jsonl(tmp_path / "prompts.jsonl")
    a = make_prompt_npz(tmp_path / "a.npz", prompt_table, seed=1)
    b = make_prompt_npz(tmp_path / "b.npz", prompt_table, seed=2)
    cli.main(["figure", "prompts", "--samples", f"SDXL teacher={a}", f"TFD (λ=1)={b}",
              "--prompts", str(tmp_path / "prompts.jsonl"), "--rows", "2", "--out", str(tmp_path / "p"),
              "--title", "T"])
    assert_figure(tmp_path / "p")
    assert "2 prompts x 2 methods; prompt ids [5, 7]" in capsys.readouterr().out
    figures.main(["prompts", "--samples", f"a={a}", "--prompts", str(tmp_path / "prompts.jsonl"),
                  "--prompt-ids", "9", "5", "--out", str(tmp_path / "q")])
    assert "prompt ids [9, 5]" in capsys.readouterr().out
    assert_figure(tmp_path / "q")
    with pytest.raises(SystemExit, match="nope.jsonl"):
        figures.main(["prompts", "--samples", f"a={a}", "--prompts", str(tmp_path / "nope.jsonl"),
                      "--out", str(tmp_path / "r")])
