"""``python -m modelcd.scoring``: run the scoring server (see ``server.py``)."""

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
