"""The scripts' entry point: a bad dataset, checkpoint, flag or run ends with one clear line.

``run_main(main, get_args)`` parses the command line and calls ``main(args)``. Every error that
describes a user's input or a run that cannot go on is a ``utils.errors.UserError`` (dataset,
checkpoint, option, training and pseudo-label errors alike): it prints ``error: <message>`` on
stderr and exits with ``EXIT_USER_ERROR`` instead of a traceback; anything else is a bug and keeps
its traceback. A second Ctrl-C (the trainer's first one saves and stops cleanly) exits with 130 and
one line.
"""
import re
import sys

from utils.errors import UserError

EXIT_USER_ERROR = 2  # as argparse exits on a bad flag
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

# A DataLoader worker's exception comes back as "Caught DatasetError in DataLoader worker process
# 0.\nOriginal Traceback (most recent call last):\n ... \ndataset.common.DatasetError: <message>".
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback", re.S)


def error_message(error):
    """The user-facing paragraph of ``error``, without a DataLoader worker's traceback."""
    text = str(error)
    if _WORKER_TRACEBACK.match(text):
        marker = f"{type(error).__name__}: "
        text = text[text.rfind(marker) + len(marker):] if marker in text else text.splitlines()[-1]
    return " ".join(text.split())


def run_main(main, get_args, argv=None):
    """``main(get_args(argv))`` with clean exits for user errors; use under ``__main__``."""
    args = get_args(argv)
    try:
        return main(args)
    except UserError as error:
        print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
