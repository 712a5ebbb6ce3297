"""`orchestra-serve ckpt=PATH [port=8000 max_batch_size=16 api_keys_file=keys.txt engine=vllm]`.

Serves a training checkpoint (PEFT ones too), an exported folder or a Hugging Face folder
behind an OpenAI-compatible API (orchestra/serve/app.py) with continuous batching. SIGTERM (or
Ctrl-C) stops accepting, lets the requests in flight finish for up to ``shutdown_grace_s``, then
exits. ``engine=vllm`` runs `vllm serve` on the exported folder with the same settings instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import ConfigError, ServeConfig, ServeEngine, register_configs

register_configs()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def serving_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else the weights' fp32."""
    if choice == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[choice]


def build_server(cfg: ServeConfig) -> Any:
    """Load the model onto its device and dtype, and the Server around it."""
    from orchestra.serve.app import Server
    from orchestra.train.checkpoint.load import load_for_eval

    cfg.validate()
    device = serving_device(cfg.device)
    evaluated = load_for_eval(cfg.ckpt, device)
    evaluated.model.to(dtype=serving_dtype(cfg.dtype, device))
    if not cfg.model_name:
        cfg.model_name = Path(cfg.ckpt.rstrip("/")).stem or "model"
    return Server(cfg, evaluated)


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM / SIGINT (uvicorn's own handling: no new connections, drain)."""
    import uvicorn

    from orchestra.serve.app import create_app

    server = build_server(cfg)
    app = create_app(server)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server.shutting_down = True  # /ready turns 503 and new requests are refused at once
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own re-raises SIGTERM after the drain, so the process would die of it;
            # a drained server exits 0 (what Slurm and process supervisors read as a clean stop).
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(cfg.shutdown_grace_s)),
    )
    console.print(
        f"serving {server.model_name} (version {server.version}) on http://{cfg.host}:{cfg.port}/v1 "
        f"[{server.evaluated.kind}, context {server.context}, batch {cfg.max_batch_size}]",
        highlight=False,
        soft_wrap=True,
    )
    Uvicorn(config).run()


def vllm_folder(ckpt: str) -> Path:
    """The Hugging Face folder vLLM loads: ckpt itself, or its export beside it (made once)."""
    path = Path(ckpt)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"ckpt: {path} does not exist")
    out = path.parent / f"{path.stem}-hf"
    if not (out / "config.json").is_file():
        from orchestra.train.export import export_hf

        console.print(f"exporting {path} to {out} for vLLM", highlight=False)
        export_hf(path, out)
    return out


def vllm_command(cfg: ServeConfig, folder: Path, keys: list[str]) -> list[str]:
    """`vllm serve` with this config's settings (docs/serving.md lists the mapping)."""
    cmd = [
        "vllm", "serve", str(folder),
        "--served-model-name", cfg.model_name or folder.name,
        "--host", cfg.host,
        "--port", str(cfg.port),
        "--max-num-seqs", str(cfg.max_batch_size),
        "--seed", str(cfg.seed),
        "--dtype", "auto" if cfg.dtype == "auto" else cfg.dtype,
    ]  # fmt: skip
    if cfg.max_prompt_tokens is not None:
        cmd += ["--max-model-len", str(cfg.max_prompt_tokens + cfg.max_tokens_limit)]
    if keys:
        cmd += ["--api-key", *keys]
    return [*cmd, *cfg.vllm_args]


def serve_vllm(cfg: ServeConfig) -> int:
    """Run `vllm serve` in the foreground; SIGTERM reaches it through the process group."""
    from orchestra.serve.protocol import read_keys

    cfg.validate()
    if shutil.which("vllm") is None:
        raise ValueError(
            "engine=vllm: the `vllm` command is not installed (pip install vllm on a GPU machine)"
        )
    command = vllm_command(cfg, vllm_folder(cfg.ckpt), read_keys(cfg.api_keys_file))
    console.print(" ".join(command), highlight=False, soft_wrap=True)
    return subprocess.call(command, env=os.environ.copy())


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from orchestra.train.checkpoint import CheckpointError

    config: ServeConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        if config.engine == ServeEngine.vllm:
            sys.exit(serve_vllm(config))
        serve(config)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
