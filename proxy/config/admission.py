"""`[admission]`: how much work one proxy process takes on at once, in the unit that costs it memory (bytes), and
whether it gives memory back to the system after a burst (README "Overload and memory")."""

from __future__ import annotations

from dataclasses import dataclass

from .ranges import bounded


@dataclass(frozen=True)
class AdmissionSettings:
    # Bytes of request bodies being read plus answers being built or sent, per process, in MiB. Past it a request
    # waits up to wait_s for room, then gets 503 (code `overloaded`, Retry-After). A request larger than the whole
    # budget is served alone. 0: no budget (every request is admitted at once, as before). See README for sizing.
    budget_mb: int = bounded(160, 0)
    # How long a request may wait for room before it is refused (0: refused at once when there is none).
    wait_s: float = bounded(1.0, 0, 60)
    # The Retry-After of a refusal, in seconds.
    retry_after_s: int = bounded(1, 1, 3600)
    # After a burst (the budget's use fell below an eighth of its peak, and the peak was at least 32 MiB), give
    # the memory it freed back to the system (glibc's malloc_trim; nothing on other C libraries).
    return_memory: bool = True


# What a worker holds besides the budget, measured (README "Overload and memory", sizing): the process, its libraries
# and connections; the in-process tier per MiB of `cache.local_max_mb`; the requests per MiB of budget (allocator
# overhead included). And what `serve --workers N` adds once: its parent and multiprocessing's resource tracker.
WORKER_BASE_MIB = 110
LOCAL_TIER_FACTOR = 1.15
BUDGET_FACTOR = 1.1
SUPERVISOR_MIB = 82


def worker_ceiling_mib(local_max_mb: int, budget_mb: int) -> float:
    """The most a worker's RSS should reach with these settings."""
    return WORKER_BASE_MIB + LOCAL_TIER_FACTOR * local_max_mb + BUDGET_FACTOR * budget_mb


def container_memory_mib(workers: int, local_max_mb: int, budget_mb: int, metrics_dir_mib: float = 0) -> float:
    """The memory limit a container running `serve --workers N` needs (its metric files count when they live in
    memory, as on the shipped pod's emptyDir). One worker is the process itself: no supervisor."""
    supervisor = SUPERVISOR_MIB if workers > 1 else 0
    return supervisor + workers * worker_ceiling_mib(local_max_mb, budget_mb) + metrics_dir_mib
