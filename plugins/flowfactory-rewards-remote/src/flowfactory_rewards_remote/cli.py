"""`ff reward serve`: serve one installed reward over HTTP (docs/reward-server.md).

Only typer is imported at module level: `ff` builds this command group on every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def load_options(spec: Any, options_file: Path | None, overrides: list[str]) -> Any:
    """The reward's options from --options-file (YAML mapping) and --set KEY=VALUE (YAML values, dotted keys for
    nested options), validated by the reward's own options model; a ConfigError names each bad option."""
    from pydantic import ValidationError

    from flowfactory.config import apply_overrides, load_yaml
    from flowfactory.errors import ConfigError

    source = f"reward {spec.name!r} options"
    raw: dict[str, Any] = {}
    if options_file is not None:
        raw = load_yaml(options_file)
        if not isinstance(raw, dict):
            raise ConfigError(str(options_file), [("", "must be a YAML mapping of the reward's options")])
        source = f"{source} ({options_file} and --set)" if overrides else f"{source} ({options_file})"
    raw = apply_overrides(raw, overrides, source)
    try:
        return spec.options.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = f"unknown option; `ff show reward {spec.name}` lists its options"
            elif e["type"] == "missing":
                msg = "required option is missing; give it with --set KEY=VALUE or in --options-file"
            problems.append((f"option {loc}" if loc else "options", msg))
        raise ConfigError(source, problems) from None


def _listen(host: str, port: int) -> Any:
    """A bound, listening socket, or a FlowFactoryError saying why not and what to do."""
    import socket

    from flowfactory.errors import FlowFactoryError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FlowFactoryError(f"--host {host!r} cannot be resolved ({exc}); give an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise FlowFactoryError(f"cannot listen on {host}:{port}: {exc.strerror or exc}. Choose another --port, or "
                               "stop what holds it.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    ctx: typer.Context,
    reward: Annotated[str, typer.Option("--reward", "-r", help="Name of the installed reward to serve (`ff list reward`).",
                                        show_default=False)],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="A reward option, e.g. --set tolerance=0.5 (value read as YAML). Repeatable.")] = None,
    options_file: Annotated[Path | None, typer.Option(
        "--options-file", metavar="FILE", help="YAML mapping of the reward's options (--set wins over it).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one, printed at start).")] = 8000,
    token_env: Annotated[str | None, typer.Option(
        "--token-env", metavar="VAR", help="Require `Authorization: Bearer $VAR` on /rewards and /score; the token "
        "is read from this environment variable, never from the command line.")] = None,
    device: Annotated[str, typer.Option(help="Device the reward runs on: cpu, cuda, cuda:0, ...")] = "cpu",
    max_request_mb: Annotated[float, typer.Option(
        "--max-request-mb", min=0.001, help="Largest request body taken, in MiB; larger ones get 413.")] = 256.0,
) -> None:
    """Serve one installed reward over HTTP: GET /health, GET /rewards, POST /score (docs/reward-server.md)."""
    import os

    import flowfactory.plugins as ff_plugins
    from flowfactory.errors import FlowFactoryError
    from flowfactory.registry import BuildContext

    state = ctx.find_object(ff_plugins.PluginState) or ff_plugins.get_state()
    spec = state.registry.get("reward", reward)
    options = load_options(spec, options_file, list(overrides or []))

    token = None
    if token_env is not None:
        token = os.environ.get(token_env, "")
        if not token:
            raise FlowFactoryError(f"--token-env {token_env}: the environment variable {token_env} is not set or is "
                                   f"empty. Export the token first (export {token_env}=...), then start the server.")

    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise FlowFactoryError(f"--device {device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlowFactoryError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    sock = _listen(host, port)
    try:
        built = spec.create(options, BuildContext(device=dev))
        for attr in ("groupwise", "handles_video"):
            if not isinstance(getattr(type(built), attr, None), bool):
                raise FlowFactoryError(f"reward {reward!r} ({spec.package}) has no bool class attribute {attr!r}; "
                                       "it does not implement flowfactory.types.Reward")
        _run(sock, host, built, spec, options, str(dev), token, max_request_mb)
    finally:
        sock.close()


def _run(sock: Any, host: str, built: Any, spec: Any, options: Any, device: str, token: str | None,
         max_request_mb: float) -> None:
    import uvicorn

    from flowfactory_cli.console import err, print_warning
    from flowfactory_rewards_remote.protocol import PROTOCOL
    from flowfactory_rewards_remote.server import Served, create_app

    served = Served(name=spec.name, reward=built, options=options.model_dump(mode="json"), package=spec.package,
                    version=spec.version, device=device)
    app = create_app(served, token=token, max_request_bytes=int(max_request_mb * 2**20))
    bound = sock.getsockname()
    url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    if host not in LOOPBACK and token is None:
        print_warning(f"serving on {host} without a token: anyone who reaches this machine can use it. "
                      "Add --token-env VAR.")
    err().print(f"serving reward {spec.name!r} ({spec.package} {spec.version}) on {device} at "
                f"http://{url_host}:{bound[1]} (protocol {PROTOCOL}"
                f"{', bearer token required' if token else ''}); Ctrl-C stops", soft_wrap=True, highlight=False)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def reward_app() -> typer.Typer:
    """The `ff reward` command group."""
    app = typer.Typer(name="reward", help="Serve rewards to runs on other processes or machines.",
                      no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
    app.command(name="serve")(serve)
    return app


__all__ = ["reward_app", "serve", "load_options"]
