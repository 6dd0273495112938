"""`python -m fedad.report`: tables (tables), markdown (markdown) and figures (figures) of runs."""

from fedad.report.tables import collect, summarize

__all__ = ["collect", "summarize"]
