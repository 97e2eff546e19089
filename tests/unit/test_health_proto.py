"""The committed stubs are exactly what the generator makes from the .proto files, and import as stalwart.*."""

import filecmp
from pathlib import Path

from stalwart.health.proto import generate as gen


def test_committed_stubs_match_proto(tmp_path):
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.GENERATED)
    committed = Path(gen.__file__).parent
    stale = [name for name in gen.GENERATED if not filecmp.cmp(tmp_path / name, committed / name, shallow=False)]
    assert not stale, f"{stale} are stale: run `python -m stalwart.health.proto.generate`"
    assert {"healthd_pb2_grpc.py", "controller_pb2_grpc.py"} <= set(gen.GENERATED)  # both protos covered
    for proto in ("healthd", "controller"):
        grpc_stub = (committed / f"{proto}_pb2_grpc.py").read_text()
        assert f"from stalwart.health.proto import {proto}_pb2" in grpc_stub


def test_stubs_import_and_roundtrip():
    from stalwart.health.proto import healthd_pb2, healthd_pb2_grpc

    req = healthd_pb2.HeartbeatRequest(rank=3, phase=healthd_pb2.CHECKPOINT, ts=1.5)
    assert healthd_pb2.HeartbeatRequest.FromString(req.SerializeToString()) == req
    assert hasattr(healthd_pb2_grpc, "NodeHealthStub")
    from stalwart.health.proto import controller_pb2, controller_pb2_grpc

    status = healthd_pb2.NodeStatus(node="2", state=healthd_pb2.UNHEALTHY, address="10.0.0.2:50051")
    assert healthd_pb2.NodeStatus.FromString(status.SerializeToString()) == status
    rollback = controller_pb2.RollbackRequest(token="t", latest_verified=True)
    assert rollback.WhichOneof("target") == "latest_verified"
    assert hasattr(controller_pb2_grpc, "ControllerStub")
