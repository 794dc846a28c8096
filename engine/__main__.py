"""``python -m engine`` runs the same CLI as the ``engine`` console script."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
