"""Generated gRPC/protobuf stubs for ``healthd.proto`` and ``controller.proto`` (committed, never edited by hand).

Regenerate after editing either proto (needs ``grpcio-tools``, the same version the stubs were
made with, or the stub test fails on the version header)::

    python -m stalwart.health.proto.generate

It runs ``python -m grpc_tools.protoc`` with the proto placed at ``stalwart/health/proto/`` under a
temporary include root, so the generated ``*_pb2_grpc.py`` files import
``from stalwart.health.proto import healthd_pb2`` and the descriptor is registered under a unique
file name. ``tests/test_health_proto.py`` checks the committed files match a fresh generation.
"""
