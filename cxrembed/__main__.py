"""``python -m cxrembed`` runs the command line."""

from cxrembed.cli import main

if __name__ == "__main__":
    main()
