"""`CoordinatorConfig` as users of the original tool write it: its logging fields, and API keys
that never leak through a `repr`, the statistics or an error message."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator, ServerError

SECRET = "sk-do-not-log-3f9a"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoingGateway(BaseHTTPRequestHandler):
    """A misconfigured gateway: it refuses every request and echoes the request's headers."""

    def do_GET(self):
        body = json.dumps({"error": {"message": f"unauthorized: {self.headers.get('Authorization')}"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def gateway():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def servers_logger_level():
    """Tests here may set the library logger's level; put it back afterwards."""
    log = logging.getLogger("optimal_sampling.servers")
    level = log.level
    yield log
    log.setLevel(level)


async def start(config: CoordinatorConfig) -> DualVLLMCoordinator:
    coordinator = DualVLLMCoordinator(config)
    await coordinator.start()
    return coordinator


def test_the_original_tools_logging_fields_are_accepted(servers_logger_level):
    config = CoordinatorConfig(
        theta_url="http://localhost:8000",
        t_url="http://localhost:8001",
        top_k=100,
        alpha_tol=1e-6,
        alpha_max_iter=20,
        max_retries=3,
        retry_delay=1.0,
        request_timeout=60.0,
        connection_pool_size=100,
        enable_logging=True,
        log_level="INFO",
    )
    DualVLLMCoordinator(config)
    assert servers_logger_level.level == logging.INFO


def test_an_unknown_log_level_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="DEBUG, INFO, WARNING"):
        CoordinatorConfig(log_level="LOUD")


@pytest.mark.parametrize("enable_logging", [True, False])
def test_enable_logging_switches_this_coordinators_retry_warnings(caplog, enable_logging):
    url = f"http://127.0.0.1:{closed_port()}"
    config = CoordinatorConfig(theta_url=url, t_url=url, max_retries=1, retry_delay=0.01, enable_logging=enable_logging)
    with caplog.at_level(logging.WARNING, logger="optimal_sampling.servers"):
        with pytest.raises(ServerError, match="cannot connect"):
            asyncio.run(start(config))
    retries = [r for r in caplog.records if r.name == "optimal_sampling.servers" and "retry 1/1" in r.getMessage()]
    assert bool(retries) == enable_logging


def test_log_level_sets_the_library_logger_so_lower_records_are_dropped(caplog, servers_logger_level):
    url = f"http://127.0.0.1:{closed_port()}"
    config = CoordinatorConfig(theta_url=url, t_url=url, max_retries=1, retry_delay=0.01, log_level="ERROR")
    with caplog.at_level(logging.WARNING):  # the root handler would take warnings; the library's level drops them
        servers_logger_level.setLevel(logging.NOTSET)
        with pytest.raises(ServerError):
            asyncio.run(start(config))
    assert servers_logger_level.level == logging.ERROR
    assert not [r for r in caplog.records if r.name == "optimal_sampling.servers"]


def test_api_keys_are_not_in_the_repr():
    config = CoordinatorConfig(theta_api_key=SECRET, t_api_key=SECRET + "-t")
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert config.theta_api_key == SECRET  # still there for the requests


def test_api_keys_are_not_in_errors_logs_or_statistics(gateway, caplog):
    config = CoordinatorConfig(theta_url=gateway, t_url=gateway, theta_api_key=SECRET, t_api_key=SECRET, max_retries=0)
    coordinator = DualVLLMCoordinator(config)
    with caplog.at_level(logging.DEBUG, logger="optimal_sampling.servers"):
        with pytest.raises(ServerError) as raised:
            asyncio.run(coordinator.start())
    message = str(raised.value)
    assert "HTTP 401" in message and "unauthorized: Bearer ***" in message  # the gateway did echo it
    assert SECRET not in message and SECRET not in getattr(raised.value, "message", "")
    assert not [r for r in caplog.records if SECRET in r.getMessage()]
    assert SECRET not in json.dumps(coordinator.get_statistics())
