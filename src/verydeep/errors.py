"""Errors meant for the person running verydeep: bad options, files, data or disks.

They are raised where input is checked and carry one line that names the option or file;
``verydeep.cli.main`` prints that line and exits with status 2. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad option, file or dataset; the message is one line naming it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a run needs) does not exist."""
