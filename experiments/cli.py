"""The command-line entry of every tool: absl's app.run with flag errors as one line.

A bad flag value (`--config.model.d_model=abc`), an unknown flag, or a config file that
fails to load (an unknown preset) prints one `error:` line and exits 2, instead of
absl's traceback and usage text.
"""

from __future__ import annotations

import sys

from absl import app, flags


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        where = lines[0].split(": Error whilst parsing config file")[0]
        why = lines[-1].split(": ", 1)[-1] if len(lines) > 1 else ""
        print(f"error: {where}{': ' + why if why else ''}", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """app.run(main) with parse_flags; main(argv) returns the exit status."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
