"""The committed generated code equals what protoc produces from the .proto files, and the distributions
declare the runtime versions that code checks at import."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from services.common.protogen import ROOT, TARGETS, generate, rewrite_imports

CLIENT = ROOT / "clients/python"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh_files = generate(tmp_path)
    assert len(fresh_files) == 5  # teacher: pb2, pyi, pb2_grpc; experience: pb2, pyi
    for fresh in fresh_files:
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make proto`"


def test_teacher_code_lives_in_the_client_package_and_imports_it() -> None:
    grpc_code = (CLIENT / "opd_teacher_client/v1/teacher_pb2_grpc.py").read_text()
    assert "from opd_teacher_client.v1 import teacher_pb2 as" in grpc_code
    assert "from opd.teacher" not in grpc_code
    assert not (ROOT / "proto/opd/teacher/v1/teacher_pb2.py").exists()  # one copy of the generated code
    assert [t.proto for t in TARGETS if (ROOT / "proto" / t.proto).exists()] == [t.proto for t in TARGETS]
    # the experience record stays where its .proto is; its imports are left alone
    assert rewrite_imports("from opd.experience.v1 import x_pb2\n") == "from opd.experience.v1 import x_pb2\n"


def floor(requirements: list[str], name: str) -> Version:
    (req,) = [Requirement(r) for r in requirements if Requirement(r).name == name]
    (spec,) = [s for s in req.specifier if s.operator == ">="]
    return Version(spec.version)


def test_declared_floors_are_the_versions_the_generated_code_checks() -> None:
    pb2 = (CLIENT / "opd_teacher_client/v1/teacher_pb2.py").read_text()
    grpc_code = (CLIENT / "opd_teacher_client/v1/teacher_pb2_grpc.py").read_text()
    major, minor, patch = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        pb2,
    ).groups()  # type: ignore[union-attr]
    protobuf_gen = Version(f"{major}.{minor}.{patch}")
    grpc_gen = Version(re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_code).group(1))  # type: ignore[union-attr]
    client_deps = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    main_deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for deps in (client_deps, main_deps):
        assert floor(deps, "protobuf") == protobuf_gen
        assert floor(deps, "grpcio") == grpc_gen
    # the slim distribution: nothing but the runtime of the generated code and numpy
    assert sorted(Requirement(r).name for r in client_deps) == ["grpcio", "numpy", "protobuf"]
    assert "opd-teacher-client" in [Requirement(r).name for r in main_deps]
