"""Owns: regeneration of the committed protobuf/gRPC Python code from bench/rpc/pb/*.proto.

One command (`chainbench protogen` or `make protos`) writes every `*_pb2.py`/`*_pb2_grpc.py`
next to its `.proto`.  Protos import each other by repo-root-relative path
(`import "bench/rpc/pb/x.proto"`) so the generated imports are `from bench.rpc.pb import x_pb2`
and need no sys.path tricks.  A test regenerates into a temp dir and compares bytes (drift).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PB_DIR = Path("bench") / "rpc" / "pb"


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / PB_DIR).glob("*.proto"))


def generate(out_root: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto; return the generated files."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # dev dependency only
        raise SystemExit("protogen needs grpcio-tools: pip install -e '.[dev]'") from exc
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    args = ["protoc", f"-I{root}", f"-I{wkt}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", *files]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    out = sorted((out_root / PB_DIR).glob("*_pb2*.py"))
    # grpc stubs are only meaningful for files that declare a service; drop empty ones so the
    # committed tree does not carry noise.
    for f in list(out):
        if f.name.endswith("_pb2_grpc.py") and "Stub" not in f.read_text():
            f.unlink()
            out.remove(f)
    return out


def regenerate(root: Path = REPO_ROOT) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp), root)
        dest = root / PB_DIR
        for old in dest.glob("*_pb2*.py"):
            old.unlink()
        written = []
        for f in produced:
            target = dest / f.name
            shutil.copyfile(f, target)
            written.append(target)
    return written


def drift(root: Path = REPO_ROOT) -> list[str]:
    """Names of generated files whose committed copy is missing, stale or orphaned."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {f.name: f.read_bytes() for f in generate(Path(tmp), root)}
    committed = {f.name: f.read_bytes() for f in (root / PB_DIR).glob("*_pb2*.py")}
    return sorted(name for name in fresh.keys() | committed.keys()
                  if fresh.get(name) != committed.get(name))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench protogen", description=__doc__)
    ap.add_argument("--check", action="store_true",
                    help="only report generated files that differ from a fresh run (exit 1)")
    args = ap.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"stale: {PB_DIR / name}")
        return 1 if stale else 0
    for f in regenerate():
        print(f.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
