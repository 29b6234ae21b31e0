"""``wsicell validate``: check a cell store, and with ``--deep`` read every chunk of it."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("store", type=click.Path())
@click.option("--deep", is_flag=True,
              help="Read every chunk of every array: finds missing, corrupted (checksum) and "
              "undecodable chunks, not only a wrong layout.")
def validate(store, deep):
    """Check STORE against its schemas and report what is damaged and which slides are
    still good. Exits 0 when the store is valid, 1 when a problem was found."""
    from wsicell.io.store import check_store

    report = check_store(store, deep=deep)
    problems = [p for found in report.values() for p in found]
    for problem in problems:
        click.echo(problem)
    slides = [s for s in report if s]
    good = [s for s in slides if not report[s]]
    damaged = [s for s in slides if report[s]]
    checked = "every chunk read" if deep else "layout only; --deep reads every chunk"
    if not problems:
        click.echo(f"{store}: valid, {len(slides)} slide(s) ({checked})")
        return
    click.echo(f"{store}: {len(problems)} problem(s) ({checked}); damaged: "
               f"{', '.join(damaged) or 'none'}; still good: {', '.join(good) or 'none'}")
    sys.exit(1)
