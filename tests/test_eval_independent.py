"""`eval/` is a library of its own: every module imports with `tfd` made unimportable."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: a meta-path finder that refuses `tfd` and `tfd.*` comes first, so
# any `import tfd...` (at import time of an eval module) raises ImportError; then every module of
# the `eval` package is imported. Prints the failures, one per line, and exits 1 if there are any.
PROBE = textwrap.dedent("""
    import importlib, pkgutil, sys, traceback

    class NoTfd:
        def find_spec(self, name, path=None, target=None):
            if name == "tfd" or name.startswith("tfd."):
                raise ImportError(f"eval must not import {name}")
            return None

    sys.meta_path.insert(0, NoTfd())
    for name in [m for m in sys.modules if m == "tfd" or m.startswith("tfd.")]:
        del sys.modules[name]
    import eval
    names = ["eval"] + sorted(m.name for m in pkgutil.walk_packages(eval.__path__, "eval."))
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
    print("imported:", " ".join(names))
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def _probe(extra_path: Path | None = None) -> subprocess.CompletedProcess:
    path = [str(extra_path)] if extra_path else []
    code = f"import sys; sys.path[:0] = {path + [str(ROOT)]!r}\n" + PROBE
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_every_eval_module_imports_without_tfd():
    r = _probe()
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("eval.io", "eval.metrics", "eval.sample", "eval.score", "eval.features", "eval.digits_net"):
        assert name in r.stdout.split()


def test_probe_catches_an_eval_module_that_imports_tfd(tmp_path):
    """The probe fails when an `eval` module imports `tfd`: a copy of the package with one extra
    module that does, first on the path."""
    import shutil

    shutil.copytree(ROOT / "eval", tmp_path / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "eval" / "uses_tfd.py").write_text("from tfd.utils import JsonlLogger  # noqa: F401\n")
    r = _probe(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "eval.uses_tfd: ImportError: eval must not import tfd" in r.stdout
