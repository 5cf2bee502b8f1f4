"""The ``picklegate`` command line: ``hash`` prints the sha256 a manifest uses, ``scan`` looks
inside pickle-bearing files without running them, ``freeze`` turns records into a manifest,
``verify`` checks a manifest, ``run`` starts a guarded command, ``preload-path`` names the preload."""

import argparse
import json
import os
import pathlib
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

from . import _core
from ._errors import PolicyError
from ._startup import EX_CONFIG, lenient

#: One file's entry of the picklegate-scan/1 JSON document (README: Scan output).
Summary = dict[str, Any]

PRELOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libpicklegate_preload.so")


def _hash(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            print(f"{_core.sha256_file(path)}  {path}")
        except OSError as error:
            print(f"picklegate hash: {error}", file=sys.stderr)
            status = 1
    return status


def _preload_missing(command: str) -> bool:
    if os.path.isfile(PRELOAD):
        return False
    print(f"picklegate {command}: {PRELOAD} is missing (this build has no preload library)", file=sys.stderr)
    return True


def _preload_path(args: argparse.Namespace) -> int:
    if _preload_missing("preload-path"):
        return 1
    print(PRELOAD)
    return 0


#: How many `#!` scripts deep the kernel follows an interpreter that is itself a script (Linux: 4;
#: one more step is the binary).
SCRIPT_DEPTH = 5


def _which(name: str, path: Optional[str]) -> Optional[str]:
    """The file `execvp` runs for `name`: itself when it has a slash, else the first executable
    file of that name on `path` (os.defpath when PATH is unset)."""
    if os.sep in name:
        return name
    return shutil.which(name, path=os.defpath if path is None else path)


def _shebang(path: str) -> Optional[list[str]]:
    """A `#!` script's interpreter and its one optional argument, split as the kernel splits
    them; None for a binary or a file that cannot be read."""
    try:
        with open(path, "rb") as script:
            head = script.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].strip().split(None, 1)
    return [os.fsdecode(word) for word in words] or None


def _exec_chain(command: str, path: Optional[str]) -> list[str]:
    """The files exec goes through for `command`: the one PATH finds, then each `#!` interpreter
    (for `#!/usr/bin/env NAME`, NAME on PATH), ending with the binary that really runs."""
    found = _which(command, path)
    chain: list[str] = []
    while found is not None and len(chain) < SCRIPT_DEPTH:
        chain.append(found)
        line = _shebang(found)
        if line is None:
            break
        found = line[0]
        if os.path.basename(found) == "env" and len(line) == 2 and not line[1].startswith("-"):
            found = _which(line[1], path)
        elif os.path.basename(found) == "env" and len(line) == 2 and line[1].startswith("-S"):
            # `env -S "NAME ARGS"` splits its one argument: NAME is the first word that is neither an
            # option nor a VAR=VALUE assignment.
            words = [w for w in line[1][2:].split() if not w.startswith("-") and "=" not in w]
            found = _which(words[0], path) if words else None
    return chain


def _secure_execution_reason(binary: str) -> Optional[str]:
    """Why glibc would run `binary` in secure-execution mode, where it ignores LD_PRELOAD paths
    (ld.so(8)): a set-user-ID or set-group-ID bit, or file capabilities; None when none."""
    try:
        mode = os.stat(binary).st_mode
    except OSError:
        return None
    if mode & stat.S_ISUID:
        return "it is set-user-ID"
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:  # set-group-ID without group-execute is a lock mark
        return "it is set-group-ID"
    if hasattr(os, "getxattr"):
        try:
            os.getxattr(binary, "security.capability")
            return "it has file capabilities (the security.capability attribute)"
        except OSError:  # no such attribute, or a file system without extended attributes
            pass
    return None


def _refused_for_secure_execution(command: str, env: dict[str, str], preload: bool) -> bool:
    """True (and says why) when, under enforce, glibc would drop the preload silently for `command`
    (set-user-ID, set-group-ID, file capabilities, or such an interpreter; or this process's real and
    effective IDs differ, which the exec keeps); else warns where it applies."""
    mode = (env.get("PICKLEGATE_MODE") or "enforce").strip().lower()
    chain = _exec_chain(command, env.get("PATH"))
    reason = _secure_execution_reason(chain[-1]) if chain and mode != "off" else None
    binary = chain[-1] + (f" (the interpreter of {chain[-2]})" if len(chain) > 1 else "") if chain else command
    (ruid, euid, _), (rgid, egid, _) = os.getresuid(), os.getresgid()
    if mode != "off" and (ruid != euid or rgid != egid):
        # The kernel sets AT_SECURE for any program exec'd with effective IDs other than the real ones.
        reason = f"picklegate run itself has real uid/gid {ruid}/{rgid} and effective uid/gid {euid}/{egid}"
    if reason is None:
        return False
    what = f"{binary}: {reason}, so glibc runs it in secure-execution mode, where LD_PRELOAD is ignored"
    if not preload:
        print(f"picklegate run: note: {what}; the preload is off anyway, so only a start-up hook (.pth) "
              "in that interpreter's own site-packages can guard it", file=sys.stderr)
        return False
    if not lenient(mode):
        print(f"picklegate run: refusing to run {what}: the preload cannot load into it and it would run "
              "unguarded (use the host-wide /etc/ld.so.preload deployment, or --no-preload to rely "
              "knowingly on the start-up hook)", file=sys.stderr)
        return True
    print(f"picklegate run: warning: {what}: the preload will not load and it runs unguarded ({mode})",
          file=sys.stderr)
    return False


