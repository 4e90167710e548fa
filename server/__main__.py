"""`python -m retd.server [flags]` is `retd serve [flags]`."""

import sys

from retd.server.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
