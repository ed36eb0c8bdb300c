"""`rlhf collect <command>`: the preference-collection app and its tools.

    serve             start the web app (pairs generated in the background); --simulate lets simulated annotators
                      judge first
    add-annotator     create an annotator (or --admin) and print their token
    revoke-annotator  disable an annotator's token and end their sessions (running servers included, at once)
    export            write the judgments as a `datasets` preference dataset
    leaderboard       Bradley-Terry ratings of the checkpoints with bootstrap intervals
    simulate          simulated annotators judge over HTTP until `simulate.judgments`, then print statistics
    stats             the admin page's statistics as JSON

Every command takes `--config FILE` plus dotted `key=value` overrides. Bad input raises `UserError`.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf.config import load_config, parse_overrides
from rlhf.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf collect", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="collect YAML, e.g. configs/collect/demo.yaml")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. server.port=9000")
        return p

    serve = command("serve", "start the web app")
    serve.add_argument("--simulate", action="store_true", help="let simulated annotators judge first, then keep serving")
    add = command("add-annotator", "create an annotator and print their token")
    add.add_argument("--name", required=True, help="annotator name (unique)")
    add.add_argument("--admin", action="store_true", help="may open the admin page and /api/stats")
    revoke = command("revoke-annotator", "disable an annotator's token and end their sessions")
    revoke.add_argument("--name", required=True, help="the annotator to revoke (their judgments are kept)")
    export = command("export", "write the preference dataset")
    export.add_argument("--out", required=True, help="output directory (datasets.save_to_disk)")
    board = command("leaderboard", "Bradley-Terry leaderboard of the checkpoints")
    board.add_argument("--out", help="also write the leaderboard as JSON here")
    command("simulate", "simulated annotators judge over HTTP")
    command("stats", "print collection statistics as JSON")
    return parser


def main(argv: list[str]) -> int:
    """Run one `rlhf collect` command; returns the exit code. Raises `UserError` for bad input."""
    args = build_parser().parse_args(argv)
    from rlhf.collect.settings import CollectConfig
    from rlhf.collect.storage import Store

    cfg = load_config(CollectConfig, args.config, parse_overrides(args.overrides))
    store = Store.open(cfg.database_url())
    try:
        return COMMANDS[args.command](cfg, store, args)
    finally:
        store.close()


def _serve(cfg, store, args) -> int:
    from rlhf.collect.pairs import build_feeder, build_source
    from rlhf.collect.server import create_app
    from rlhf.collect.serving import serve_forever
    from rlhf.collect.simulate import simulate

    # in rounds the feeder follows the database's open round (build_feeder makes that source)
    source = None if cfg.pairs.follow_rounds or cfg.pairs.round is not None else build_source(cfg)
    if args.simulate:
        simulate(cfg, store, source)
    app = create_app(cfg, store, feeder=build_feeder(cfg, store, source))
    if not store.annotator_names():
        print(f"collect: no annotators yet; create one with `rlhf collect add-annotator --config {args.config} "
              f"--name NAME` (add --admin for the admin page)")
    print(f"collect: serving http://{cfg.server.host}:{cfg.server.port}  (database {_safe_url(cfg.database_url())})",
          flush=True)
    serve_forever(app, cfg.server.host, cfg.server.port)
    return 0


def _add_annotator(cfg, store, args) -> int:
    token = store.add_annotator(args.name, admin=args.admin)
    role = "admin" if args.admin else "annotator"
    print(f"created {role} {args.name!r}; their token (shown once, keep it secret):", file=sys.stderr)
    print(token)
    return 0


def _revoke_annotator(cfg, store, args) -> int:
    ended = store.revoke_annotator(args.name)
    state = "was already revoked" if ended["already_revoked"] else "revoked"
    print(f"{args.name!r} {state}: token disabled, {ended['sessions']} session(s) ended, {ended['leases']} unjudged "
          "lease(s) released; running servers refuse them from the next request on. Their judgments are kept.")
    return 0


def _export(cfg, store, args) -> int:
    from rlhf.collect.export import export

    summary = export(store, args.out, cfg.export)
    print(f"exported {summary['rows']} preference pairs ({summary['ties']} ties) from {summary['judgments']} "
          f"judgments to {summary['path']}")
    return 0


def _leaderboard(cfg, store, args) -> int:
    from pathlib import Path

    from rlhf.collect.export import format_leaderboard, leaderboard_table

    board = leaderboard_table(store, cfg.export.bootstrap, cfg.seed)
    print(format_leaderboard(board))
    if args.out:
        Path(args.out).write_text(json.dumps(board, indent=2))
    return 0


def _simulate(cfg, store, args) -> int:
    from rlhf.collect.simulate import simulate

    simulate(cfg, store)
    return _stats(cfg, store, args)


def _stats(cfg, store, args) -> int:
    from rlhf.collect.report import summarize

    stats = summarize(store.judgment_rows(), cfg.assignment.overlap, store.pair_counts(),
                      bootstrap=cfg.export.bootstrap, seed=cfg.seed)
    print(json.dumps(stats, indent=2))
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


COMMANDS = {
    "serve": _serve,
    "add-annotator": _add_annotator,
    "revoke-annotator": _revoke_annotator,
    "export": _export,
    "leaderboard": _leaderboard,
    "simulate": _simulate,
    "stats": _stats,
}


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
