"""Inner tasks: the problems learned optimizers train on."""
from mnemosyne_core.tasks.base import (
    TASKS,
    Task,
    TaskFamily,
    TaskSpec,
    UnknownTaskError,
    make_task,
    register_task,
)

__all__ = ["TASKS", "Task", "TaskFamily", "TaskSpec", "UnknownTaskError", "make_task", "register_task"]
