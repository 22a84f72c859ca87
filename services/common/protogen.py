"""Generate the Python code for the wire contracts under proto/ (`make proto`; a test checks staleness)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTOS = ["opd/teacher/v1/teacher.proto", "opd/experience/v1/experience.proto"]
GRPC_PROTOS = {"opd/teacher/v1/teacher.proto"}


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into `out_dir`; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in PROTOS:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
        if proto in GRPC_PROTOS:
            args.append(f"--grpc_python_out={out_dir}")
        if protoc.main([*args, str(PROTO_DIR / proto)]) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = proto.removesuffix(".proto")
        written += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi"]
        if proto in GRPC_PROTOS:
            written.append(out_dir / f"{stem}_pb2_grpc.py")
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
