"""pytest-benchmark of RunPodSandbox per chain on the real testbed: the engine with the real
containerd-shim-runc-v2 + runc (shim chain) and with our sandboxer (sandbox chain).  One round is
RunPodSandbox + StopPodSandbox + RemovePodSandbox; the benchmark times RunPodSandbox only
(pyproject runs benchmarks disabled, i.e. once as tests, in CI; compare with
`pytest tests/test_bench_runpod.py --benchmark-enable`)."""
from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench.engine.harness import EngineProcess
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.sandboxer.harness import SandboxerProcess

pytestmark = pytest.mark.integration
T = 60
_ids = itertools.count()


def _pod(name: str) -> cri.PodSandboxConfig:
    ns = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="bench"),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns)))


@pytest.fixture(params=["shim", "sandbox"])
def engine(request: Any, leak_check: Any) -> Iterator[EngineProcess]:
    base = Path(tempfile.mkdtemp(prefix="cbb", dir="/tmp"))  # short: unix socket paths
    sbx = None
    if request.param == "shim":
        eng = EngineProcess(base=base, runtimes={"shim": {"controller": "shim"}})
    else:
        sbx = SandboxerProcess(schema="current")
        eng = EngineProcess(base=base, default_runtime="sandbox", runtimes={
            "sandbox": {"controller": "sandboxer", "address": sbx.sock, "schema": "current"}})
        leak_check.watch_dir(sbx.base)
    leak_check.watch_dir(eng.state_dir)
    try:
        if sbx:
            sbx.start()
        yield eng.start()
    finally:
        try:
            eng.teardown()
        finally:
            if sbx:
                sbx.teardown()
            shutil.rmtree(base, ignore_errors=True)


def test_run_pod_sandbox(benchmark: Any, engine: EngineProcess) -> None:
    stub = engine.client()
    created: list[str] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (cri.RunPodSandboxRequest(config=_pod(f"b{next(_ids)}")),), {}

    def run(req: Any) -> None:
        created.append(stub.RunPodSandbox(req, timeout=T).pod_sandbox_id)

    def teardown_all() -> None:
        for sid in created:
            stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
            stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)

    try:
        benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    finally:
        teardown_all()
    # Disabled benchmarks (CI) run once; enabled ones warm up once and time 5 rounds.
    assert created and len(set(created)) == len(created)
    assert len(created) in (1, 6)
    listed = stub.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    assert not [p for p in listed if p.id in created]  # all removed again
