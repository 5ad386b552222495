"""Command line of quantsr (Typer). ``app.py`` registers one thin module per command."""
