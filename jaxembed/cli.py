"""What every program's command line shares: flag style, ``--debug``, one-line errors, exit codes.

The programs (``python -m jaxembed.train | mine | evaluate | convert``, and the data tools)
build their parser with `parser` and run through `main`:

- flags are ``--words-with-hyphens``; ``--help`` lists what a user sets and the defaults;
- the multi-host flags (``--coordinator``, ``--num-processes``, ``--process-id``,
  ``--heartbeat-timeout``; `jaxembed.distributed`) are on every program that uses devices;
- bad input (a missing file, a malformed record, a bad config value) prints one line,
  ``error: <what is wrong, naming the file, line or key>``, on stderr and exits with
  `USAGE_ERROR`, argparse's own code for a bad flag; ``--debug`` shows the traceback instead.
- anything else is a bug or a crash: its traceback is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from jaxembed import distributed

USAGE_ERROR = 2
# What bad input raises: ValueError (and its subclasses: record, config, eval-data and
# model-folder errors), OSError (missing or unreadable files, FileExistsError), KeyError for
# a missing field; and FloatingPointError, a training run's non-finite loss (most often a
# learning rate too high for the data). Each carries a message that names what is wrong.
INPUT_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def parser(
    program: str, description: str, epilog: str | None = None, multihost: bool = True
) -> argparse.ArgumentParser:
    """The program's parser, with ``--debug`` and (``multihost``) the multi-host flags."""
    p = argparse.ArgumentParser(prog=f"python -m {program}", description=description, epilog=epilog)
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    if multihost:
        distributed.add_flags(p)
    return p


def error_message(e: BaseException) -> str:
    # KeyError's str() is the repr of the key; the others carry their message.
    return f"missing key {e.args[0]!r}" if isinstance(e, KeyError) and e.args else str(e)


def main(
    p: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    *,
    extra: bool = False,
):
    """Parses ``argv``, starts the multi-host runtime when asked, and returns ``run(args)``.

    ``extra``: arguments the parser does not know are left in ``args.extra`` for ``run``
    (``train``'s ``--config.KEY=VALUE`` overrides) instead of being an error.

    Bad input exits with one line and `USAGE_ERROR` (every host of a multi-host run meets
    the same input, so all stop alike); ``--debug`` re-raises it instead.
    """
    if extra:
        args, args.extra = p.parse_known_args(argv)
    else:
        args = p.parse_args(argv)
    if hasattr(args, "num_processes"):
        distributed.initialize_from_args(args)

    def guarded():
        try:
            return run(args)
        except INPUT_ERRORS as e:
            if args.debug:
                raise
            print(f"error: {error_message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(USAGE_ERROR) from None

    return distributed.run(guarded)
