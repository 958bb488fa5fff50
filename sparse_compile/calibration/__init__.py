"""Calibration: tune what a method declares (`Method.knobs`) on real text and write a policy
(`python -m sparse_compile calibrate`); the harness is `sparse_compile.calibration.harness`."""

from sparse_compile.calibration.harness import (
    COMMON_OPTIONS,
    add_common_arguments,
    available,
    calibratable,
    calibration_parser,
    run_calibration,
    wants_generic,
)

__all__ = ["COMMON_OPTIONS", "add_common_arguments", "available", "calibratable", "calibration_parser",
           "run_calibration", "wants_generic"]
