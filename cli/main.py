"""The ``wsicell`` console script: a click group whose sub-commands live beside it.

Commands only parse arguments and call the library.  A :class:`~wsicell.errors.WsicellError`
raised anywhere below becomes one line on stderr and exit code 2.
"""

import sys
import warnings

import click

from wsicell import __version__
from wsicell.errors import EXIT_BAD_INPUT, WsicellError
from wsicell.cli.evaluate import evaluate
from wsicell.cli.segment import segment
from wsicell.cli.train import train
from wsicell.cli.ingest import ingest
from wsicell.cli.export import export
from wsicell.cli.predict import predict


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsicell")
def cli():
    """Unsupervised cell-level analysis of whole-slide H&E images.

    ingest slides -> train a GAN on the cells -> predict cell types and slide classes.
    """


cli.add_command(segment)
cli.add_command(evaluate)
cli.add_command(train)
cli.add_command(predict)
cli.add_command(ingest)
cli.add_command(export)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"wsicell: warning: {message}", err=True)


def main(argv=None):
    """Run the command line; turn user errors into one line and a non-zero exit code."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("once", UserWarning)
    try:
        cli.main(args=argv, prog_name="wsicell", standalone_mode=False)
    except WsicellError as err:
        click.echo(f"wsicell: error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Abort:
        click.echo("wsicell: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
