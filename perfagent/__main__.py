"""``python3 -m perfagent``: the command line."""

import sys

from perfagent.cli import main

if __name__ == "__main__":
    sys.exit(main())
