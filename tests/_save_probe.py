"""What tests/test_faults.py runs in each of its spawned processes: kept
apart from the test module so that a worker imports only the save-folder
check, not the trainer and Composer (four such imports at once on two cores
were slow, and one worker once hung in them)."""

from __future__ import annotations


def probe_many(folder: str, n: int) -> str | None:
    """``n`` save-folder checks of ``folder``, as one rank makes them: the
    first error's message, or None."""
    from types import SimpleNamespace

    from mixattn.config import ConfigError
    from mixattn.training.save import check_save_folder

    cfg = SimpleNamespace(save_folder=folder, run_name="r")
    try:
        for _ in range(n):
            check_save_folder(cfg, 0)
    except ConfigError as e:
        return str(e)
    return None
