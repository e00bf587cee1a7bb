"""Tests that the notebooks are committed without outputs and execute headless (nbclient) against
run directories the suite makes here: a real (small) interleaved bench session of all three runc
chains and a real simulation of the same scenario, selected with CHAINBENCH_RUNS."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("shim_vs_sandbox", "sim_vs_measured", "calibration")


@pytest.fixture(scope="module")
def runs_env(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("nbruns")
    cli = [sys.executable, "-m", "bench.cli"]
    subprocess.run([*cli, "bench", "runc-seq", "--chain", "shim,sandbox,containerd", "--pods",
                    "6", "--out", str(root / "bench")], check=True, capture_output=True,
                   timeout=600)
    subprocess.run([*cli, "simulate", "runc-seq", "--chain", "shim", "--chain", "sandbox",
                    "--out", str(root / "sim"), "--quiet"], check=True, capture_output=True,
                   timeout=300)
    return os.pathsep.join([str(root / "bench"), str(root / "sim")])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_clean(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for c in code:
        assert c.outputs == [] and c.execution_count is None
    assert "CHAINBENCH_RUNS" in "".join(c.source for c in code)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_headless(name: str, runs_env: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAINBENCH_RUNS", runs_env)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    # execute() owns the kernel's lifetime: it must be gone, not leaked into the next test.
    assert client.km is None or not client.km.is_alive()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook displayed no figure"
    texts = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "5 run(s)" in texts  # the runs named by CHAINBENCH_RUNS, not the default
