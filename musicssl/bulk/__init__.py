"""Bulk extraction: `musicssl.extract()` and `musicssl embed` over whole collections (see run.py)."""

from musicssl.bulk.run import ExtractResult, extract

__all__ = ["ExtractResult", "extract"]
