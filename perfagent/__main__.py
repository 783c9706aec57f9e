"""``python3 -m perfagent``: the command line."""

if __name__ == "__main__":
    # No cycle collection while the command line's modules load (cli.entry
    # turns it back on, and main() sets its threshold): importing ran ten
    # collections over the new modules' objects, 3 ms of a capture's CPU.
    import gc
    gc.disable()
    from perfagent.cli import entry
    entry()
