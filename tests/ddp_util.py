"""Launch a script on 2 gloo ranks with torchrun (tests comparing DDP with a single process)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: Path, *args: str, timeout: float = 120) -> None:
    """``torchrun --nproc_per_node 2 script *args`` on CPU; fails the test with the ranks' output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args],
        check=False, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ddp_and_single(script_text: str, tmp_path: Path, name: str = "ddp_script.py") -> tuple[dict, list[dict], object]:
    """Run ``script_text`` (a file defining ``run(out_dir)`` and calling it under torchrun) on 2 gloo ranks and
    in this process; assert the two final models agree (atol 1e-5). Returns (the DDP run's weights, its
    ``log.jsonl`` records, the single-process ``run`` result)."""
    import json
    import runpy

    import torch
    from safetensors.torch import load_file

    script = tmp_path / name
    script.write_text(script_text)
    run_two_ranks(script, str(tmp_path / "ddp"))
    single = runpy.run_path(str(script))["run"](tmp_path / "single")
    weights = load_file(tmp_path / "ddp" / "model.safetensors")
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-5, msg=f"{k} differs")
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    return weights, log, single
