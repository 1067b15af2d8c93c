"""YouTube-VIS / OVIS evaluation: the official video AP/AR (fast), HOTA, results files.

Nothing here imports torch: a results file can be scored on a machine without it.
"""

from visstg.eval.results import (
    EvalInputError,
    load_gt,
    load_results,
    make_submission_zip,
    tracks_to_results,
    write_results,
)
from visstg.eval.table import format_table
from visstg.eval.ytvis_eval import STAT_KEYS, evaluate


def hota(gt, results):
    """HOTA/DetA/AssA via trackeval; see
    :func:`visstg.eval.trackeval_hota.hota` (imported lazily)."""
    from visstg.eval.trackeval_hota import hota as _hota

    return _hota(gt, results)


def hota_reference(gt, results):
    """The same through trackeval's YouTubeVIS dataset class; see
    :mod:`visstg.eval.trackeval_hota`."""
    from visstg.eval.trackeval_hota import hota_reference as _hota_reference

    return _hota_reference(gt, results)


__all__ = [
    "STAT_KEYS",
    "EvalInputError",
    "evaluate",
    "format_table",
    "hota",
    "hota_reference",
    "load_gt",
    "load_results",
    "make_submission_zip",
    "tracks_to_results",
    "write_results",
]
