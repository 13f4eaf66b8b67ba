"""The ``attnzoo`` command.

    attnzoo list [--json | --markdown [--update README.md]] [--family F] [--kind K]
    attnzoo info NAME [--json]
    attnzoo bench [--quick | --full] [options]        # run the benchmark (quick by default)
    attnzoo bench real [--quick] [options]             # training-free mechanisms in real pretrained models
    attnzoo bench reduce [--quick] [options]           # token reduction at equal budgets (attnzoo.bench.reduce)
    attnzoo bench report RESULTS [--out DIR]           # re-render summary.md, plots, report.html
    attnzoo bench compare A B [--threshold 1.2]        # what changed between two runs
    attnzoo bench readme RESULTS... --update README.md # the README's generated headline block

``python -m attnzoo`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import registry
from .errors import AttnzooError

MECH_START, MECH_END = "<!-- mechanisms:start -->", "<!-- mechanisms:end -->"


# --------------------------------------------------------------------------------------------------------
# list / info
# --------------------------------------------------------------------------------------------------------
def _paper_cell(m: registry.Mechanism) -> str:
    title = m.title.replace("|", "\\|")
    if m.arxiv and m.arxiv[0].isdigit():
        return f"{title} ([arXiv {m.arxiv}](https://arxiv.org/abs/{m.arxiv}))"
    return title


def mechanism_table(mechs: Sequence[registry.Mechanism] | None = None) -> str:
    """The Markdown table of the registry that README.md carries between the mechanisms markers.

    Columns: name, family, kind, paper + arXiv link, patterns, exact, decode state, forms, complexity.
    Generated from the records only, so a drift test can compare it with the README.
    """
    mechs = registry.mechanisms() if mechs is None else mechs
    head = ["name", "family", "kind", "paper", "patterns", "exact", "decode state", "forms", "complexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in mechs:
        cells = [f"`{m.name}`", m.family, m.kind, _paper_cell(m), ", ".join(m.patterns), "yes" if m.exact else "no",
                 m.state or "—", ", ".join(m.forms()), m.complexity.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cmd_list(args: argparse.Namespace) -> int:
    mechs = registry.mechanisms(family=args.family, kind=args.kind)
    if args.update and not args.markdown:
        raise AttnzooError("--update: only with --markdown (it writes the Markdown table into the file)")
    if args.json:
        print(json.dumps([m.as_dict() for m in mechs], indent=1))
    elif args.markdown:
        table = mechanism_table(mechs)
        if args.update:
            from .bench.report import update_block

            changed = update_block(args.update, MECH_START, MECH_END, table)
            print(f"{args.update}: mechanism table {'updated' if changed else 'already up to date'} "
                  f"({len(mechs)} mechanisms)")
        else:
            sys.stdout.write(table)
    else:
        width = max([len(m.name) for m in mechs] + [4])
        print(f"{'name'.ljust(width)}  {'family':8} {'kind':8} {'exact':5}  {'state':12} patterns")
        for m in mechs:
            print(f"{m.name.ljust(width)}  {m.family:8} {m.kind:8} {'yes' if m.exact else 'no':5}  "
                  f"{(m.state or '-'):12} {', '.join(m.patterns)}")
        print(f"\n{len(mechs)} mechanisms. `attnzoo info NAME` for one; `attnzoo bench --quick` to measure them.")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    m = registry.get(args.name)
    if args.json:
        print(json.dumps(m.as_dict(), indent=1))
        return 0
    d = m.as_dict()
    print(f"{m.name}" + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""))
    print(f"  {m.title}")
    if m.arxiv:
        print(f"  arXiv {m.arxiv}: https://arxiv.org/abs/{m.arxiv}")
    if m.code:
        print(f"  code: {m.code}")
    print(f"  {m.summary}")
    print(f"  family {m.family}, kind {m.kind}" + (f", catalog {m.catalog}" if m.catalog else ""))
    print(f"  patterns: {', '.join(m.patterns)}")
    print(f"  exact: {'yes' if m.exact else 'no'}; decode state: {m.state or 'none'}; forms: {', '.join(m.forms())}")
    print(f"  complexity: {m.complexity}")
    if d["options"]:
        print("  options:")
        for o in d["options"]:
            print(f"    {o['name']} = {o['default']!r}  ({o['valid']}){'  ' + o['doc'] if o['doc'] else ''}")
    if m.notes:
        print(f"  notes: {m.notes}")
    doc = mechanism_docstring(m)
    if doc:
        print("\n" + doc)
    return 0


def mechanism_docstring(m: registry.Mechanism) -> str:
    """The docstring of the file that defines ``m`` (paper, what it computes, choices made)."""
    import importlib
    import inspect

    fn = m.reference or m.module
    mod = importlib.import_module(fn.__module__) if fn is not None else None
    return inspect.cleandoc(mod.__doc__) if mod is not None and mod.__doc__ else ""


# --------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo", description="Attention mechanisms from the research literature "
                                "behind one contract, proven against an exact reference and measured beside "
                                "dense attention.")
    sub = p.add_subparsers(dest="cmd", metavar="{list,info,bench}")
    ls = sub.add_parser("list", help="the registered mechanisms")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="every record as JSON")
    fmt.add_argument("--markdown", action="store_true", help="the README table (Markdown)")
    ls.add_argument("--update", metavar="README", help="with --markdown: replace the table between "
                    f"{MECH_START} and {MECH_END} in this file")
    ls.add_argument("--family", help="only this family")
    ls.add_argument("--kind", help="only this kind (sequence, grid, channel, pooling, fusion)")
    info = sub.add_parser("info", help="one mechanism's record: paper, patterns, options")
    info.add_argument("name")
    info.add_argument("--json", action="store_true")
    sub.add_parser("bench", help="benchmark (see `attnzoo bench --help`)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            from .bench.cli import main as bench_main

            return bench_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.cmd == "list":
            return _cmd_list(args)
        if args.cmd == "info":
            return _cmd_info(args)
        _parser().print_help()
        return 0
    except (AttnzooError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        if os.environ.get("ATTNZOO_DEBUG"):
            raise
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `attnzoo list | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
