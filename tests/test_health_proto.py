"""The committed stubs are exactly what the generator makes from healthd.proto, and import as stalwart.*."""

import filecmp
from pathlib import Path

from stalwart.health.proto import generate as gen


def test_committed_stubs_match_proto(tmp_path):
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.GENERATED)
    committed = Path(gen.__file__).parent
    stale = [name for name in gen.GENERATED if not filecmp.cmp(tmp_path / name, committed / name, shallow=False)]
    assert not stale, f"{stale} are stale: run `python -m stalwart.health.proto.generate`"
    grpc_stub = (committed / "healthd_pb2_grpc.py").read_text()
    assert "from stalwart.health.proto import healthd_pb2" in grpc_stub


def test_stubs_import_and_roundtrip():
    from stalwart.health.proto import healthd_pb2, healthd_pb2_grpc

    req = healthd_pb2.HeartbeatRequest(rank=3, phase=healthd_pb2.CHECKPOINT, ts=1.5)
    assert healthd_pb2.HeartbeatRequest.FromString(req.SerializeToString()) == req
    assert hasattr(healthd_pb2_grpc, "NodeHealthStub")
