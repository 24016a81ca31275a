"""No folder of the repo stands in for a dependency. `python -m pytest` and `python -c` put the repo root first on
sys.path, `python bench/x.py` puts bench/, and pytest puts tests/: a module or regular package there would shadow an
installed distribution of the same name (transformers >= 5.25 imports the Hugging Face `kernels` package, which the
repo's kernels/ folder once hid). model/ and kernels/ hold no __init__.py; specdec/model and specdec/kernels link to
them, so they import only as specdec.model and specdec.kernels."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ON_PATH = [ROOT, ROOT / "bench", ROOT / "tests", ROOT / "examples"]  # what each way of running from the root puts first


def _offered(folder: Path) -> set[str]:
    """Top-level names `folder` serves when it is on sys.path ahead of site-packages: modules and regular packages
    (a folder without __init__.py is a namespace portion, which any installed module or package of its name beats)."""
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir()
                                                     if (p / "__init__.py").is_file()}


def _installed() -> set[str]:
    """Top-level import names of the environment's distributions (this project's own excluded) and the stdlib."""
    names = {n for n, dists in importlib.metadata.packages_distributions().items() if dists != ["specdec"]}
    return names | set(sys.stdlib_module_names)


def test_no_folder_on_the_path_shadows_an_installed_name():
    installed = _installed()
    clashes = sorted(f"{d.relative_to(ROOT)}/{n}" for d in ON_PATH for n in _offered(d) - {"specdec"}
                     if n in installed)
    assert not clashes, f"these would shadow an installed module of the same name: {clashes}"


def test_generic_names_are_not_packages():
    for name in ("model", "kernels"):
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes `import {name}` ours"
        assert (ROOT / "specdec" / name).resolve() == ROOT / name, f"specdec/{name} must link to {name}/"


def test_installed_distributions_win_from_the_repo_root():
    """Import every installed top-level name that a root folder also bears, from the root as `python -c` does."""
    names = sorted({p.name for p in ROOT.iterdir() if p.is_dir()} & _installed() - {"specdec"})
    code = ("import importlib, sys\nfor n in sys.argv[1:]:\n    m = importlib.import_module(n)\n"
            "    print(n, getattr(m, '__file__', None) or list(m.__path__)[0])")
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, check=True)
    ours = [line for line in out.stdout.splitlines()
            if Path(line.split(" ", 1)[1]).resolve().is_relative_to(ROOT / line.split(" ", 1)[0])]
    assert not ours, f"imported from the repo instead of the environment: {ours}"
    import specdec.kernels.fp8  # noqa: F401  (and the package still imports under its own name)
    import specdec.model.loader  # noqa: F401
