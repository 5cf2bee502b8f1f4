"""The ``picklegate`` command line: ``picklegate hash FILE...`` prints the sha256 a manifest
uses for each file, in the same format as ``sha256sum``."""

import argparse
import sys

from . import _core


def _hash(args):
    status = 0
    for path in args.files:
        try:
            print(f"{_core.sha256_file(path)}  {path}")
        except OSError as error:
            print(f"picklegate hash: {error}", file=sys.stderr)
            status = 1
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog="picklegate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    hash_command = commands.add_parser("hash", help="print the sha256 the manifest uses for each file")
    hash_command.add_argument("files", nargs="+", metavar="FILE")
    hash_command.set_defaults(run=_hash)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
