"""`dpserve config check FILE`: validate a Serve config's dpserve applications and print their
effective settings (defaults filled in)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

APP_IMPORT_PATH = "deployments.app:build_app"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="<action>")
    check = sub.add_parser(
        "check", help="validate a Serve YAML's dpserve args and print the effective settings"
    )
    check.add_argument("file", type=Path, help="a Serve config (e.g. ray_configs/serve-local.yaml)")


def check_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(application name, effective settings) of each dpserve application in Serve config `path`.
    Raises ValueError naming the application and key of the first problem."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import DPServeConfig

    raw = yaml.safe_load(path.read_text())
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except Exception as exc:
        raise ValueError(f"{path}: not a valid Serve config: {exc}") from None
    apps = [app for app in schema.applications if app.import_path == APP_IMPORT_PATH]
    if not apps:
        raise ValueError(f"{path}: no application with import_path {APP_IMPORT_PATH}")
    out = []
    for app in apps:
        try:
            config = DPServeConfig.from_args(app.args)
        except ValueError as exc:
            raise ValueError(f"{path}: application {app.name!r}: {exc}") from None
        out.append((app.name, config.model_dump(mode="json")))
    return out


def run(args: argparse.Namespace) -> int:
    import yaml

    if args.config_command != "check":
        print("usage: dpserve config check FILE", file=sys.stderr)
        return 2
    try:
        checked = check_file(args.file)
    except (OSError, ValueError) as exc:
        print(f"dpserve config check: {exc}", file=sys.stderr)
        return 1
    for name, settings in checked:
        print(f"# application {name!r}: valid; effective settings")
        print(yaml.safe_dump({"args": settings}, sort_keys=False), end="")
    return 0
