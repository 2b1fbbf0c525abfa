"""The scripts' entry point: a bad dataset, checkpoint or run ends with one clear paragraph.

``run_main(main, get_args)`` parses the command line and calls ``main(args)``. The errors that
describe a user's input or a run that cannot go on (``DatasetError``, ``CheckpointError``,
``TrainingError``, ``UsageError``) print ``error: <message>`` on stderr and exit with ``EXIT_USER_ERROR``
instead of a traceback; anything else is a bug and keeps its traceback. A second Ctrl-C (the
trainer's first one saves and stops cleanly) exits with 130 and one line.
"""
import re
import sys

from dataset.common import DatasetError
from utils.checkpoint import CheckpointError
from utils.errors import UsageError
from utils.trainer import TrainingError

EXIT_USER_ERROR = 2  # as argparse exits on a bad flag
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def user_errors():
    """The exception types whose message is the whole story for the user."""
    errors = [DatasetError, CheckpointError, TrainingError, UsageError]
    try:  # pseudo-label folders that cannot be resumed or read
        from utils.pseudolabels import PseudoLabelError
        errors.append(PseudoLabelError)
    except ImportError:
        pass
    return tuple(errors)

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
    except user_errors() as error:
        print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
