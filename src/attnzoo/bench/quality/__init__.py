"""Quality: tiny models trained on CPU on generated tasks, real English text and real 8x8 digits."""

from .tasks import CONFIGS, TASKS, Task, make_task
from .train import NO_ATTENTION, applicability, train_case

__all__ = ["CONFIGS", "TASKS", "Task", "make_task", "NO_ATTENTION", "applicability", "train_case"]
