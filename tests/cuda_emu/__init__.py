"""A CPU emulation of the CUDA execution model, owned by the project's tests (see launcher.py)."""
from .launcher import SCHEDULES, EmuError, EmuLauncher, EmuModule

__all__ = ["SCHEDULES", "EmuError", "EmuLauncher", "EmuModule"]
