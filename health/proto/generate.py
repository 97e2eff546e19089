"""Regenerate the committed stubs: ``python -m stalwart.health.proto.generate [OUT_DIR]``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = (HERE / "healthd.proto", HERE / "controller.proto")
PACKAGE_PATH = Path("stalwart/health/proto")
GENERATED = tuple(f"{p.stem}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def generate(out_dir: str | Path) -> list[Path]:
    """Run protoc on every proto of :data:`PROTOS` and write the Python stubs into ``out_dir``.

    The protos are copied under ``stalwart/health/proto/`` in a scratch include root: protoc derives
    the generated import lines (and ``controller.proto``'s import of ``healthd.proto``) from the
    proto's path relative to ``-I``, and the repository folder is not named ``stalwart``.
    """
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stalwart-protoc-") as tmp:
        src_root, gen_root = Path(tmp) / "src", Path(tmp) / "gen"
        (src_root / PACKAGE_PATH).mkdir(parents=True)
        gen_root.mkdir()
        for proto in PROTOS:
            shutil.copyfile(proto, src_root / PACKAGE_PATH / proto.name)
        well_known = resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{src_root}",
            f"-I{well_known}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            *(str(src_root / PACKAGE_PATH / proto.name) for proto in PROTOS),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(
                f"protoc failed (exit {rc}) on {[p.name for p in PROTOS]}; run `python -m grpc_tools.protoc "
                "--version` to check grpcio-tools"
            )
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(gen_root / PACKAGE_PATH / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else HERE
    for path in generate(out):
        print(path)