def _run(args: argparse.Namespace) -> int:
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
    if _refused_for_secure_execution(command[0], env, bool(args.preload)):
        return EX_CONFIG
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)  # the command's exit status and signals are its own
    except OSError as error:
        print(f"picklegate run: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127


VERDICT_TEXT = {
    "code": "CODE: runs code or reaches objects by name when loaded; do not load without reading it",
    "error": "ERROR: not read completely; what it would run is not known",
    "unknown": "REVIEW: builds library objects whose own code runs when loaded",
    "data": "data: builds plain data only (containers, arrays, tensors)",
    "none": "no pickle inside",
}
#: Verdicts that need a human (exit status 1).
NEEDS_REVIEW = ("code", "error", "unknown")
SCAN_BATCH = 64
SARIF_RULES = [
    ("picklegate/code-global", "error", "A global that runs code or reaches objects by name"),
    ("picklegate/unknown-global", "warning", "A library global whose own code runs when the pickle is loaded"),
    ("picklegate/incomplete-scan", "error", "A file the scan could not read completely"),
]


def _walk(paths: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """The files to scan: each path given, and every file under each directory (sorted, symlinks
    to directories not followed). Returns (path, walked) pairs."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield os.path.join(root, name), True
        else:
            yield path, False


def _not_a_pickle(summary: Summary) -> bool:
    """A walked file read as a plain pickle that broke before naming any global: text, images,
    safetensors and the like. (Named on the command line, such a file is reported as an error.)"""
    return summary.get("format") == "pickle" and bool(summary.get("error")) and not summary.get("globals")


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.on = total > 1 and sys.stderr.isatty()

    def advance(self, count: int) -> None:
        self.done += count
        if self.on:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\rscanning [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} files")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def _scan_all(paths: Iterable[str], allow: Sequence[str]) -> tuple[str, list[Summary], list[str]]:
    files = list(_walk(paths))
    progress = _Progress(len(files))
    summaries: list[Summary] = []
    skipped: list[str] = []
    for start in range(0, len(files), SCAN_BATCH):
        batch = files[start:start + SCAN_BATCH]
        document = json.loads(_core.scan_files([path for path, _ in batch], allow))
        for (_, walked), summary in zip(batch, document["files"]):
            if walked and _not_a_pickle(summary):
                skipped.append(summary["file"])
            else:
                summaries.append(summary)
        progress.advance(len(batch))
    progress.close()
    return document["schema"], summaries, skipped


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_block(summary: Summary, width: int) -> None:
    import textwrap

    print(summary["file"])
    if "sha256" not in summary:
        print(textwrap.fill(f"verdict: {VERDICT_TEXT['error']}", width, initial_indent="  ", subsequent_indent="    "))
        print(textwrap.fill(summary["error"], width, initial_indent="  ", subsequent_indent="    "))
        return
    protocols = sorted({part["protocol"] for part in summary["parts"]})
    pickles = len(summary["parts"])
    facts = [summary["format"], _size(summary["size"])]
    if protocols:
        facts.append(f"protocol {', '.join(map(str, protocols))}" + (f" ({pickles} pickles)" if pickles > 1 else ""))
    if summary["raw_data_bytes"]:
        facts.append(f"{_size(summary['raw_data_bytes'])} of raw tensor data")
    print(textwrap.fill(", ".join(facts), width, initial_indent="  ", subsequent_indent="    "))
    print(f"  sha256 {summary['sha256']}")
    print(textwrap.fill(f"verdict: {VERDICT_TEXT[summary['verdict']]}", width, initial_indent="  ", subsequent_indent="    "))
    if summary.get("error"):
        print(textwrap.fill(f"error: {summary['error']}", width, initial_indent="  ", subsequent_indent="    "))
    for risk in ("code", "unknown", "data"):
        found = [g for g in summary["globals"] if g["class"] == risk]
        if not found:
            continue
        label = f"  {risk} ({len(found)}): "
        if risk == "code":
            print(label.rstrip())
            for g in found:
                mark = " (allowed)" if g["allowed"] else ""
                print(textwrap.fill(f"{g['name']}{mark}: {g['why']}", width, initial_indent="    ", subsequent_indent="      "))
        else:
            names = ", ".join(g["name"] + (" (allowed)" if g["allowed"] else "") for g in found)
            print(textwrap.fill(names, width, initial_indent=label, subsequent_indent=" " * len(label), break_on_hyphens=False))


def _sarif(summaries: Iterable[Summary]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for summary in summaries:
        path = summary["file"]
        uri = pathlib.Path(path).resolve().as_uri() if os.path.isabs(path) else pathlib.PurePath(path).as_posix()
        location = [{"physicalLocation": {"artifactLocation": {"uri": uri}}}]
        if summary.get("error"):
            results.append({"ruleId": SARIF_RULES[2][0], "level": "error", "message": {"text": summary["error"]}, "locations": location})
        for g in summary["globals"]:
            if g["allowed"] or g["class"] == "data":
                continue
            rule, level, _ = SARIF_RULES[0] if g["class"] == "code" else SARIF_RULES[1]
            text = f"{path} resolves {g['name']} ({g['class']}: {g['why']})"
            results.append({"ruleId": rule, "level": level, "message": {"text": text}, "locations": location})
    rules = [{"id": rule, "shortDescription": {"text": text}, "defaultConfiguration": {"level": level}} for rule, level, text in SARIF_RULES]
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "picklegate", "informationUri": "https://pypi.org/project/picklegate/", "rules": rules}},
            "results": results,
        }],
    }


def _scan(args: argparse.Namespace) -> int:
    schema, summaries, skipped = _scan_all(args.paths, args.allow)
    failed = any(s["verdict"] in NEEDS_REVIEW for s in summaries)
    if args.json:
        json.dump({"schema": schema, "files": summaries, "skipped_not_pickles": skipped}, sys.stdout, indent=2)
        print()
        return int(failed)
    if args.sarif:
        json.dump(_sarif(summaries), sys.stdout, indent=2)
        print()
        return int(failed)
    width = max(40, shutil.get_terminal_size((100, 24)).columns - 1)
    for index, summary in enumerate(summaries):
        if index:
            print()
        _print_block(summary, width)
    counts = {verdict: sum(s["verdict"] == verdict for s in summaries) for verdict in VERDICT_TEXT}
    tally = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
    if len(summaries) > 1 or skipped:
        print()
        print(f"{len(summaries)} files: {tally}" + (f"; {len(skipped)} files skipped (not pickles)" if skipped else ""))
    return int(failed)


def _freeze(args: argparse.Namespace) -> int:
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


def _verify(args: argparse.Namespace) -> int:
    try:
        entries = _core.manifest_entries(args.manifest)
    except PolicyError as error:
        print(f"picklegate verify: {error}", file=sys.stderr)
        return 1
    listed: dict[str, list[str]] = {}
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


def _compile(args: argparse.Namespace) -> int:
    output = args.output or args.manifest + ".idx"
    try:
        entries, size, sha = _core.compile_manifest(args.manifest, output)
    except PolicyError as error:
        print(f"picklegate compile: {error}", file=sys.stderr)
        return 1
    print(f"{output}: {entries} [[allow]] entries, {_size(size)}, compiled from {args.manifest} (sha256 {sha})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
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

    scan = commands.add_parser(
        "scan", help="review the pickles in files and directories, running nothing",
        description="Scans each FILE, and every file under each DIR (formats told by content), on all cores. "
                    "Each global is classed code, unknown or data; a file's verdict is its worst global. "
                    "Exit status 1 when a file needs review (code, unknown, error).")
    scan.add_argument("paths", nargs="+", metavar="FILE|DIR")
    scan.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                      help="a global pattern (module.name, '*' globs) already reviewed: it does not count in the verdict; repeatable")
    output = scan.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the picklegate-scan/1 JSON document (README: Scan output)")
    output.add_argument("--sarif", action="store_true", help="print SARIF 2.1.0, for CI code scanning")
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

    compile_command = commands.add_parser(
        "compile", help="write a binary index of a manifest that installs in milliseconds",
        description="Writes MANIFEST.idx (or -o): point PICKLEGATE_POLICY or install(policy=) at it. "
                    "It is used only while MANIFEST is unchanged: edit the TOML, then compile again.")
    compile_command.add_argument("manifest", metavar="MANIFEST")
    compile_command.add_argument("-o", "--output", metavar="INDEX", help="where to write (default: MANIFEST.idx)")
    compile_command.set_defaults(run=_compile)

    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
