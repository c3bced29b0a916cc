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
        attach(address or os.environ["RAY_ADDRESS"])
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


def attach(address: str) -> None:
    """Join the running cluster at ``address`` (``auto``: the one ``ray start`` started on this
    machine): no Ray start-up (Performance). The job's workers start in this process's folder where
    their node has it, as a Ray of the command's own would, so relative paths mean the same. One
    line says what to do when it cannot: the cluster is not running, or wants the token Ray 2.60's
    ``ray start --head`` turns on (``RAY_AUTH_MODE=token``; the token is in ``~/.ray/auth_token``)."""
    import socket

    import ray

    from biofm import output
    from biofm.errors import SourceUnreachable

    not_running = ("is it running? Start one with `ray start --head` (then --address auto), or leave --address and "
                   "RAY_ADDRESS unset for a Ray of this command's own")
    host, _, port = address.rpartition(":")
    if host and port.isdigit():   # Ray retries a silent address for minutes: ask the port first
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise SourceUnreachable(f"cannot connect to the Ray cluster at {address} ({e.strerror or e}): "
                                    f"{not_running}") from None
    options = output.ray_init_options()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:   # not a `ray job submit` driver: its job has a working_dir
        options["runtime_env"] = {"worker_process_setup_hook": in_folder(os.getcwd())}
    try:
        ray.init(address=address, log_to_driver=True, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        text = f"{e} {e.__cause__ or ''}"
        hint = not_running
        if "Authentication" in text or "InvalidAuthToken" in text:
            hint = ("it uses token authentication (ray start --head turns it on): set RAY_AUTH_MODE=token, with its "
                    "token in ~/.ray/auth_token (ray get-auth-token) or RAY_AUTH_TOKEN_PATH")
        raise SourceUnreachable(f"cannot connect to the Ray cluster at {address}: {hint}") from None


def in_folder(folder: str):
    """A worker setup hook: enter ``folder`` when this node has it (a remote node may not)."""

    def enter() -> None:
        if os.path.isdir(folder):
            os.chdir(folder)

    return enter
