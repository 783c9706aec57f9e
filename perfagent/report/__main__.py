"""``python3 -m perfagent.report FILE ...``: the report command on its own."""

import sys

from perfagent.report.command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
