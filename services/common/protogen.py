"""Generate the Python code for the wire contracts under proto/ (`make proto`; a test checks staleness).

Each .proto has one copy, under proto/. Its generated modules go where the Python package that ships them
lives: the teacher API into the slim client distribution (clients/python, package `opd_teacher_client`,
what other trainers install), the experience record next to its .proto (package `opd.experience`, part of
the main distribution). protoc names imports by the .proto's package path (`from opd.teacher.v1 import
teacher_pb2`); those lines are rewritten to the package the modules are installed as. The descriptors keep
the .proto's own name (`opd/teacher/v1/teacher.proto`), which is what reflection and grpcurl show.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"


@dataclass(frozen=True)
class Target:
    proto: str  # relative to PROTO_DIR
    out: str  # directory of the generated modules, relative to the repository root
    package: str  # the Python package that directory is imported as
    grpc: bool  # also generate the service stubs (*_pb2_grpc.py)

    @property
    def proto_package(self) -> str:
        """The package protoc's imports use: the .proto's directory, dotted."""
        return str(Path(self.proto).parent).replace("/", ".")


TARGETS = [
    Target(
        "opd/teacher/v1/teacher.proto", "clients/python/opd_teacher_client/v1", "opd_teacher_client.v1", True
    ),
    Target("opd/experience/v1/experience.proto", "proto/opd/experience/v1", "opd.experience.v1", False),
]


def rewrite_imports(text: str) -> str:
    """Point protoc's `from <proto package> import x_pb2` lines at the packages the modules live in."""
    for target in TARGETS:
        text = text.replace(f"from {target.proto_package} import ", f"from {target.package} import ")
    return text


def generate(root: Path) -> list[Path]:
    """Run protoc (grpcio-tools); write every target under `root` as under the repository root.

    Returns the files written. `generate(ROOT)` refreshes the committed code; `generate(tmp)` writes a copy
    to compare against it.
    """
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in TARGETS:
            args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
            if target.grpc:
                args.append(f"--grpc_python_out={tmp}")
            if protoc.main([*args, str(PROTO_DIR / target.proto)]) != 0:
                raise RuntimeError(f"protoc failed on {target.proto}")
            stem = Path(target.proto).stem
            names = [f"{stem}_pb2.py", f"{stem}_pb2.pyi"] + ([f"{stem}_pb2_grpc.py"] if target.grpc else [])
            out_dir = root / target.out
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in names:
                generated = Path(tmp) / Path(target.proto).parent / name
                (out_dir / name).write_text(rewrite_imports(generated.read_text()))
                written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
