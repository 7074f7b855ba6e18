"""``python -m tinybn``: the command line, in :mod:`tinybn.app.cli`."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
