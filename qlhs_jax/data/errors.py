"""Exceptions of the input pipeline. Catch :class:`DataError` to catch them all."""

from __future__ import annotations


class DataError(Exception):
  """Base class of every error the input pipeline raises on bad data or config."""


class DatasetNotFoundError(DataError, FileNotFoundError):
  """The dataset is not where the config says; the message says how to prepare it."""


class InvalidDataError(DataError, ValueError):
  """The data are there but wrong: unknown class id, malformed folder, bad image."""
