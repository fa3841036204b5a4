"""The public name of the task API: ``from capsule_kernel.tasks import task, envelope, TaskFailed``.

Runs in the notebook's sandbox; defined in inside/tasks.py, where the rest of the
sandbox's code lives. This alias keeps the name users import.
"""

from capsule_kernel.inside.tasks import TaskFailed, TaskFunction, TaskHandle, envelope, task

__all__ = ["TaskFailed", "TaskFunction", "TaskHandle", "envelope", "task"]
