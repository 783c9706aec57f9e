"""``python3 -m perfagent``: the command line."""

from perfagent.cli import entry

if __name__ == "__main__":
    entry()
