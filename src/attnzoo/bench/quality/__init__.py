"""Quality: tiny models trained on CPU on generated tasks, real English text and real 8x8 digits."""

from .protocol import STUDIES, Study, studies
from .tasks import TASKS, Task, make_task
from .train import NO_ATTENTION, applicability, train_case

__all__ = ["STUDIES", "Study", "studies", "TASKS", "Task", "make_task", "NO_ATTENTION", "applicability", "train_case"]
