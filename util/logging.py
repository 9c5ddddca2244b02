"""Console logging and run provenance for the command-line tools (never used inside algorithms)."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message (it may be replaced, e.g. by pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str = "ld-smc", level: int = logging.INFO) -> logging.Logger:
    """A logger that prints `[time] message` to stderr once (repeated calls do not add handlers)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The project's git commit (with '-dirty' when tracked files changed), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_version() -> str:
    """The installed ld-smc version (ldm.__version__)."""
    import ldm

    return getattr(ldm, "__version__", "unknown")
