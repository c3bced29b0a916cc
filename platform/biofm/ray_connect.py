"""Connecting to Ray: a cluster when an address is given, else a local instance."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray: ``address`` or ``RAY_ADDRESS`` targets a cluster, else a local instance starts
    (quiet unless ``--verbose``: :mod:`biofm.output`). A local instance's processes are told its
    address (``RAY_ADDRESS``, inherited from its raylet): Ray's own state queries in them (Train's
    placement-group cleaner) otherwise fail with "Found multiple active Ray instances" when another
    runs on the machine."""
    import socket

    import ray

    from biofm import output

    if not ray.is_initialized() and (address or os.environ.get("RAY_ADDRESS")):
        ray.init(address=address, log_to_driver=True, **output.ray_init_options())
    elif not ray.is_initialized():
        with socket.socket() as s:  # a free port for the new instance's GCS, so its address is known first
            s.bind(("", 0))
            port = s.getsockname()[1]
        # read by the node this process starts; its raylet passes RAY_ADDRESS on to every worker
        os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}")
        try:
            ray.init(address="local", log_to_driver=True, **output.ray_init_options())
        finally:
            del os.environ["RAY_GCS_SERVER_PORT"], os.environ["RAY_ADDRESS"]
    import ray.data  # noqa: F401  (its loggers exist once it is imported)

    output.quiet_ray_data()
