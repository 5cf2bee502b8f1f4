"""The ``picklegate`` command line: ``hash`` prints the sha256 a manifest uses for each file;
``run`` starts a command guarded through the environment; ``preload-path`` names the preload library."""

import argparse
import os
import sys

from . import _core

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


def _preload_path(args):
    if not os.path.isfile(PRELOAD):
        print(f"picklegate preload-path: {PRELOAD} is missing (this build has no preload library)", file=sys.stderr)
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
    if args.preload:
        if _preload_path(args) != 0:
            return 1
        env["LD_PRELOAD"] = ":".join(filter(None, [PRELOAD, env.get("LD_PRELOAD")]))
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)  # the command's exit status and signals are its own
    except OSError as error:
        print(f"picklegate run: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127


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
        description="Runs CMD with PICKLEGATE_POLICY / PICKLEGATE_MODE set (and LD_PRELOAD with --preload).",
    )
    run.add_argument("--policy", metavar="P", help="manifest (TOML); exported as PICKLEGATE_POLICY")
    run.add_argument("--mode", metavar="M", choices=("enforce", "warn", "record", "off"), help="exported as PICKLEGATE_MODE")
    run.add_argument("--preload", action="store_true", help="also preload the library, for Pythons without picklegate installed")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    run.set_defaults(run=_run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
