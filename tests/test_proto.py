"""The committed generated code must match what scripts/gen_proto.py produces from the .proto today."""
from pathlib import Path

from scripts.gen_proto import ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path):
    fresh = generate(tmp_path)
    assert {p.name for p in fresh} == {"splitexit_pb2.py", "splitexit_pb2.pyi", "splitexit_pb2_grpc.py"}
    for path in fresh:
        committed = ROOT / "proto" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"proto/{path.name} is stale: run `python -m scripts.gen_proto` and commit the result"
        )
