"""``lrscope check LOGDIR``: what is wrong with a run, in words, from its lrscope logs.

Reads ``lrscope.jsonl`` (or TensorBoard event files), runs every rule over the steps and
prints each finding: its id and severity, the tensors or groups it concerns with the
steps where it holds, and the explanation.  Exit code 0 without warnings, 1 with at least
one, 2 for bad input; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import defaultdict
from typing import Any

from lrscope.findings.checker import RULES, Checker
from lrscope.findings.core import Finding

#: Subjects listed per rule in the text output (``--json`` lists all).
SHOWN_SUBJECTS = 12
_WIDTH = 100


def check(log_dir: str, ignore: list[str] | None = None) -> tuple[Any, list[Finding]]:
    """The source read and every finding of the run in ``log_dir``."""
    from lrscope.findings import sources

    source = sources.read(log_dir)
    checker = Checker(ignore or ())
    for step in source.steps:
        checker.feed(step)
    checker.finish()
    return source, checker.findings


def format_text(source: Any, findings: list[Finding]) -> str:
    """The report ``lrscope check`` prints."""
    prefixes = sorted({step.prefix for step in source.steps})
    ts = [step.t for step in source.steps]
    lines = [f"lrscope check: {source.description}: {', '.join(prefixes)}, steps {min(ts)}-{max(ts)}"]
    lines += [f"note: {note}" for note in source.notes]
    warnings = sum(f.severity == "warning" for f in findings)
    infos = len(findings) - warnings
    by_rule: dict[str, list[Finding]] = defaultdict(list)
    for finding in findings:
        by_rule[finding.id].append(finding)
    for rule_id, found in by_rule.items():
        rule = RULES.get(rule_id)
        title = rule.title if rule else ""
        lines += ["", f"{found[0].severity.upper()} {rule_id}: {title}"]
        for finding in found[:SHOWN_SUBJECTS]:
            lines.append(f"  {finding.subject} (steps {finding.steps_text()}): {finding.message}")
        if len(found) > SHOWN_SUBJECTS:
            lines.append(f"  ... and {len(found) - SHOWN_SUBJECTS} more (--json lists them all)")
        lines += _wrap(found[0].explanation, "  What it means: ")
        if rule is not None:
            lines += _wrap(rule.threshold, "  Threshold: ")
    lines += ["", f"{_count(warnings, 'warning')}, {_count(infos, 'info')}"
              + ("" if warnings else ": nothing wrong found")]
    return "\n".join(lines)


def _wrap(text: str, first: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 and what != 'info' else ''}"


def format_json(source: Any, findings: list[Finding]) -> str:
    ts = [step.t for step in source.steps]
    return json.dumps({
        "source": source.description, "notes": source.notes,
        "optimizers": sorted({step.prefix for step in source.steps}),
        "steps": [min(ts), max(ts)],
        "warnings": sum(f.severity == "warning" for f in findings),
        "infos": sum(f.severity == "info" for f in findings),
        "findings": [f.to_dict() for f in findings],
    }, indent=2)


def format_rules() -> str:
    """Every rule: id, severity, title and threshold (``lrscope check --rules``)."""
    lines = []
    for rule in RULES.values():
        lines.append(f"{rule.id} ({rule.severity}{', live only' if rule.live_only else ''}): {rule.title}")
        lines += _wrap(rule.threshold, "    ", "    ")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.rules:
        print(format_rules())
        return 0
    if args.logdir is None:
        raise ValueError("give the log directory (or a .jsonl file) to check, or --rules")
    source, findings = check(args.logdir, args.ignore)
    print(format_json(source, findings) if args.json else format_text(source, findings))
    sys.stdout.flush()
    return 1 if any(f.severity == "warning" for f in findings) else 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check", help="say what is wrong with a run, from its lrscope logs (exit 1 on warnings)",
        description="Run lrscope's rules (eps domination, tensors without gradients, NaN, update "
                    "ratios, lr schedule surprises, weight decay, family-specific ones) over a "
                    "run's lrscope.jsonl or TensorBoard event files and print each finding with "
                    "the tensors or groups and the steps it concerns, and what to try. Exit code "
                    "0: no warning; 1: at least one warning; 2: bad input.")
    parser.add_argument("logdir", nargs="?", help="the log_dir given to lrscope.watch (or a .jsonl file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--ignore", action="append", default=[], metavar="ID",
                        help="leave out a rule (repeatable); see --rules for the ids")
    parser.add_argument("--rules", action="store_true", help="list every rule and exit")
    parser.set_defaults(run=run)
