"""The error of a flag whose value parsing alone could not judge (no imports: every module may raise it)."""


class UsageError(SystemExit):
    """A folder that holds a run, an output location that cannot be written, a device that is not
    there, a checkpoint of another input convention... ``utils.cli.run_main`` prints the message as one
    ``error:`` line and exits 2, as argparse does for a bad flag. A SystemExit, like argparse's own,
    so that a caller outside run_main (a test, a notebook) still stops with the message."""
