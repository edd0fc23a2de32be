"""ckptd config check FILE | ckptd config show [--config FILE] [options] [--json]."""

from __future__ import annotations

import argparse
import json

from ..supervisor import config as configmod


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check or show `ckptd run` configuration",
                       description="Validate a `ckptd run` YAML config file, or print the effective configuration "
                       "(defaults < file < command-line options).")
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", parser_class=type(p))
    check = actions.add_parser("check", help="validate a config file (exit 78 with the key and line if bad)")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=run_check)
    show = actions.add_parser("show", help="print the effective config as YAML (or --json)")
    configmod.add_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_check(args: argparse.Namespace) -> int:
    configmod.resolve(args.file, {})
    print(f"{args.file}: OK")
    return 0


def run_show(args: argparse.Namespace) -> int:
    cfg = configmod.resolve(args.config, configmod.cli_overrides(args))
    data = cfg.as_dict()
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    return 0
