"""How the CLI prints tables: at their natural width, never cut into ellipses.

rich sizes a table to the terminal, and to 80 columns when stdout is a pipe or a file, so a
script that reads ``moerge experts list | grep …`` would get "ada…" for "adapter". Printing at
the table's own width keeps every cell whole (a narrow terminal wraps the lines instead).
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

console = Console()


def print_table(table: Table) -> None:
    width = Measurement.get(console, console.options.update_width(1000), table).maximum
    Console(width=max(console.width, width)).print(table)
