"""`orchestra-route versions_file=versions.yaml [port=8080 api_keys_file=keys.txt state_path=ab.json]`.

Runs the A/B router (orchestra/serve/router.py) in front of the model versions listed in the
routing table. SIGHUP re-reads the table (a bad one is refused, the old one keeps serving);
SIGTERM (or Ctrl-C) stops accepting, lets the requests in flight finish for up to
``shutdown_grace_s``, saves the comparison state and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import ConfigError, RouteConfig, register_configs

register_configs()


def route(cfg: RouteConfig) -> None:
    """Serve until SIGTERM / SIGINT; SIGHUP reloads the routing table."""
    import uvicorn

    from orchestra.serve.router import create_router_app

    app = create_router_app(cfg)
    router = app.state.router

    class Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own re-raises SIGTERM after the drain, so the process would die of it;
            # a drained router exits 0. SIGHUP runs the reload on the event loop, between requests.
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, router.reload_logged)
            try:
                yield
            finally:
                loop.remove_signal_handler(signal.SIGHUP)
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(cfg.shutdown_grace_s)),
    )
    versions = ", ".join(
        f"{v.name} (shadow)" if v.shadow else f"{v.name}={v.weight:g}" for v in router.table.versions
    )
    console.print(
        f"routing http://{cfg.host}:{cfg.port}/v1 to {versions}; control {router.control}; "
        f"dashboard http://{cfg.host}:{cfg.port}/dashboard",
        highlight=False,
        soft_wrap=True,
    )
    Uvicorn(config).run()


@hydra.main(config_path=CONF_DIR, config_name="route", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    config: RouteConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        route(config)
    except (ConfigError, OSError, ValueError) as err:
        fail(str(err))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
