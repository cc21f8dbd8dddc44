"""``python -m steerflow`` runs the ``steerflow`` command line."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
