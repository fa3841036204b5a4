"""The tasks' durable side: each key's HMAC-authenticated record (tasks.sqlite), scoped to the notebook.

A part of TaskScheduler (a mixin over its state: records, controller). A key
is scoped to the notebook (scope()), so two notebooks on one CAPSULE_HOME never
share a record.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from capsule_kernel.kernel.checkpoint.rows import CheckpointRefused
from capsule_kernel.kernel.checkpoint.task_records import TaskRecord
from capsule_kernel.kernel.tasks.runs import (
    TaskRun,
)

if TYPE_CHECKING:
    pass


class TaskBook:
    """Task records: read, written, scoped to this notebook."""

    def _result_bytes(self, run: TaskRun) -> bytes | None:
        """A finished run's result bytes: held until saved, then read back from task-results/ when asked."""
        if run.outcome is not None and run.outcome.pickled is not None:
            return run.outcome.pickled
        if run.result_digest is None or self.records is None:
            return None
        try:
            return self.records.load_result(run.result_digest)
        except (OSError, CheckpointRefused) as err:
            self.controller.relay.note(f"Capsule: the result of task {run.name} cannot be read back: {err}\n")
            return None

    def scope(self) -> str:
        """The view a task's record belongs to: a record answers (or is replaced) only within it."""
        controller = self.controller
        view = {
            "notebook": controller.notebook,
            "session": controller.session_name,
            "cwd": os.getcwd(),
            "mounts": controller.mounts,
            "fs_access": controller.policy.settings.fs_access,
            "ceiling": controller.policy.ceiling.to_json(),
        }
        return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()

    def _record(self, key: str) -> TaskRecord | None:
        if self.records is None:
            return None
        try:
            return self.records.get(key)
        except CheckpointRefused as err:
            self.controller.relay.note(f"Capsule: {err}\n")
            return None

    def _save(self, run: TaskRun, state: str, **extra: Any) -> bool:
        """Write the run's record (a spilled run's spec, code included, stays as stored); True if written."""
        if self.records is None:
            return False
        try:
            self.records.put(
                run.key,
                session=self.controller.session_name,
                name=run.name,
                state=state,
                kernel=self.controller.kernel_id,
                spec=None if run.spilled else run.spec.to_json(),
                **extra,
            )
        except Exception as err:  # noqa: BLE001 - bookkeeping must never cost the task
            self.controller.log.warning("task record %s not written: %s", run.name, err)
            return False
        return True

    def interrupted(self) -> list[TaskRecord]:
        """Tasks of this session that a kernel now gone left unfinished."""
        if self.records is None:
            return []
        kernel = self.controller.kernel_id
        records = self.records.of_session(self.controller.session_name)
        return [record for record in records if record.shown_state(kernel) == "interrupted"]
