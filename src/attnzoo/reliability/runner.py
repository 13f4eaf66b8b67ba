"""Reliability probes: assembly per mechanism, lookup by id, running (in process, or isolated in a child that
survives a crash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

from .. import registry
from ..registry import Mechanism
from .core import Probe, ProbeFailure
from .decode import decode_probes
from .entry import attention_probes, build_probes, empty_functional_probes, empty_module_probes, module_probes
from .numerics import numeric_probes


# --------------------------------------------------------------------------------------------------------
# Assembly and running
# --------------------------------------------------------------------------------------------------------
def probes(mech: Mechanism | str) -> list[Probe]:
    """Every probe that applies to ``mech`` (a record or a registered name), in a stable order."""
    mech = registry.get(mech) if isinstance(mech, str) else mech
    out: list[Probe] = []

    def extend(pairs: Iterable[tuple[str, Callable[[], None]]], **kw) -> None:
        out.extend(Probe(mech.name, name, fn, **kw) for name, fn in pairs)

    if mech.functional:
        extend(attention_probes(mech))
        extend(empty_functional_probes(mech), isolate=True)
    extend(build_probes(mech))
    if mech.kind == "sequence" or mech.module is not None:
        extend(module_probes(mech))
        extend(empty_module_probes(mech), isolate=True)
    if "causal_self" in mech.patterns:
        if mech.functional and mech.step is not None:
            extend(decode_probes(mech, functional=True))
        if mech.decodable and (mech.module is not None or mech.step is not None):
            extend(decode_probes(mech, functional=False))
    for name, fn, slow in numeric_probes(mech):
        out.append(Probe(mech.name, name, fn, slow=slow))
    return out


_FOUND: dict[str, list[Probe]] = {}


def find(probe_id: str) -> Probe:
    """The probe named ``mech::name``."""
    mech, _, name = probe_id.partition("::")
    if mech not in _FOUND:
        _FOUND[mech] = probes(mech)
    for p in _FOUND[mech]:
        if p.name == name:
            return p
    raise KeyError(f"probe: no probe {name!r} for mechanism {mech!r}")


def run(probe: Probe) -> str | None:
    """Run one probe in this process: None if it passed, else the failure message."""
    try:
        probe.run()
    except ProbeFailure as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a probe's own setup crashing is a failure too
        return f"probe setup crashed with {type(e).__name__}: {e}"
    return None


_CHILD = r"""
import json, sys
imports = json.loads(sys.argv[1])
if imports:
    from attnzoo.bench.forkserver import import_extra
    for name in imports:
        import_extra(name)
from attnzoo import reliability
for line in sys.stdin:
    pid = line.strip()
    if not pid:
        continue
    print("START " + pid, flush=True)
    print("DONE " + json.dumps([pid, reliability.run(reliability.find(pid))]), flush=True)
"""


def run_isolated(ids: list[str], *, imports: Iterable[str] = (), timeout: float = 600) -> dict[str, str | None]:
    """Run the probes ``ids`` (``mech::name``) in a child interpreter; a probe that kills it (a signal, an abort)
    or hangs past ``timeout`` seconds fails with that said, and the rest continue in a new child.

    ``imports``: modules or ``.py`` files the child imports first (where your own mechanisms register).
    Returns {id: None or failure message}.
    """
    results: dict[str, str | None] = {}
    todo = list(ids)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the directory holding attnzoo
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(list(imports))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            stdout, stderr = proc.communicate("\n".join(todo) + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        current = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                current = line[6:]
            elif line.startswith("DONE "):
                pid, msg = json.loads(line[5:])
                results[pid] = msg
                current = None
        todo = [p for p in todo if p not in results]
        if not todo:
            break
        if current is None:  # died before starting a probe: report it on all that remain
            for p in todo:
                results[p] = f"the probe child died before running it: {stderr.strip()[-500:]}"
            break
        code = proc.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        results[current] = f"killed the interpreter ({how}): {stderr.strip()[-300:]}"
        todo.remove(current)
    return results


def run_all(mech: Mechanism | str, *, slow: bool = False, imports: Iterable[str] = ()) -> dict[str, str]:
    """Run every probe of ``mech`` (isolated ones in a child; ``slow`` ones only with ``slow=True``);
    returns {probe name: failure message} for the probes that failed."""
    ps = [p for p in probes(mech) if slow or not p.slow]
    failures = {p.name: msg for p in ps if not p.isolate and (msg := run(p)) is not None}
    isolated = run_isolated([p.id for p in ps if p.isolate], imports=imports)
    failures.update({pid.partition("::")[2]: msg for pid, msg in isolated.items() if msg is not None})
    return failures


def main(argv: list[str] | None = None) -> int:
    """``python -m attnzoo.reliability [NAME ...] [--slow] [--import MODULE] [--json PATH]``: run the probes of the
    named mechanisms (default: all registered), print each failure and a summary; exit 1 if any failed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attnzoo.reliability", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="mechanisms to probe (default: every registered one)")
    parser.add_argument("--slow", action="store_true", help="also run the slow probes (N = 8192)")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        help="a module or .py file registering your own mechanisms (repeatable)")
    parser.add_argument("--json", help="write {probe id: failure message or null} to this file")
    args = parser.parse_args(argv)
    from ..bench.forkserver import import_extra

    for name in args.imports:
        import_extra(name)
    mechs = [registry.get(n) for n in args.names] or registry.mechanisms()
    results: dict[str, str | None] = {}
    isolated: list[str] = []
    for mech in mechs:
        ps = [p for p in probes(mech) if args.slow or not p.slow]
        results.update({p.id: run(p) for p in ps if not p.isolate})
        isolated += [p.id for p in ps if p.isolate]
    results.update(run_isolated(isolated, imports=args.imports))  # one child for all of them
    failed = {k: v for k, v in results.items() if v is not None}
    for pid, msg in failed.items():
        print(f"FAIL {pid}: {msg}")
    print(f"{len(results)} probes over {len(mechs)} mechanisms: {len(results) - len(failed)} passed, "
          f"{len(failed)} failed ({100 * len(failed) / max(1, len(results)):.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 1 if failed else 0

