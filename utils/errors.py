"""The one family of errors a user can act on: bad input, a run that cannot go on as asked.

Library code raises a ``UserError`` subclass whose message names the file or flag and what was
expected; the scripts' entry point (``cli.entry.run_main``) prints it as one ``error:`` line and
exits with status 2, as argparse does for a bad flag. Anything else is a bug and keeps its
traceback. No module below the scripts raises ``SystemExit``.
"""


class UserError(Exception):
    """An input or a run the user must change; the message is the whole story."""


class OptionError(UserError, ValueError):
    """Flags that contradict each other or this machine (checked before any work starts)."""


class WriteError(UserError, OSError):
    """The file system refused a write (a full disk, a quota, a read-only mount); the previous file
    of that name is left as it was."""
