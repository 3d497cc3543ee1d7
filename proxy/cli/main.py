"""The `embedding-proxy` command: every command, flag, default and help text in one table (COMMANDS), and `main`.

argtable.py builds argparse from the table; the handlers are in commands.py (serve, mock-upstream, check-config,
upstreams), operate.py (keys, teams, usage), cache.py (cache) and admins.py (admins, audit); serve.py runs a server
process; access.py says who the operator commands act as.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..accounts.access import ROLES
from ..config import load
from .admins import cmd_admins, cmd_audit
from .argtable import Arg, Command, build, parse_count, parse_day, parse_duration, parse_port, switch, variables
from .cache import cmd_cache
from .commands import cmd_check_config, cmd_mock, cmd_serve, cmd_upstreams
from .failures import explain, stdout_gone
from .operate import cmd_keys, cmd_teams, cmd_usage
from .serve import configure_logging

log = logging.getLogger("proxy.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _json(what: str) -> Arg:
    return switch("--json", f"print {what} as JSON instead of text")


def _limits(hint: str) -> tuple[Arg, ...]:
    return (
        Arg("--rpm", type=parse_count, metavar="N", help="requests per minute" + hint),
        Arg("--tpm", type=parse_count, metavar="N", help="tokens per minute" + hint),
        Arg("--tokens-per-day", type=parse_count, metavar="N", help="tokens per UTC day" + hint),
        Arg("--tokens-per-month", type=parse_count, metavar="N", help="tokens per UTC month" + hint),
    )


# 0 means unlimited everywhere (as in the admin API): say so, whether it clears a limit or sets none.
NEW_LIMITS = _limits(" (0 or omitted: unlimited)")
CHANGED_LIMITS = _limits(" (0: unlimited, clears it)")
KEY_ID = Arg("key_id", metavar="KEY_ID", help="the key's id (key_..., as `keys list` shows it)")
TEAM_NAME = Arg("name", metavar="TEAM", help="the team's name (1-63 characters of a-z 0-9 _ . -)")
ADMIN_NAME = Arg("name", metavar="NAME", help="the admin's name (1-64 characters of A-Z a-z 0-9 _ . @ -)")

# The variables the README's table lists (tests/test_cli.py checks that this names every one of them).
ENVIRONMENT = (
    ("PROXY_CONFIG", "the config file, as --config"),
    ("UPSTREAM_BASE_URL", "the default upstream's base URL (.../v1)"),
    ("UPSTREAM_API_KEY", "the default upstream's key (another upstream names its own variable: api_key_env)"),
    ("REDIS_URL", "the state store: keys, quotas, the usage ledger (unset: an embedded in-process store, one "
                  "process, not durable)"),
    ("REDIS_TYPE", "single (default), cluster or sentinel: the form of REDIS_URL"),
    ("REDIS_USERNAME, REDIS_PASSWORD", "credentials for cluster nodes and a sentinel set's master"),
    ("REDIS_TLS", "true: TLS to cluster nodes, or to the sentinels and the master (single: use rediss://)"),
    ("REDIS_SENTINEL_PASSWORD", "the sentinels' own password"),
    ("CACHE_REDIS_URL, CACHE_REDIS_TYPE", "the cache store, in the same forms (unset: the cache lives in the "
                                          "state store)"),
    ("CACHE_REDIS_USERNAME, CACHE_REDIS_PASSWORD", "as the REDIS_ ones, for the cache store"),
    ("CACHE_REDIS_TLS, CACHE_REDIS_SENTINEL_PASSWORD", "as the REDIS_ ones, for the cache store"),
    ("PROXY_ADMIN_KEY", "the admin key: the admin API, the console (/admin/ui/) and the upstreams command "
                        "(unset: the admin API answers 403)"),
    ("PROXY_ADMIN_CREDENTIAL", "a named admin's sk-admin-... credential: the operator commands act as that "
                               "admin (unset: as root); upstreams sends it instead of PROXY_ADMIN_KEY"),
    ("PROXY_OIDC_CLIENT_SECRET", "the console's single sign-on client secret (the variable admin.oidc."
                                 "client_secret_env names)"),
    ("PROXY_CACHE_SECRET", "seeds the cache's content hashes (unset: one random secret, kept in Redis)"),
    ("PROXY_METRICS_TOKEN", "/metrics answers only 'Authorization: Bearer <this>'"),
    ("PROXY_TRACEMALLOC", "debugging only: a directory; each server process traces its allocations and writes a "
                          "snapshot there on SIGUSR2"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_*", "traces over OTLP/HTTP, off unless set (the README's Tracing section "
                                           "lists the others)"),
)

OPTIONS = (
    Arg("--version", action="version", version=__version__, help="print the version and exit"),
    Arg("--config", metavar="PATH", help="TOML config file (default: $PROXY_CONFIG, else built-in defaults; "
                                         "config/proxy.example.toml lists every key)"),
    Arg("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
        help="debug (also prints the traceback behind a one-line failure), info (default), warning, error or "
             "critical, in any case"),
)

COMMANDS = (
    Command("serve", "run the proxy", run=cmd_serve, description=(
        "Run the proxy: /v1/embeddings, /v1/models, /healthz, /readyz, /metrics, the admin API and the console "
        "(/admin/ui/). Without REDIS_URL it runs on an embedded in-process store (one process, not durable) and "
        "prints a gateway key to try it with."), args=(
        Arg("--host", metavar="ADDRESS", help="address to listen on (default: server.host, 127.0.0.1)"),
        Arg("--port", type=parse_port, metavar="PORT",
            help="port to listen on (default: server.port, 8080; 0: any free port, one process)"),
        switch("--demo", "also start the bundled mock upstream and point the proxy at it (works offline), and print "
                         "an admin key for this run and the console's address"),
        Arg("--workers", type=int, metavar="N",
            help="worker processes sharing the port (default: one per core with REDIS_URL, else 1)"),
        Arg("--metrics-port", type=parse_port, metavar="PORT",
            help="serve /metrics on this port instead of the API port"),
    )),
    Command("keys", "issue, list, limit, revoke and rotate gateway keys (needs REDIS_URL)", run=cmd_keys,
            description="Gateway keys, in the Redis the proxies share (REDIS_URL). A key is shown once, when it is "
                        "created or rotated: Redis holds only its hash.", subcommands=(
        Command("create", "issue a key; prints it alone on the first line", description=(
            "Issue a key for a team. It is printed alone on the first line (with --json: one JSON object holding "
            "`key` and the record) and cannot be shown again."), args=(
            Arg("--team", required=True, metavar="TEAM",
                help="the team the key belongs to (1-63 characters of a-z 0-9 _ . -)"),
            Arg("--name", default="", metavar="NAME", help="a label for people, at most 200 characters"),
            Arg("--expires-in", type=parse_duration, metavar="DURATION",
                help="the key stops working after this long: e.g. 30d, 12h, 3600 (default: never)"),
            Arg("--models", metavar="LIST", help="comma-separated models this key may use (default: all)"),
            *NEW_LIMITS,
            _json("the key and its record"),
        )),
        Command("list", "list keys (ids and names, never keys)", description=(
            "List key records: id, team, status (active, rotated, expired, revoked), when it stops working, limits "
            "and name; never a key. Oldest first, read a page of 1000 at a time (a team's keys through its "
            "own index): every key, or the first --limit."), args=(
            Arg("--team", metavar="TEAM", help="only this team's keys (default: every team's)"),
            Arg("--limit", type=parse_count, metavar="N", help="at most this many keys (default: every key)"),
            _json("the records"))),
        Command("show", "show one key's record", args=(KEY_ID, _json("the record (in a list, as `keys list`)"))),
        Command("limits", "change a key's own quotas (on top of its team's)", description=(
            "Change a key's own quotas, which apply on top of its team's; a limit not given stays as it is."),
            args=(KEY_ID, *CHANGED_LIMITS, _json("the updated record"))),
        Command("revoke", "revoke a key by id; takes effect at once", description=(
            "Revoke a key: every proxy refuses it from its next request. It cannot be undone."),
            args=(KEY_ID, _json("the revoked record"))),
        Command("rotate", "issue a replacement key; the old one works for --grace more", description=(
            "Issue a replacement key with the same team, name, models, limits and expiry, printed alone on the "
            "first line; the old key keeps working for --grace."), args=(
            KEY_ID,
            Arg("--grace", type=parse_duration, default=86400.0, metavar="DURATION",
                help="how long the old key keeps working: e.g. 1h, 7d (default 1d)"),
            _json("the new key, its record and the old record (`previous`)"),
        )),
    )),
    Command("teams", "teams and their quotas (needs REDIS_URL)", run=cmd_teams, description=(
        "Teams' quotas. Limits set here live in Redis (REDIS_URL) and replace the config's [teams.NAME] limits on "
        "every proxy within quotas.team_cache_s, until `teams reset`."), subcommands=(
        Command("set", "set a team's quotas; flags not given stay as they are",
                args=(TEAM_NAME, *CHANGED_LIMITS, _json("the team's limits in force"))),
        Command("reset", "drop the quotas set at run time: the config's apply again",
                args=(TEAM_NAME, _json("the team's limits in force"))),
        Command("list", "teams with quotas, from the config and set at run time",
                args=(_json("the teams, their limits and where they come from"),)),
    )),
    Command("usage", "usage per team from the ledger, for chargeback (needs REDIS_URL)", run=cmd_usage, description=(
        "Usage from the ledger in Redis (REDIS_URL), by UTC day, for chargeback: requests, tokens sent upstream and "
        "served from the cache, their cost and the savings (money as decimal text with 6 decimals); one row per "
        "team, or per team and key (with the key's name), model or day. The same rows as GET /admin/usage."), args=(
        Arg("--team", metavar="TEAM", help="one team (default: all)"),
        Arg("--since", type=parse_day, metavar="DAY", help="first UTC day, YYYY-MM-DD (default: today)"),
        Arg("--until", type=parse_day, metavar="DAY", help="last UTC day, inclusive (default: today)"),
        Arg("--by", choices=["key", "model", "day"],
            help="one row per team and key (with the key's name), model or day (default: one row per team)"),
        Arg("--format", choices=["table", "json", "csv"], default="table",
            help="table (default), json or csv (a new CSV column is only ever added last)"),
        switch("--json", "the same as --format json"),
    )),
    Command("cache", "cache statistics and purges (needs REDIS_URL)", run=cmd_cache, description=(
        "Cache statistics and purges, against the Redis stores the proxies share (REDIS_URL, and CACHE_REDIS_URL "
        "when the cache has a store of its own)."), subcommands=(
        Command("stats", "entries and memory per cache server, hit ratio today, purge generations",
                args=(_json("the statistics (as GET /admin/cache, without the answering process)"),)),
        Command("purge", "stop serving a model's cached vectors, on every proxy within seconds", args=(
            Arg("--model", required=True, metavar="MODEL", help="the model whose cached vectors are not served again"),
            Arg("--team", metavar="TEAM", help='only this team\'s entries (cache.scope = "team" only)'),
            _json("the purge (model, team, the generation now in force, scope)"),
        )),
    )),
    Command("admins", "named admin credentials and their roles (needs REDIS_URL)", run=cmd_admins, description=(
        "Named admin credentials, in the Redis the proxies share (REDIS_URL), each with a role: platform "
        "(everything), team (the keys of its teams) or viewer (read only). A credential is shown once, when it is "
        "created: Redis holds only its hash. PROXY_ADMIN_KEY stays the bootstrap credential (actor root)."),
            subcommands=(
        Command("create", "issue an admin credential; prints it alone on the first line", description=(
            "Issue a named admin credential (sk-admin-...) with a role. It is printed alone on the first line (with "
            "--json: one JSON object holding `credential` and the record) and cannot be shown again."), args=(
            ADMIN_NAME,
            Arg("--role", required=True, choices=ROLES, help="platform: everything; team: the --team teams' keys; "
                "viewer: read only (of the --team teams, if given)"),
            Arg("--team", action="append", metavar="TEAM",
                help="a team this admin is confined to (repeat for several; required for the team role)"),
            _json("the credential and its record"),
        )),
        Command("list", "list admins (names and roles, never credentials)", description=(
            "List the named admins: name, role, status (active, revoked), when and by whom created, teams; never a "
            "credential."), args=(_json("the records"),)),
        Command("revoke", "revoke an admin's credential; refused everywhere from its next request", description=(
            "Revoke a named admin's credential: every proxy refuses it from its next request. The name stays taken "
            "(the audit log names it). It cannot be undone."),
                args=(ADMIN_NAME, _json("the revoked record"))),
    )),
    Command("audit", "the audit log: admin changes and refusals, newest first (needs REDIS_URL)", run=cmd_audit,
            description=(
        "The audit log in the state store (REDIS_URL), newest first: every admin change (keys, team limits, cache "
        "purges, admins) and every refusal, with its actor, how (api, console, cli), action, target, before and "
        "after, outcome and client address. The same entries as GET /admin/audit."), args=(
        Arg("--since", type=parse_day, metavar="DAY", help="first UTC day, YYYY-MM-DD (default: the oldest kept)"),
        Arg("--until", type=parse_day, metavar="DAY", help="last UTC day, inclusive (default: today)"),
        Arg("--actor", metavar="ACTOR", help="one actor (an admin's name, root, an SSO subject; default: all)"),
        Arg("--team", metavar="TEAM", help="one team's entries (default: all)"),
        Arg("--action", metavar="ACTION", help="one action (keys.revoke) or a resource (keys) (default: all)"),
        Arg("--limit", type=int, metavar="N", help="at most this many entries, 1-10000 (default 1000)"),
        Arg("--format", choices=["table", "json", "csv"], default="table",
            help="table (default), json or csv (a new CSV column is only ever added last)"),
        switch("--json", "the same as --format json"),
    )),
    Command("mock-upstream", "run the deterministic fake upstream", run=cmd_mock, description=(
        "Run the deterministic fake upstream (an OpenAI-compatible /v1/embeddings) for demos, development, tests "
        "and benchmarks: vectors from a hash of model and input, usage in cl100k_base tokens; POST /_mock/fail "
        "injects failures, GET /_mock/stats counts what it served."), args=(
        Arg("--host", default="127.0.0.1", metavar="ADDRESS", help="address to listen on (default 127.0.0.1)"),
        Arg("--port", type=parse_port, default=9000, metavar="PORT", help="port to listen on (default 9000)"),
        Arg("--latency-ms", type=float, default=0.0, metavar="MS", help="added before every answer (default 0)"),
        Arg("--api-key", metavar="KEY", help="require this bearer key (default: any)"),
        switch("--shuffle", "list answer items in reverse order (indexes stay right)"),
        switch("--floats-only", "answer float arrays even when asked for base64"),
        Arg("--rpm", type=int, default=0, metavar="N", help="answer 429 beyond this many requests per window"),
        Arg("--tpm", type=int, default=0, metavar="N", help="answer 429 beyond this many tokens per window"),
        Arg("--rate-window-s", type=float, default=60.0, metavar="SECONDS",
            help="the rate limits' window (default 60)"),
        Arg("--max-in-flight", type=int, default=0, metavar="N",
            help="answer 429 to a call beyond this many in flight at once (default 0: no limit)"),
        switch("--unannounced", "enforce --rpm, --tpm and --max-in-flight without x-ratelimit-* headers (its 429s "
               "say nothing of when to come back)"),
        switch("--strip-empty", "as Infinity: an input of only whitespace is 0 tokens, answered 200"),
        Arg("--max-chars", type=int, default=0, metavar="N",
            help="as Infinity: refuse a longer input string with FastAPI's 422 (default 0: no limit)"),
    )),
    Command("upstreams", "each deployment's state in a running proxy (needs PROXY_ADMIN_KEY)", run=cmd_upstreams,
            description=(
        "Each deployment's state in a running proxy (healthy, cooling down or paused; failures; what its rate-limit "
        "headers leave), from its GET /admin/upstreams with PROXY_ADMIN_CREDENTIAL, else PROXY_ADMIN_KEY. Redirects "
        "are never followed."),
            args=(Arg("--url", metavar="URL", help="the proxy's base URL (default: http://server.host:server.port)"),
                  _json("the deployments' states"))),
    Command("check-config", "validate the configuration, and the Redis stores it names", run=cmd_check_config,
            description=(
        "Validate the config file (--config or PROXY_CONFIG) and the environment offline, then check the Redis "
        "stores and the upstreams it names, and print what was checked. Exit status 2: an invalid config; 1: an "
        "error (or, with --strict, any warning); 0: ok, warnings on stderr."), args=(
        switch("--strict", "exit 1 on any warning too (for deploy pipelines)"),
        _json("what was checked, the warnings and the verdict"),
    )),
)


def build_parser() -> argparse.ArgumentParser:
    return build("embedding-proxy", "OpenAI-compatible embeddings gateway. Each command has its own --help.",
                 OPTIONS, COMMANDS, variables("environment variables (secrets come only from these):", ENVIRONMENT))


def main(argv: Sequence[str] | None = None) -> int:
    """Every command's failure a user can cause ends here as one line on stderr (failures.py): exit 1, or 2 for
    a usage error (argparse exits 2 by itself). `--log-level debug` adds the traceback."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        result: Any = args.func(args, load(args.config))
        sys.stdout.flush()  # a reader gone away (`| head`) shows up here, inside this handling
        return int(result)
    except BrokenPipeError:
        return stdout_gone()
    except KeyboardInterrupt:  # Ctrl-C during a command: no traceback
        return 130
    except Exception as exc:
        if (failure := explain(exc)) is None:  # a bug: its traceback is wanted
            raise
        line, code = failure
        log.debug("%s", line, exc_info=True)
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
