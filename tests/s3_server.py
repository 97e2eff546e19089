"""A local S3 endpoint for tests: moto's threaded server on a free port, dummy credentials.

moto keeps bucket contents in this process's memory, not in the server thread, so ``stop()`` then
``start()`` on the same port models an outage that loses nothing (a real S3 outage), while
``reset()`` wipes every bucket. A new ``LocalS3`` starts empty (its first start resets), so tests
in one pytest process do not see each other's buckets.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from typing import Any

from stalwart.net import free_port

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class LocalS3:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        os.environ.update(DUMMY_ENV)  # boto reads credentials from the environment
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server_cls = ThreadedMotoServer
        self._server: Any = None
        self._started_once = False

    def start(self) -> None:
        self._server = self._server_cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        if not self._started_once:  # moto's buckets are this process's, shared by every server: a new one starts empty
            self._started_once = True
            self.reset()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).close()

    def storage_options(self) -> dict[str, Any]:
        """s3fs options: this endpoint, a fresh client, no botocore retries so outages fail fast."""
        return {
            "client_kwargs": {"endpoint_url": self.endpoint},
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}},
            "skip_instance_cache": True,
        }

    def make_bucket(self, name: str) -> None:
        import s3fs

        s3fs.S3FileSystem(**self.storage_options()).mkdir(name)
