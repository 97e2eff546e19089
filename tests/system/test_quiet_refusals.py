"""Noise: a refused request is one log line, never a library traceback (real gRPC and HTTP servers)."""

from __future__ import annotations

import logging
import socket
import struct
import time

import grpc
from controller_helpers import TOKEN
from polling import wait_for

from stalwart.health.controller import ControllerConfig, JobController
from stalwart.health.daemon import HealthDaemon


def test_a_malformed_grpc_request_is_one_line_not_a_traceback(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    daemon = HealthDaemon(tmp_path, TOKEN, probe_interval_s=5.0)
    address = daemon.start()
    try:
        channel = grpc.insecure_channel(address)
        for method in ("Heartbeat", "KillWorkers", "Quarantine"):
            garbage = channel.unary_unary(
                f"/stalwart.health.NodeHealth/{method}", request_serializer=bytes, response_deserializer=bytes
            )
            try:
                garbage(b"\xff\xff\xff\xff\x0f\x01", timeout=5)
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.OK
        wait_for(lambda: sum("malformed request" in r.getMessage() for r in caplog.records) >= 3, 10, "3 lines")
    finally:
        daemon.stop()
    grpc_records = [r for r in caplog.records if r.name.startswith("grpc")]
    assert grpc_records and all(r.exc_info is None and "\n" not in r.getMessage() for r in grpc_records)
    assert "Traceback" not in caplog.text


def test_an_http_client_that_hangs_up_leaves_no_traceback(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    controller = JobController(ControllerConfig(tmp_path, "127.0.0.1:0", "127.0.0.1:0"), TOKEN)
    controller.start()
    try:
        host, port = controller.http_address.rsplit(":", 1)
        for _ in range(20):  # ask for the dashboard and reset the connection before it is read
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)
        # the server still answers the next client
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        controller.stop()
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]
