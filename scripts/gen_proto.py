"""Generate the Python protobuf and gRPC modules for proto/splitexit.proto.

Usage: ``python -m scripts.gen_proto [--out DIR]``. The generated files are committed beside the .proto;
``tests/test_proto.py`` regenerates them into a temporary folder and fails when the committed ones are stale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/splitexit.proto"


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc on the contract, writing into ``out_dir/proto/``; return the files written."""
    from grpc_tools import protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc", f"-I{ROOT}", f"-I{include}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return sorted((out_dir / "proto").glob("splitexit_pb2*"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="folder that receives proto/splitexit_pb2*.py")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
