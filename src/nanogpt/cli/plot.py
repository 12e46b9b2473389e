"""`nanogpt-plot`: train/val loss (and lr) against tokens from one or more runs' metrics.csv.

    nanogpt-plot out-shakespeare-char-cpu -o loss.png
    nanogpt-plot out-a out-b/metrics.csv --x step --no-lr -o compare.png
"""

from __future__ import annotations

import argparse

from nanogpt.cli import report_user_errors
from nanogpt.plot import plot_runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanogpt-plot", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("runs", nargs="+", help="out_dir folders (metrics.csv from logger=[csv]) or CSV files")
    p.add_argument("-o", "--output", default="loss.png", help="the PNG to write (default: loss.png)")
    p.add_argument("--x", choices=("tokens", "step"), default="tokens", help="the x axis (default: tokens)")
    p.add_argument("--no-lr", action="store_true", help="leave out the learning-rate panel")
    return p.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = plot_runs(args.runs, args.output, x=args.x, lr=not args.no_lr)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
