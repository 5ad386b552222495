"""Engine: the one training loop and a ``run_*`` function per command.

The command-line files in :mod:`quantsr_cli.cli` parse options and call these functions; everything
they compute is returned as plain data, and progress is reported through an ``on_event`` callback so
the engine never prints or imports a UI library.
"""
