"""The ``picklegate`` command line: ``hash`` prints the sha256 a manifest uses, ``scan`` looks
inside pickle-bearing files without running them, ``freeze`` turns records into a manifest,
``verify`` checks a manifest, ``run`` starts a guarded command, ``preload-path`` names the preload."""

import argparse
import json
import os
import sys

from . import _core
from ._errors import PolicyError, ScanError

PRELOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libpicklegate_preload.so")


def _hash(args):
    status = 0
    for path in args.files:
        try:
            print(f"{_core.sha256_file(path)}  {path}")
        except OSError as error:
            print(f"picklegate hash: {error}", file=sys.stderr)
            status = 1
    return status


def _preload_missing(command):
    if os.path.isfile(PRELOAD):
        return False
    print(f"picklegate {command}: {PRELOAD} is missing (this build has no preload library)", file=sys.stderr)
    return True


def _preload_path(args):
    if _preload_missing("preload-path"):
        return 1
    print(PRELOAD)
    return 0


def _run(args):
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("picklegate run: no command given (picklegate run [options] -- CMD ARGS...)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.policy is not None:
        env["PICKLEGATE_POLICY"] = os.path.abspath(args.policy)
    if args.mode is not None:
        env["PICKLEGATE_MODE"] = args.mode
    if not (env.get("PICKLEGATE_POLICY") or env.get("PICKLEGATE_MODE")):
        env["PICKLEGATE_MODE"] = "enforce"  # no policy at all: the global no-pickle mode
    # The preload by default, when this build has it: then `python -S`, `python -I -S` and Pythons
    # without picklegate installed are guarded too, not only those that run the .pth start-up hook.
    if args.preload is None:
        args.preload = os.path.isfile(PRELOAD)
    if args.preload:
        if _preload_missing("run"):
            return 1
        if PRELOAD not in env.get("LD_PRELOAD", "").split(":"):
            env["LD_PRELOAD"] = ":".join(filter(None, [PRELOAD, env.get("LD_PRELOAD")]))
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)  # the command's exit status and signals are its own
    except OSError as error:
        print(f"picklegate run: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127


def _verdict(summary):
    outside = sorted({name for part in summary["parts"] for name in part["outside_allowlist"]})
    if outside:
        return f"REVIEW: {len(outside)} not allowed: {', '.join(outside)}"
    return "ok" if summary["parts"] else "ok (no pickle inside)"


def _table(rows):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[-1]))


def _scan(args):
    summaries, failed = [], False
    for path in args.files:
        try:
            summary = json.loads(_core.scan_file(path, args.allow))
            summary["verdict"] = _verdict(summary)
        except ScanError as error:
            summary = {"file": path, "error": str(error), "verdict": "ERROR"}
        failed = failed or summary["verdict"] not in ("ok", "ok (no pickle inside)")
        summaries.append(summary)
    if args.json:
        json.dump(summaries, sys.stdout, indent=2)
        print()
        return int(failed)
    rows = [("FILE", "FORMAT", "PROTO", "SHA256", "GLOBALS", "VERDICT")]
    for summary in summaries:
        if "error" in summary:
            rows.append((summary["file"], "-", "-", "-", "-", f"ERROR: {summary['error']}"))
            continue
        parts = summary["parts"] or [{"name": "", "protocol": "-", "globals": []}]
        for index, part in enumerate(parts):
            name = summary["file"] + (f" [{part['name']}]" if part["name"] else "")
            sha = summary["sha256"][:16] if index == 0 else ""
            verdict = summary["verdict"] if index == 0 else ""
            rows.append((name, summary["format"], part["protocol"], sha, ", ".join(part["globals"]) or "-", verdict))
    _table(rows)
    return int(failed)


def _freeze(args):
    try:
        text = _core.freeze_records(args.records, args.merge)
    except PolicyError as error:
        print(f"picklegate freeze: {error}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    return 0


def _verify(args):
    try:
        entries = _core.manifest_entries(args.manifest)
    except PolicyError as error:
        print(f"picklegate verify: {error}", file=sys.stderr)
        return 1
    listed = {}
    for sha, callsite in entries:
        listed.setdefault(sha, []).append(callsite)
    print(f"{args.manifest}: valid, {len(entries)} [[allow]] entries")
    missing = 0
    for path in args.files:
        try:
            sha = _core.sha256_file(path)
        except OSError as error:
            print(f"MISSING  {path}: cannot read: {error}")
            missing += 1
            continue
        if sha in listed:
            print(f"listed   {path}  sha256 {sha}  at {', '.join(listed[sha])}")
        else:
            print(f"MISSING  {path}  sha256 {sha} is not in {args.manifest}")
            missing += 1
    if missing:
        print(f"{missing} of {len(args.files)} files are not listed")
    return int(missing > 0)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="picklegate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="subcommand", required=True)
    hash_command = commands.add_parser("hash", help="print the sha256 the manifest uses for each file")
    hash_command.add_argument("files", nargs="+", metavar="FILE")
    hash_command.set_defaults(run=_hash)
    preload = commands.add_parser("preload-path", help="print the absolute path of the LD_PRELOAD library")
    preload.set_defaults(run=_preload_path)
    run = commands.add_parser(
        "run",
        help="run a command with picklegate activated through the environment",
        description="Runs CMD with PICKLEGATE_POLICY / PICKLEGATE_MODE set and the preload library in LD_PRELOAD.",
    )
    run.add_argument("--policy", metavar="P", help="manifest (TOML); exported as PICKLEGATE_POLICY")
    run.add_argument("--mode", metavar="M", choices=("enforce", "warn", "record", "off"), help="exported as PICKLEGATE_MODE")
    run.add_argument(
        "--preload", action="store_true", default=None,
        help="preload the library (the default when this build has it): guards `python -S` and Pythons without picklegate installed",
    )
    run.add_argument("--no-preload", dest="preload", action="store_false", help="rely on the .pth start-up hook alone")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    run.set_defaults(run=_run)

    scan = commands.add_parser("scan", help="list the globals the pickles in each file import, running nothing")
    scan.add_argument("files", nargs="+", metavar="FILE")
    scan.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                      help="a global pattern (module.name, '*' globs) that passes; repeatable")
    scan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    scan.set_defaults(run=_scan)

    freeze = commands.add_parser("freeze", help="turn record files into a manifest")
    freeze.add_argument("records", nargs="+", metavar="RECORD")
    freeze.add_argument("-o", "--output", default="-", metavar="MANIFEST", help="where to write (default: stdout)")
    freeze.add_argument("--merge", metavar="EXISTING", help="keep this manifest's entries, notes and rules")
    freeze.set_defaults(run=_freeze)

    verify = commands.add_parser("verify", help="validate a manifest and check that files are listed")
    verify.add_argument("manifest", metavar="MANIFEST")
    verify.add_argument("files", nargs="*", metavar="FILE")
    verify.set_defaults(run=_verify)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
