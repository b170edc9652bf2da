"""Backdoor removal by unlearning (DBS Section 3.2.3, Eq. 6, and past it): the flow in
:mod:`trojscan.repair.core`, its settings in :mod:`trojscan.repair.base`, one
:class:`~trojscan.repair.base.RepairTask` per kind of model beside them."""

from trojscan.repair.base import RepairConfig, RepairTask, Unlearned
from trojscan.repair.core import (
    REPORT_FILE,
    REPORT_VERSION,
    best_epoch,
    check_scan,
    is_residual,
    neighbour_triggers,
    read_scan,
    read_truth,
    repair,
    scan_triggers,
)

__all__ = ["REPORT_FILE", "REPORT_VERSION", "RepairConfig", "RepairTask", "Unlearned",
           "best_epoch", "check_scan", "is_residual", "neighbour_triggers", "read_scan",
           "read_truth", "repair", "scan_triggers"]
