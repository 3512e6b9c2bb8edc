"""A throwaway certificate authority for tests, made with the ``openssl`` command line (EC P-256 keys, 1 day)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(folder: Path, leaves: tuple[str, ...] = ("server", "client")) -> Path:
    """Write ``ca.pem`` and, per leaf, ``<leaf>.pem`` + ``<leaf>.key`` signed by it, valid for localhost/127.0.0.1."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
             "-subj", "/CN=splitexit test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for leaf in leaves:
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-subj", f"/CN={leaf}", "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", cwd=folder)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", "san.ext", "-out", f"{leaf}.pem", cwd=folder)
    return folder
