"""`lucid serve`: the REST API on Ray Serve, in the foreground."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from grounding.sam import SAM_HELP  # the spec registry's help (light: no torch)
from lucid.errors import InputError


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Annotated[
            Path | None, typer.Option(help="A Ray Serve config file (serve deploy format; see README).")
        ] = None,
        host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1, or the config's).")] = None,
        port: Annotated[
            int | None, typer.Option(min=0, max=65535, help="Port (default 8000, or the config's).")
        ] = None,
        model: Annotated[str | None, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = None,
        sam: Annotated[str | None, typer.Option(help=SAM_HELP)] = None,
        image_root: Annotated[Path | None, typer.Option(help="Serve local image paths under this directory.")] = None,
        address: Annotated[
            str | None, typer.Option(help="Join a running Ray cluster (auto or HOST:PORT) instead of starting one.")
        ] = None,
        api_key_file: Annotated[
            Path | None,
            typer.Option(
                help="API keys, one a line (# comments); also LUCID_API_KEYS=k1,k2 and the config's api_keys."
            ),
        ] = None,
        admin_api_key_file: Annotated[
            Path | None,
            typer.Option(help="Admin keys (may also run eval jobs); also LUCID_ADMIN_API_KEYS, admin_api_keys."),
        ] = None,
        insecure_no_auth: Annotated[
            bool, typer.Option("--insecure-no-auth", help="Allow a non-loopback host without API keys.")
        ] = False,
    ) -> None:
        """Serve Lucid over REST (OpenAI-compatible chat, segment, evals, a web page) until Ctrl-C."""
        from serve.config import AppConfig, HttpOptions, read_config, with_keys

        if config is not None:
            cfg, http, _ = read_config(config)
        else:
            cfg, http = AppConfig(), HttpOptions()
        cfg = with_keys(cfg, api_key_file, admin_api_key_file)
        bind = host or http.host
        if not cfg.auth and not _loopback(bind) and not insecure_no_auth:
            raise InputError(
                f"refusing to listen on {bind} without API keys (anyone who reaches it could use it): give "
                "--api-key-file FILE, LUCID_API_KEYS or api_keys in the config, or pass --insecure-no-auth"
            )
        over = {k: v for k, v in {"model": model, "sam": sam}.items() if v is not None}
        if image_root is not None:
            if not image_root.is_dir():
                raise InputError(f"--image-root {image_root} is not a directory")
            over["image_root"] = str(image_root.resolve())
        if over:
            cfg = cfg.model_copy(update=over)
        if cfg.image_root is not None:
            cfg = cfg.model_copy(update={"image_root": str(Path(cfg.image_root).resolve())})
        cfg = cfg.model_copy(update={"eval_root": str(Path(cfg.eval_root).resolve())})
        if cfg.model != "testbed" and Path(cfg.model).exists():  # replicas and eval jobs may run elsewhere
            cfg = cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})
        from vlm.checkpoint import inspect_checkpoint

        inspect_checkpoint(cfg.model)
        from grounding.sam import check_sam_spec

        check_sam_spec(cfg.sam)
        run_server(cfg, bind, http.port if port is None else port, address)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_line(cfg, host: str) -> str:
    """What `lucid serve` says about keys at start-up (counts, never the keys)."""
    if cfg.auth:
        return (
            f"lucid serve: API keys required on every route but {', '.join(cfg.auth_exempt) or 'none'} "
            f"({len(cfg.api_keys)} key(s), {len(cfg.admin_api_keys)} admin key(s) for /v1/evals)"
        )
    where = "loopback only" if _loopback(host) else "NOT loopback: --insecure-no-auth"
    return f"lucid serve: no API keys configured: anyone who reaches {host} can call it ({where})"


def run_server(cfg, host: str, port: int, address: str | None = None) -> None:
    """Start Ray (or join `address`), Serve on host:port and the app; block until SIGINT/SIGTERM."""
    import socket

    with socket.socket() as s:  # a taken port: say so now (Serve would fail after starting everything)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serve.app import build_app, cpus_needed

    t0 = time.perf_counter()
    try:
        if address:
            from lucid.ray_client import ray_auth

            ray_auth()
            ctx = ray.init(address=address, log_to_driver=False)
        else:
            ctx = ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=cfg.evals,
                dashboard_host="127.0.0.1",
                log_to_driver=False,
            )
    except Exception as e:  # Ray's own refusal (an unreachable address, an auth token it cannot read, ...)
        from lucid.ray_client import ray_refusal

        raise InputError(ray_refusal(e, address)) from None
    stop = threading.Event()
    try:
        have = ray.cluster_resources().get("CPU", 0)
        need = cpus_needed(cfg)
        if need > have + 1e-9:
            raise InputError(
                f"the service needs {need:g} CPUs (vlm {cfg.vlm_replicas} x {cfg.vlm_cpus:g}, sam {cfg.sam_replicas} "
                f"x {cfg.sam_cpus:g}, ingress {cfg.ingress_cpus:g}) but the Ray cluster has {have:g}; "
                "lower the replicas or CPUs per replica in the config"
            )
        if cfg.evals and cfg.dashboard_address is None and getattr(ctx, "dashboard_url", None):
            cfg = cfg.model_copy(update={"dashboard_address": f"http://{ctx.dashboard_url}"})
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            build_app(cfg),
            name="lucid",
            route_prefix="/",
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        url = f"http://{host}:{port}"
        typer.echo(auth_line(cfg, host), err=True)
        typer.echo(f"lucid serve: ready at {url} ({time.perf_counter() - t0:.1f} s; Ctrl-C stops)", err=True)
        typer.echo(url)
        sys.stdout.flush()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            stop.wait(0.5)
        typer.echo(
            f"lucid serve: stopping: in-flight requests may finish (up to {cfg.drain_timeout_s:g} s, drain_timeout_s)",
            err=True,
        )
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM (or Ctrl-C) while draining ends it now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not address:
            t = time.perf_counter()
            serve.shutdown()  # each replica stops taking requests and finishes those it has (graceful shutdown)
            typer.echo(f"lucid serve: drained in {time.perf_counter() - t:.1f} s", err=True)
    finally:
        if address:
            try:
                serve.delete("lucid")
            except Exception:
                pass
        ray.shutdown()
