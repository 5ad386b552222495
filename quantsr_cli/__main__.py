"""``python -m quantsr_cli`` runs the ``quantsr`` command line."""

from quantsr_cli.cli.app import main

if __name__ == "__main__":
    main()
