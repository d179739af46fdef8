"""A fix for a deadlock in Ray 2.60 between Ray Train V2 and Ray Tune: a trial's last report must not wait
behind the end of its own training function.

A Tune function trial that runs a Train V2 ``TorchTrainer`` gets its reports through
``TuneReportCallback``. The Train controller (an actor of its own) puts each report into a one-slot actor
queue; the trial's main thread takes it out when Tune asks for the next result and hands it on through the
trial's one-slot ``result_queue`` (``ray.train._internal.session._TrainSession._get_result_from_queues``).

When Tune is slow to ask for the next result (its callbacks are still logging the previous one, e.g. to a
busy MLflow tracking server), the controller's last report waits in the actor queue, ``fit()`` returns,
and the trial function's thread puts Tune's end-of-function marker (``RESULT_DUPLICATE``) into
``result_queue``. When Tune asks again, the main thread takes the last report and blocks forever putting
it into the full ``result_queue``: only the main thread empties that queue. The trial stays ``RUNNING`` and
the sweep never ends. ``tests/integration/test_tracking_server.py::
test_a_sweep_records_every_trial_on_the_server_and_a_slow_driver_loses_no_report`` reproduces it with a
driver callback that sleeps on the first result.

The fix: the main thread returns a report from the actor queue as the result itself, doing what
``_TrainSession.report`` does to it (the auto-filled metrics, the artifact sync) but never queueing it.
The order is kept (the actor queue is read first), and the end marker is returned on the next call.
"""

from __future__ import annotations

import queue
from typing import Any

_PATCHED = "_raypeft_reports_in_order"


def deliver_train_reports_in_order() -> bool:
    """Patch this process's Tune session (the trial's) once; returns False, patching nothing, where the Ray
    internals this relies on are not the ones it was written for (then Ray's own code runs unchanged)."""
    from ray.train._internal import session as train_session

    cls = train_session._TrainSession
    if getattr(cls._get_result_from_queues, _PATCHED, False):
        return True
    # the original reads the actor queue, hands its item to report(), then reads result_queue
    original = set(cls._get_result_from_queues.__code__.co_names)
    known = {"_inter_actor_queue", "report", "result_queue"} <= original
    if not known or not all(hasattr(cls, name) for name in ("_auto_fill_metrics", "report")):
        return False

    def get_result_from_queues(self, block: bool):
        from ray.air.constants import _RESULT_FETCH_TIMEOUT
        from ray.util import queue as ray_queue

        if self._inter_actor_queue is not None:
            try:
                item = self._inter_actor_queue.get(block=block, timeout=_RESULT_FETCH_TIMEOUT)
            except ray_queue.Empty:
                item = None
            if item:
                return _as_result(self, item)
        try:
            return self.result_queue.get(block=block, timeout=_RESULT_FETCH_TIMEOUT)
        except queue.Empty:
            return None

    setattr(get_result_from_queues, _PATCHED, True)
    cls._get_result_from_queues = get_result_from_queues
    return True


def _as_result(session: Any, metrics: dict[str, Any]):
    """What ``_TrainSession.report(metrics)`` would queue, for a report with no checkpoint object (a Train
    report's checkpoint travels as its path, in the metrics)."""
    from ray.train._internal.session import _TrainingResult
    from ray.train.constants import CHECKPOINT_DIR_NAME

    if session.ignore_report:
        return None
    metrics = session._auto_fill_metrics(metrics)
    metrics[CHECKPOINT_DIR_NAME] = None
    session.storage.persist_artifacts(force=False)
    return _TrainingResult(checkpoint=None, metrics=metrics)
