"""The `mdm` command."""

import typer

app = typer.Typer()


@app.command()
def version() -> None:
    """Print the version."""
    from mdm_pipeline import __version__

    typer.echo(__version__)


def main() -> None:
    """Entry point of the console script."""
    app()
