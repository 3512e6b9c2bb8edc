"""Interop: a request a tier forwards (``messages.encode_request``, written partly by hand to copy the tensor once)
decodes as meant in protobufjs 7, the JavaScript protobuf runtime behind @grpc/proto-loader 0.8.

protobufjs is installed with npm into a folder the test owns (``tests/interop/node_modules``, not committed) the first
time; the test is skipped, saying why, when node or npm is missing or the install fails (no network)."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from common.wire import codecs, messages
from common.wire.batch import Batch
from common.wire.codecs import WireCodec

HERE = Path(__file__).resolve().parent / "interop"
PROTO = Path(__file__).resolve().parent.parent / "proto" / "splitexit.proto"
PROTOBUFJS = "protobufjs@7"


@pytest.fixture(scope="session")
def node_decoder():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to check protobufjs interop")
    if not (HERE / "node_modules" / "protobufjs").is_dir():
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(HERE),
                            PROTOBUFJS], check=True, capture_output=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"could not install {PROTOBUFJS} with npm: {e}")

    def decode(payload: bytes, tmp_path: Path) -> dict:
        body = tmp_path / "request.bin"
        body.write_bytes(payload)
        out = subprocess.run(["node", str(HERE / "decode_request.js"), str(PROTO), str(body)], check=True,
                             capture_output=True, text=True, timeout=60, cwd=HERE)
        return json.loads(out.stdout)

    return decode


@pytest.mark.parametrize("wire", [WireCodec(), WireCodec("int8", "zlib"), WireCodec("float16")], ids=str)
def test_protobufjs_decodes_a_forwarded_request_as_meant(node_decoder, tmp_path, wire):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    batch = Batch("req-\u00e9", "model-1", [7, 8, 9], x, queued_s=0.125)
    payload = messages.encode_request(batch, wire)
    seen = node_decoder(payload, tmp_path)
    expected = codecs.encode(x, wire)
    assert seen["version"].startswith("7.")
    assert (seen["request_id"], seen["model_id"], seen["sample_ids"], seen["queued_ms"]) == (
        "req-\u00e9", "model-1", [7, 8, 9], 125.0)
    assert (seen["dtype"], seen["shape"], seen["codec"], seen["compression"]) == (
        expected.dtype, list(expected.shape), expected.codec, expected.compression)
    assert base64.b64decode(seen["data"]) == expected.data and len(expected.data) > 0
    assert len(seen["scale"]) == len(expected.scale)
