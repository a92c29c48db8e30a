"""Results of a domain stream: the row and summary schema, rich tables, atomic CSV/JSON writers and the accuracy plot.

One module per concern (:mod:`~zoa_lightning.reporting.schema`, :mod:`~zoa_lightning.reporting.tables`,
:mod:`~zoa_lightning.reporting.writers`, :mod:`~zoa_lightning.reporting.plot`); pure Python, rich and matplotlib, no
Lightning: :class:`callbacks.ResultsCallback` writes one run's files through
:func:`write_results`, ``zoa compare`` reads them back and writes the side-by-side report through
:func:`write_comparison`. The schema is two dataclasses: :class:`DomainRow` (one finished domain) and
:class:`RunSummary` (one run); the column tuples below are derived from their fields, so a column is named once.

Files of one run (:data:`RESULT_FILES`)::

    results.json   {"summary": RunSummary, "domains": [DomainRow, ...]}
    results.csv    one DomainRow per line plus the run-constant method, model, bits columns
    accuracy.png   per-domain top-1 across the stream, the mean dashed

Files of a comparison (:data:`COMPARISON_FILES`): ``comparison.md``, ``comparison.csv``, ``comparison.png``.
"""

from zoa_lightning.reporting.plot import plot_accuracy
from zoa_lightning.reporting.schema import (
    COMPARISON_COLUMNS,
    ROW_COLUMNS,
    RUN_COLUMNS,
    SUMMARY_KEYS,
    DomainRow,
    RunSummary,
    mean_of,
    summarize,
)
from zoa_lightning.reporting.tables import comparison_table, results_table
from zoa_lightning.reporting.writers import COMPARISON_FILES, RESULT_FILES, write_comparison, write_results

__all__ = [
    "COMPARISON_COLUMNS",
    "COMPARISON_FILES",
    "RESULT_FILES",
    "ROW_COLUMNS",
    "RUN_COLUMNS",
    "SUMMARY_KEYS",
    "DomainRow",
    "RunSummary",
    "comparison_table",
    "mean_of",
    "plot_accuracy",
    "results_table",
    "summarize",
    "write_comparison",
    "write_results",
]
