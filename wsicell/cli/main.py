"""The ``wsicell`` console script: a click group whose sub-commands live beside it.

Commands only parse arguments and call the library.  A :class:`~wsicell.errors.WsicellError`
raised anywhere below becomes one line on stderr and exit code 2.  Each command's module is
imported only when that command runs (or ``--help`` lists them), so starting the console
script costs click and nothing of the pipeline.
"""

import sys
import warnings
from importlib import import_module

import click

from wsicell import __version__
from wsicell.errors import EXIT_BAD_INPUT, WsicellError

#: Sub-commands in the order of the pipeline: name -> "module:attribute".
COMMANDS = {
    "ingest": "wsicell.cli.ingest:ingest",
    "train": "wsicell.cli.train:train",
    "predict": "wsicell.cli.predict:predict",
    "export": "wsicell.cli.export:export",
    "validate": "wsicell.cli.validate:validate",
    "segment": "wsicell.cli.segment:segment",
    "evaluate": "wsicell.cli.evaluate:evaluate",
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsicell")
def cli():
    """Unsupervised cell-level analysis of whole-slide H&E images.

    ingest slides -> train a GAN on the cells -> predict cell types and slide classes.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"wsicell: warning: {message}", err=True)


def usage_error(err: click.UsageError) -> str:
    """A refused command line as one line: the command, the option and the problem.

    Examples
    --------
    >>> usage_error(click.UsageError("Missing option '--out'."))
    "Missing option '--out'."
    """
    command = err.ctx.command_path.removeprefix("wsicell").strip() if err.ctx else ""
    message = " ".join(err.format_message().split())
    return f"{command}: {message}" if command else message


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
    except click.UsageError as err:  # a refused option or argument: one line, no usage text
        click.echo(f"wsicell: error: {usage_error(err)}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
