"""server.preflight.check_port: the trial bind before anything loads."""

import socket

import pytest

from server.preflight import check_port


def test_a_free_port_passes():
    with socket.socket() as probe:  # a port nobody holds (released at once)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port("127.0.0.1", port)


def test_a_listening_port_is_refused_with_the_address_and_the_reason():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ValueError) as err:
            check_port("127.0.0.1", port)
        message = str(err.value)
        assert message.startswith(f"--port {port}: cannot listen on 127.0.0.1: ")
        assert "address already in use" in message and "\n" not in message
    check_port("127.0.0.1", port)  # released: free again

