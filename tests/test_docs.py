"""What the docs and the Makefile state agrees with what the code does."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_compile_check_case_count_in_the_docs() -> None:
    from specdec.kernels.aot import cases

    n = len(cases(90))
    for doc, pattern in (("README.md", r"(\d+) DeepSeek-V3 cases"), ("docs/gpu.md", r"kernels compile \((\d+) cases")):
        quoted = re.findall(pattern, (ROOT / doc).read_text())
        assert quoted == [str(n)], f"{doc} quotes {quoted} compile-check cases; the check has {n}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("url", [None, "https://download.pytorch.org/whl/cpu"])
def test_torch_index_url_reaches_the_torch_install_only(url: str | None) -> None:
    """make test TORCH_INDEX_URL=...: an extra index for torch (PyTorch's CPU wheels); without it, plain PyPI."""
    argv = ["make", "-n", "-W", "pyproject.toml", ".venv/.installed", *([f"TORCH_INDEX_URL={url}"] if url else [])]
    lines = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    installs = [x.split() for x in lines if " -m pip install " in x]
    torch = [x for x in installs if any(a.startswith("torch==") for a in x)]
    assert len(torch) == 1, lines
    extra = torch[0][torch[0].index("--extra-index-url"):] if "--extra-index-url" in torch[0] else []
    assert extra == (["--extra-index-url", url] if url else []), lines
    assert not any("--extra-index-url" in x for x in installs if x not in torch), "the index is for torch alone"
