"""The committed generated code equals what protoc produces from the .proto files."""

from pathlib import Path

from services.common.protogen import PROTO_DIR, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    for fresh in generate(tmp_path):
        committed = PROTO_DIR / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make proto`"
