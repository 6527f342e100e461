"""`covey` — the command line, a thin layer over `coordinator.client.Covey`.

Plain text by default, because models read it; `--json` on every read command
for programs. Results go to stdout; logs and errors to stderr. Errors are one
line and a distinct exit code (see `coordinator.errors.ExitCode`).

Models call `covey inbox` many times a run, so this module imports only the
standard library at start; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator import __version__

if TYPE_CHECKING:
    from datetime import datetime

    from coordinator.client import Covey
    from coordinator.mailbox import Mail, MailStore
    from coordinator.names import Address

Handler = Callable[["Covey", argparse.Namespace], Awaitable[int]]
# A command on one's own mailbox alone (see `_on_own_mailbox`).
MailboxHandler = Callable[["MailStore", "Address", argparse.Namespace], int]


# -- commands -------------------------------------------------------------------


async def cmd_send(covey: Covey, args: argparse.Namespace) -> int:
    envelope = await covey.send(args.to, args.subject, _body(args), reply_to=args.reply_to)
    _emit(args, {"id": envelope.id}, envelope.id)
    return 0


async def cmd_reply(covey: Covey, args: argparse.Namespace) -> int:
    envelope = await covey.reply(args.id, args.subject, _body(args))
    _emit(args, {"id": envelope.id}, envelope.id)
    return 0


async def cmd_inbox(covey: Covey, args: argparse.Namespace) -> int:
    mails = await covey.inbox(include_done=args.all)
    _emit_list(args, mails, empty=f"No mail for {covey.me}.")
    return 0


async def cmd_wait(covey: Covey, args: argparse.Namespace) -> int:
    mails = await covey.wait(args.timeout)
    if not mails:
        _emit(args, [], f"No new mail for {covey.me} within {args.timeout:g} s.")
        return 1
    _emit_list(args, mails, empty="")
    return 0


# The commands on one's own mailbox alone take it and who it is for, not the namespace:
# `_on_own_mailbox` finds both without loading the namespace when it can.


def cmd_read(mailbox: MailStore, me: Address, args: argparse.Namespace) -> int:
    from coordinator.render import message

    mail = mailbox.read(args.id)
    _emit(args, mail.to_dict(with_body=True), message(mail))
    return 0


def cmd_done(mailbox: MailStore, me: Address, args: argparse.Namespace) -> int:
    from coordinator.render import printable

    ids = mailbox.done(args.ids)
    _emit(args, {"done": ids}, "\n".join(f"done {printable(i)}" for i in ids))
    return 0


def cmd_search(mailbox: MailStore, me: Address, args: argparse.Namespace) -> int:
    mails = mailbox.search(args.text)
    _emit_list(args, mails, empty=f"Nothing in {me}'s mailbox matches {args.text!r}.")
    return 0


MAILBOX_COMMANDS = (cmd_read, cmd_done, cmd_search)


async def cmd_topology_apply(covey: Covey, args: argparse.Namespace) -> int:
    plan = await covey.namespace.apply_topology()
    counts = {
        "exchanges": len(plan.exchanges),
        "queues": len(plan.queues),
        "bindings": len(plan.bindings),
    }
    text = (
        f"Declared {counts['exchanges']} exchanges, {counts['queues']} queues and "
        f"{counts['bindings']} bindings for {_count(len(covey.roster.agents), 'agent')} and "
        f"{_count(len(covey.roster.humans), 'human')}."
    )
    _emit(args, counts, text)
    return 0


async def cmd_run(covey: Covey, args: argparse.Namespace) -> int:
    import asyncio

    from coordinator import runner
    from coordinator.display import printable

    agent = covey.roster.agent(args.name)
    if args.via_supervisor:
        await covey.namespace.request_run(agent.name, requested_by=_asker(covey))
        _emit(args, {"requested": agent.name}, f"Asked the supervisor to run {agent.name}.")
        return 0
    wait = 0.0 if args.skip_if_busy else args.wait_lock
    echo = None if args.json else _echo_lines
    # SIGTERM (systemd, a cron timeout) or Ctrl-C stops the agent and records the run,
    # rather than leaving the agent orphaned.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    result = await runner.run(
        covey.namespace, agent, "manual", wait_lock=wait, stop=stop, echo=echo
    )
    data = {
        "agent": result.agent,
        "run_id": result.run_id,
        "outcome": str(result.outcome),
        "exit_code": result.exit_code,
        "reason": result.reason,
        "duration_seconds": round(result.duration, 3),
        "log": str(result.log_path) if result.log_path else None,
    }
    _emit(args, data, printable(result.summary()))  # a busy lock's holder is named in it
    return int(result.outcome.exit_code)


def cmd_emit(args: argparse.Namespace) -> int:
    """Not a `Handler`: emitting needs no settings, roster or broker, only the run's
    socket, and an agent may call it once per step, so it starts with no more than
    the standard library and errors.py."""
    from coordinator.emit import emit_blocking
    from coordinator.errors import BadInput

    data = None
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except ValueError as err:
            raise BadInput(f"--json DATA is not JSON ({err})") from None
    if args.fraction is not None:
        if not isinstance(data, dict | None):
            raise BadInput("--json DATA is a JSON object")
        data = {**(data or {}), "fraction": args.fraction}
    # Silent on success: what the agent prints is its session's lines already.
    emit_blocking(args.kind, args.text, data)
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    """Standard library only, like `emit`: it runs after every tool call of a session."""
    from coordinator.errors import CoveyError
    from coordinator.notify import hook_input_from_stdin, news

    hook = args.format == "claude-hook"
    asked_by = hook_input_from_stdin() if hook else None
    try:
        said = news(args.name or args.identity, args.format, asked_by)
    except CoveyError as err:
        if not hook:
            raise
        # Claude Code feeds a hook's stderr to the model on exit 2: covey's "bad input"
        # must not land in the session's context, so a hook's problem is exit 1 (shown
        # to the person only).
        print(f"covey notify: {err}", file=sys.stderr)
        return 1
    if said:
        print(said)
    return 0


async def cmd_supervise(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.metrics import Metrics
    from coordinator.supervisor import Supervisor

    if args.no_metrics:
        await Supervisor(covey.namespace, None).serve()
        return 0
    from coordinator.web import WebServer, create_app

    metrics = Metrics(covey.namespace)
    app = create_app(covey.namespace, metrics.registry)
    server = WebServer.bind(app, args.metrics_host, args.metrics_port, "--metrics-port")
    async with server.running():
        await Supervisor(covey.namespace, metrics).serve()
    return 0


async def cmd_web(covey: Covey, args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.web import WebServer, create_app

    server = WebServer.bind(create_app(covey.namespace), args.host, args.port)
    print(f"covey web: http://{args.host}:{server.port}/ (Ctrl-C stops it)", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(covey))  # as the supervisor does
    async with server.running():
        await stop.wait()
    return 0


async def cmd_web_token(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator import webtokens

    person = webtokens.person_named(covey.roster, args.person)
    if args.revoke:
        had = webtokens.revoke(covey.settings, person)
        text = f"Revoked {person}'s web token." if had else f"{person} had no web token."
        _emit(args, {"person": str(person), "revoked": had}, text)
        return 0
    issued = webtokens.issue(covey.settings, person)
    # Shown this once: only its hash is kept. Alone on stdout, for TOKEN=$(covey web token ada).
    _emit(args, {"person": issued.person, "token": issued.token}, issued.token)
    if not args.json:
        print(
            f"covey: {issued.person}'s web token (shown once; only its hash is kept, in "
            f"{issued.path}; any older one of theirs no longer works)",
            file=sys.stderr,
        )
    return 0


def _reload(covey: Covey) -> None:
    """Read covey.toml and the roster again; a broken covey.toml keeps the old ones."""
    from coordinator.display import printable
    from coordinator.errors import CoveyError

    try:
        covey.namespace.swap(covey.namespace.read_again())
    except CoveyError as err:
        print(f"covey: kept the old configuration: {printable(str(err))}", file=sys.stderr)


async def cmd_mcp(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.mcpserver import serve

    covey.me  # noqa: B018  # no identity, no server: one line now, not a failing tool later
    await serve(covey)
    return 0


async def cmd_runs(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.records import recent_runs
    from coordinator.render import printable as p

    if args.agent is not None:
        covey.roster.agent(args.agent)  # an unknown name is bad input, not an empty list
    records = await recent_runs(await covey.gateway(), args.agent, args.limit)
    # Run events are anyone's who may publish to covey.events: every field is neutralised.
    lines = [
        f"{r.at.isoformat(timespec='seconds')}  {p(r.agent):<16} {p(r.outcome):<18} "
        f"{_took(r.duration_seconds):>7}  {p(r.trigger or '-'):<8} {p(r.host):<12} {p(r.run_id)}"
        + (f"  ({p(r.reason)})" if r.reason else "")
        for r in records
    ]
    _emit(args, [r.to_dict() for r in records], "\n".join(lines) or "No runs recorded yet.")
    return 0


async def cmd_attach(covey: Covey, args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.display import printable
    from coordinator.session_view import SessionPrinter

    printer = SessionPrinter(sys.stdout, as_json=args.json)
    events = covey.namespace.attach(args.run, args.start, follow=not args.no_follow)
    reading = asyncio.ensure_future(_show_session(events, printer))
    # Ctrl-C detaches: it stops this reader and nothing else (the run is another process's).
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, reading.cancel)
    try:
        await reading
    except asyncio.CancelledError:
        if not reading.cancelled():
            raise
        printer.end_tokens()
        resume = f" --from {printer.last_id}" if printer.last_id is not None else ""
        print(
            f"covey: detached; `covey attach {printable(args.run)}{resume}` resumes",
            file=sys.stderr,
        )
        return 130  # the shell's "interrupted": a script tells a detach from an ended run
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    printer.end_tokens()
    return 0


async def cmd_stop(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.display import printable

    finished = await covey.stop(args.run, reason=args.reason, wait=args.wait)
    data = finished.model_dump(mode="json", exclude_none=True)
    what = f"{finished.agent} run {finished.run_id}"
    if finished.stopped_by is not None:
        text = f"Stopped {what} after {_took(finished.duration_seconds)} ({finished.reason})."
    else:  # it ended by itself before the request reached it
        text = f"{what} ended {finished.outcome} before the stop reached it."
    _emit(args, data, printable(text))
    return 0


async def _show_session(events: Any, printer: Any) -> None:
    async with contextlib.aclosing(events):
        async for event_id, event in events:
            printer.show(event_id, event)


async def cmd_sessions(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.session_reader import list_sessions, watch_sessions

    namespace = covey.namespace
    async with contextlib.AsyncExitStack() as stack:
        # Listening starts before the list is read, so nothing opens unseen in between.
        opened = await stack.enter_async_context(watch_sessions(namespace)) if args.follow else None
        runs = await list_sessions(namespace, args.limit)
        if args.json:
            for record in runs:
                print(json.dumps(record.to_dict()))
        else:
            print(_SESSIONS_HEADER)
            print("\n".join(_session_row(r.to_dict()) for r in runs) or "No sessions yet.")
        sys.stdout.flush()
        seen = {r.run_id for r in runs}
        if opened is None:
            return 0
        async for event in opened:
            if event.run_id in seen:
                continue
            seen.add(event.run_id or "")
            row = {
                "agent": event.agent,
                "run_id": event.run_id,
                # One made after a lost connection may say its run has ended already.
                "outcome": event.outcome or "running",
                "started_at": (event.since or event.at).isoformat(),
                "first_id": event.first_id,
            }
            print(json.dumps(row) if args.json else _session_row(row), flush=True)
    return 0


_SESSIONS_HEADER = f"{'AGENT':<16} {'RUN':<24} {'STATE':<12} STARTED"


def _session_row(row: dict[str, Any]) -> str:
    from coordinator.render import printable as p

    started = str(row.get("started_at") or "-")[:19]
    return (
        f"{p(str(row['agent'])):<16} {p(str(row['run_id'])):<24} {p(row['outcome']):<12} {started}"
    )


async def cmd_status(covey: Covey, args: argparse.Namespace) -> int:
    import asyncio

    from coordinator import replicas
    from coordinator.display import printable
    from coordinator.names import Address
    from coordinator.render import status_table
    from coordinator.status import agent_statuses, pending

    # The management API (replicas) is asked while the broker is (the agents).
    asking = asyncio.ensure_future(replicas.replicas(covey.settings))
    agents = await agent_statuses(covey.namespace)
    humans = {
        h: await pending(covey.namespace, Address("human", h)) for h in sorted(covey.roster.humans)
    }
    queues = await asking
    if args.json:
        data: dict[str, Any] = {"agents": [a.to_dict() for a in agents], "humans": humans}
        if queues is not None:
            data["replicas"] = [q.to_dict() for q in queues]
        _emit(args, data, "")
        return 0
    print(status_table(agents, humans))
    for line in replicas.summary(queues or []):
        print(printable(line))
    return 0


def _echo_lines(lines: list[str]) -> None:
    """The agent's output on `covey run`'s own: a chunk's lines in one write, not a
    print each (that was a quarter of the runner's CPU for a fast agent)."""
    sys.stdout.write("".join(f"{line}\n" for line in lines))


def _asker(covey: Covey) -> str | None:
    """Who asks, when covey knows (--as, COVEY_AGENT or covey.toml); else nobody named."""
    from coordinator.errors import CoveyError

    try:
        return str(covey.me)
    except CoveyError:
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _took(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


async def cmd_log_add(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.render import printable

    entry = await covey.log_add(args.summary, _body(args), args.tag)
    _emit(args, entry.model_dump(mode="json"), f"Logged: {printable(entry.summary)}")
    return 0


async def cmd_log(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.render import changelog_text

    entries = await covey.log(args.since, args.author, args.tag_filter, args.limit)
    _emit(args, [logged.to_dict() for logged in entries], changelog_text(entries))
    return 0


async def cmd_digest(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.errors import CoveyError

    news = await covey.namespace.digest(args.name)
    if args.format == "claude-hook":
        hook = {
            "hookSpecificOutput": {
                "hookEventName": "SessionStart",
                "additionalContext": news.text,
            }
        }
        print(json.dumps(hook))
    elif args.format == "json" or args.json:
        print(json.dumps(news.to_dict(), indent=2))
    else:
        print(news.text)
    sys.stdout.flush()  # the session gets its digest even if moving the cursor fails
    if args.advance and news.upto is not None:
        try:
            await covey.namespace.advance(args.name, news.upto, wait=5.0)
        except CoveyError as err:
            print(f"covey: cursor not moved, the next digest repeats this ({err})", file=sys.stderr)
    return 0


async def cmd_dead_list(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator import dead
    from coordinator.render import age, printable

    letters = await dead.everything(await covey.gateway(), covey.settings.user_prefix)
    lines = [
        f"{printable(x.id[:12])}  {printable(x.reason):<15} {printable(x.routing_key):<24} "
        f"{age(x.dead_at) + ' ago' if x.dead_at else '?':>8}  {printable(x.detail)[:80]}"
        + (f"  [unverified: claims {printable(str(x.claimed_signer))}]" if not x.verified else "")
        for x in letters
    ]
    _emit(args, [x.to_dict() for x in letters], "\n".join(lines) or "No dead letters.")
    return 0


async def cmd_dead_show(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator import dead
    from coordinator.render import printable

    letters = await dead.everything(await covey.gateway(), covey.settings.user_prefix)
    # A crash while dead-lettering can leave two copies of one letter: show one.
    letter = dead.by_ids([args.id])(letters)[0]
    data = letter.to_dict(with_body=True)
    fields = [f"{k + ':':<12} {printable(str(v))}" for k, v in data.items() if k != "body"]
    # The body is whoever published it's: quoted, so no line of it reads as a field.
    body = printable(data["body"], multiline=True).split("\n")
    text = "\n".join([*fields, "body:", *(f"> {line}" for line in body)])
    _emit(args, data, text)
    return 0


async def cmd_dead_replay(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator import dead
    from coordinator.errors import ExitCode
    from coordinator.render import printable

    gateway = await covey.gateway()
    sent, kept = await dead.replay(gateway, covey.settings.user_prefix, dead.by_ids(args.ids))
    text = "\n".join(f"replayed {printable(x.id)} to {printable(x.replay_key)}" for x in sent)
    if sent or args.json:
        replayed = {"replayed": [x.id for x in sent], **({"kept": kept} if kept else {})}
        _emit(args, replayed, text)
    for letter_id, why in kept.items():
        print(
            f"covey: {printable(letter_id)} is still dead: {printable(why)} (no such "
            "recipient); add the recipient and run `covey topology apply`, then replay it",
            file=sys.stderr,
        )
    return int(ExitCode.NO_RECIPIENT) if kept else 0


async def cmd_dead_purge(covey: Covey, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from coordinator import dead

    cutoff = datetime.now(UTC) - timedelta(seconds=args.older_than)
    gateway = await covey.gateway()
    gone = await dead.purge(gateway, covey.settings.user_prefix, dead.older_than(cutoff))
    _emit(args, {"purged": [x.id for x in gone]}, f"Purged {len(gone)} dead letters.")
    return 0


async def cmd_provision(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.provision import host_name, provision

    await covey.namespace.apply_topology()  # the grants name what it declares
    host = args.host or host_name(covey.settings.host)
    done = provision(covey.settings, covey.roster, host, args.rotate, print_only=args.print)
    lines = []
    for x in done:
        where = x.url if x.url is not None else x.file
        if x.action == "kept-without-credentials":
            where = f"no credentials file; `covey provision --rotate {x.holder.split()[0]}`"
        lines.append(f"{x.action:<8} {x.user:<32} {x.holder:<24} {where or ''}".rstrip())
    _emit(args, [x.to_dict() for x in done], "\n".join(lines))
    return 0


async def cmd_demo(covey: Covey, args: argparse.Namespace) -> int:
    from coordinator.demo import run_demo

    return await run_demo(covey.settings, keep=args.keep)


# -- output -----------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _emit_list(args: argparse.Namespace, mails: Sequence[Mail], empty: str) -> None:
    from coordinator.render import mail_list

    if args.json:
        print(json.dumps([m.to_dict() for m in mails], indent=2))
    else:
        print(mail_list(mails) if mails else empty)


def _body(args: argparse.Namespace) -> str:
    from coordinator.errors import BadInput

    if args.body_file is not None:
        try:
            return Path(args.body_file).read_text()
        except OSError as err:
            raise BadInput(f"cannot read --body-file {args.body_file}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise BadInput(f"--body-file {args.body_file} is not UTF-8 text") from None
    if args.body == "-":
        try:
            return sys.stdin.buffer.read().decode()
        except UnicodeDecodeError:
            raise BadInput("standard input is not UTF-8 text") from None
    return args.body or ""


# -- parsing -----------------------------------------------------------------------


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `command`, of that one alone when it is one (the
    others' parsers cost a cold start about 4 ms and are never used)."""
    parser = argparse.ArgumentParser(
        prog="covey",
        description="Durable mail, locks and memory for agents, on RabbitMQ.",
        epilog="Exit codes: 0 ok, 1 failed, 2 bad input, 3 no such recipient, 4 broker "
        "unavailable, 5 skipped (lock busy), 6 skipped (preflight), 7 timed out, 8 lock lost, "
        "9 session no longer retained, 70 a bug in covey.",
    )
    parser.add_argument("--version", action="version", version=f"covey {__version__}")
    commands = _Commands(parser, command)
    # In this order `covey --help` lists them: mail first, since models use it most.
    _add_mail_commands(commands)
    _add_topology_command(commands)
    _add_run_command(commands)
    _add_changelog_commands(commands)
    _add_dead_commands(commands)
    _add_supervision_commands(commands)
    _add_setup_commands(commands)
    if command is not None and command not in commands.parsers.choices:
        return build_parser()  # not a command: argparse says so, listing them all
    return parser


class _Commands:
    """The `covey COMMAND` parsers as they are built, and the options all of them take."""

    def __init__(self, parser: argparse.ArgumentParser, wanted: str | None = None) -> None:
        self.wanted = wanted  # the only command to build, when not None
        self.common = argparse.ArgumentParser(add_help=False)
        self.common.add_argument(
            "--as", dest="identity", metavar="NAME", help="act as this participant"
        )
        self.common.add_argument("--json", action="store_true", help="print JSON for programs")
        self.common.add_argument(
            "-v", "--verbose", action="store_true", help="log progress to stderr"
        )
        self.parsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        self, name: str, handler: Handler | MailboxHandler, help: str
    ) -> argparse.ArgumentParser:
        """A command with the common options, run by `handler`, its help its description."""
        sub = self.parser(name, parents=[self.common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """The parser of command `name`; for a command other than the one wanted, a
        detached one that is never used."""
        if self.wanted is not None and name != self.wanted:
            return argparse.ArgumentParser(add_help=False)
        return self.parsers.add_parser(name, **kwargs)


def _body_options(sub: argparse.ArgumentParser) -> None:
    """Where a message's text comes from, and how long its sending may take."""
    source = sub.add_mutually_exclusive_group()
    source.add_argument("--body", help="the message text; '-' reads standard input")
    source.add_argument("--body-file", metavar="PATH", help="read the message text from PATH")
    sub.add_argument(
        "--timeout",
        dest="send_timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="give up (exit 4) if the broker has not taken it by then (default 10)",
    )


def _add_mail_commands(commands: _Commands) -> None:
    send = commands.add("send", cmd_send, "send mail; prints its id once the broker has it")
    send.add_argument("to", help="agent:NAME, NAME, team:NAME, human:NAME or all")
    send.add_argument("subject")
    _body_options(send)
    send.add_argument("--reply-to", metavar="ID", help="join the thread of message ID")

    reply = commands.add("reply", cmd_reply, "answer a message's sender, in its thread")
    reply.add_argument("id")
    reply.add_argument("--subject", help="default: Re: <original subject>")
    _body_options(reply)

    inbox = commands.add("inbox", cmd_inbox, "fetch new mail, then list what is not done")
    inbox.add_argument("--all", action="store_true", help="include done messages")

    read = commands.add("read", cmd_read, "show a whole message and mark it read")
    read.add_argument("id", help="a message id, or a unique prefix of one")

    done = commands.add("done", cmd_done, "archive messages: no longer listed, still searchable")
    done.add_argument("ids", nargs="+", metavar="ID")

    wait = commands.add("wait", cmd_wait, "block until new mail arrives, then list it")
    wait.add_argument("--timeout", type=_seconds, default=300.0, help="seconds (default 300)")

    search = commands.add("search", cmd_search, "full-text search of the mailbox, done included")
    search.add_argument("text")


def _add_topology_command(commands: _Commands) -> None:
    # A group, not a command: `covey topology` alone asks for its ACTION.
    topology = commands.parser("topology", help="the broker topology")
    actions = topology.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = actions.add_parser(
        "apply",
        parents=[commands.common],
        help="declare exchanges, queues and bindings for the roster",
    )
    apply.set_defaults(handler=cmd_topology_apply)


def _add_run_command(commands: _Commands) -> None:
    run = commands.add(
        "run", cmd_run, "run an agent once: lock, preflight, digest, process, outcome"
    )
    run.add_argument("name", help="the agent's name (its folder under agents/)")
    busy = run.add_mutually_exclusive_group()
    busy.add_argument(
        "--wait-lock",
        type=_duration,
        metavar="DURATION",
        help="wait this long for a busy lock (default: the agent's wait_lock)",
    )
    busy.add_argument("--skip-if-busy", action="store_true", help="exit 5 at once if busy")
    busy.add_argument(
        "--via-supervisor", action="store_true", help="ask a running `covey supervise` instead"
    )

    # Not `commands.add`: --as and --json (for output) mean nothing here, and --json is DATA.
    emit_help = "inside `covey run`: add an event to the run's session"
    emit = commands.parser("emit", help=emit_help, description=emit_help)
    emit.set_defaults(handler=cmd_emit)  # run by `_run_locally`, not `_run`
    emit.add_argument("kind", metavar="KIND", help="progress, token, tool, status or result")
    emit.add_argument("text", nargs="?", default="", metavar="TEXT", help="what to say")
    emit.add_argument("--json", dest="data", metavar="DATA", help="a JSON object to attach")
    emit.add_argument(
        "--fraction", type=_fraction, metavar="F", help="for progress: how far, from 0 to 1"
    )

    notify = commands.parser("notify", help=NOTIFY_HELP, description=NOTIFY_HELP)
    _notify_arguments(notify)


NOTIFY_HELP = "for a live session's hooks: one line about new mail, or nothing"


def _notify_arguments(notify: argparse.ArgumentParser) -> None:
    notify.set_defaults(handler=cmd_notify)  # run by `_run_locally`: no namespace, no broker
    notify.add_argument("name", nargs="?", metavar="NAME", help="whose mail (default: as --as)")
    notify.add_argument("--as", dest="identity", metavar="NAME", help="act as this participant")
    notify.add_argument(
        "--format",
        choices=("text", "claude-hook"),
        default="text",
        help="a line, or Claude Code's hook JSON (PostToolUse, UserPromptSubmit)",
    )


def _add_changelog_commands(commands: _Commands) -> None:
    log = commands.add("log", cmd_log, "the changelog: read it, or `covey log add` to it")
    log.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="an offset (#N), an ISO time, or a duration back from now (2h, 3d)",
    )
    log.add_argument("--author", help="only this participant's entries")
    log.add_argument("--tag", dest="tag_filter", metavar="TAG", help="only entries with TAG")
    log.add_argument("--limit", type=_positive_int, default=20, help="how many (default 20)")
    actions = log.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser(
        "add", parents=[commands.common], help="tell the others what you changed", description=None
    )
    add.add_argument("summary", help="one line")
    _body_options(add)
    add.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    add.set_defaults(handler=cmd_log_add)

    digest = commands.add("digest", cmd_digest, "what an agent would be told at start, right now")
    digest.add_argument("name", help="the agent")
    digest.add_argument(
        "--format",
        choices=["text", "json", "claude-hook"],
        default="text",
        help="claude-hook: the JSON a Claude Code SessionStart hook prints",
    )
    digest.add_argument(
        "--advance", action="store_true", help="move the agent's cursor past what is shown"
    )


def _add_dead_commands(commands: _Commands) -> None:
    # `covey dead` alone lists, as `covey dead list` does.
    dead = commands.add(
        "dead", cmd_dead_list, "dead and unroutable letters: list, show, replay, purge"
    )
    actions = dead.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[commands.common], help=help)
        sub.set_defaults(handler=handler)
        return sub

    action("list", cmd_dead_list, "every dead letter, with its reason")
    action("show", cmd_dead_show, "one dead letter, whole").add_argument("id")
    action("replay", cmd_dead_replay, "send dead letters to their recipients again").add_argument(
        "ids", nargs="+", metavar="ID"
    )
    action("purge", cmd_dead_purge, "drop old dead letters").add_argument(
        "--older-than", type=_duration, required=True, metavar="DURATION"
    )


def _add_supervision_commands(commands: _Commands) -> None:
    runs = commands.add("runs", cmd_runs, "recent runs and how they ended, oldest first")
    runs.add_argument("agent", nargs="?", help="only this agent's runs")
    runs.add_argument("--limit", type=_positive_int, default=20, help="how many (default 20)")

    attach = commands.add(
        "attach", cmd_attach, "show a run's session from its start (or later) and follow it"
    )
    attach.add_argument(
        "run", metavar="RUN_ID|AGENT", help="a run id, or an agent: its live run, else its last"
    )
    attach.add_argument(
        "--from",
        dest="start",
        type=_session_start,
        default="start",
        metavar="start|now|ID",
        help="from its start (default), from now, or after id ID (the last one you saw)",
    )
    attach.add_argument(
        "--no-follow", action="store_true", help="stop at what is there now, live or not"
    )
    stop = commands.add("stop", cmd_stop, "stop a live run, from anywhere; waits for it to end")
    stop.add_argument("run", metavar="RUN_ID|AGENT", help="a run id, or an agent: its live run")
    stop.add_argument("--reason", metavar="TEXT", help="why (kept in the run's record)")
    stop.add_argument(
        "--wait",
        type=_duration,
        metavar="DURATION",
        help="how long to wait for it to end (default: its grace plus 30 s)",
    )
    sessions = commands.add("sessions", cmd_sessions, "live and recent sessions, oldest first")
    sessions.add_argument(
        "--follow", action="store_true", help="then print each new one as it opens"
    )
    sessions.add_argument("--limit", type=_positive_int, default=20, help="how many (default 20)")

    commands.add(
        "status", cmd_status, "agents: pending mail, running or not, locks, last and next run"
    )
    supervise = commands.add(
        "supervise", cmd_supervise, "the daemon: run agents on cron, on mail and on request"
    )
    supervise.add_argument(
        "--metrics-port",
        "--port",
        type=int,
        default=9464,
        help="the web page, its API and Prometheus /metrics (default 9464)",
    )
    supervise.add_argument(
        "--metrics-host",
        "--host",
        default="127.0.0.1",
        help="address to serve them on (default 127.0.0.1)",
    )
    supervise.add_argument(
        "--no-metrics", action="store_true", help="serve nothing: no page, API or metrics"
    )
    commands.add("mcp", cmd_mcp, "serve your mailbox and the changelog as MCP tools, on stdio")
    web = commands.add("web", cmd_web, "serve the web page and its API alone, running no agents")
    web.add_argument("--port", type=int, default=9464, help="(default 9464)")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    # `covey web` alone serves; `covey web token NAME` gives a person a token for its actions.
    actions = web.add_subparsers(dest="action", metavar="ACTION")
    token = actions.add_parser(
        "token",
        parents=[commands.common],
        help="print a new token for a person's actions on the page (stop, run, mail)",
    )
    token.add_argument("person", metavar="NAME", help="a human in the roster (ada, human:ada)")
    token.add_argument("--revoke", action="store_true", help="remove NAME's token instead")
    token.set_defaults(handler=cmd_web_token)


def _add_setup_commands(commands: _Commands) -> None:
    provision = commands.add(
        "provision", cmd_provision, "a broker user per participant and supervisor host"
    )
    provision.add_argument(
        "--print", action="store_true", help="print new credentials once instead of writing files"
    )
    provision.add_argument(
        "--rotate", metavar="NAME", help="give NAME (a participant, or supervisor) a new password"
    )
    provision.add_argument(
        "--host", help="the supervisor host's name (default: the `host` setting)"
    )

    demo = commands.add(
        "demo", cmd_demo, "run the example agents in agents/ and show mail and a session"
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep its namespace, and say how to look at it"
    )


def _since(text: str) -> int | datetime:
    """An offset (`123` or `#123`), an ISO time (UTC unless it says), or a duration ago."""
    from coordinator.durations import parse_since

    try:
        return parse_since(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _session_start(text: str) -> int | str:
    """`start`, `now`, or an event id (a stream offset: a whole number, 0 or more)."""
    if text in ("start", "now"):
        return text
    if text.isascii() and text.isdigit():  # not "²", which isdigit() too
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not start, now or an event id (a number)")


def _duration(text: str) -> float:
    from coordinator.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError("seconds cannot be negative")
    return value


def _positive_seconds(text: str) -> float:
    """A wait that must allow some time: a publish that may not wait at all can never be
    confirmed, so 0 would send and report nothing true."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0 (the broker's confirm takes time)")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:  # NaN included
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 1")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive: give 1 or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["notify"]:
        # It runs after every tool call of a live session: its own parser only, not
        # every command's (a third of its start-up).
        notify = argparse.ArgumentParser(prog="covey notify", description=NOTIFY_HELP)
        _notify_arguments(notify)
        return _run_locally(cmd_notify, notify.parse_args(words[1:]))
    args = build_parser(
        words[0] if words[:1] and not words[0].startswith("-") else None
    ).parse_args(words)
    try:
        if args.handler in (cmd_emit, cmd_notify):
            return _run_locally(args.handler, args)
        if args.handler in MAILBOX_COMMANDS:
            return _run_locally(_on_own_mailbox, args)
        import asyncio  # not for `emit`: a third of its start-up

        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


def _run_locally(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A command that needs no namespace: its errors reported as `_run` reports them."""
    from coordinator.display import printable
    from coordinator.errors import CoveyError

    try:
        return command(args)
    except CoveyError as err:
        print(f"covey: {printable(str(err))}", file=sys.stderr)
        return int(err.exit_code)
    except Exception as err:
        if os.environ.get("COVEY_DEBUG"):
            raise
        return _bug(err)


def _on_own_mailbox(args: argparse.Namespace) -> int:
    """read, done, search: on the mailbox found without the namespace (offline.py) when
    the identity is plain, else through the namespace, whose checks say what is wrong."""
    from coordinator.offline import own_mailbox

    found = own_mailbox(args.identity)
    if found is None:
        import asyncio

        return asyncio.run(_run(args))
    me, mailbox = found
    try:
        result: int = args.handler(mailbox, me, args)
        return result
    finally:
        mailbox.close()


async def _run(args: argparse.Namespace) -> int:
    from coordinator.display import printable
    from coordinator.errors import CoveyError, ExitCode

    covey: Covey | None = None
    try:
        from coordinator import logs
        from coordinator.client import Covey
        from coordinator.settings import require_home

        daemon = args.handler is cmd_supervise
        # `send --timeout` bounds connecting and the broker's confirm alike.
        timeout = getattr(args, "send_timeout", None)
        overrides = {"connect_timeout": timeout} if timeout else {}
        covey = Covey.open(identity=args.identity, home=require_home(), **overrides)
        logs.configure(covey.settings.log_format, "info" if args.verbose or daemon else "warning")
        _warn_broken(covey, args, daemon)
        if args.handler in MAILBOX_COMMANDS:
            mailbox_result: int = args.handler(covey.store, covey.me, args)
            return mailbox_result
        result: int = await args.handler(covey, args)
        return result
    except CoveyError as err:
        # One line, whatever a participant put into it (a lock holder's name, an id).
        print(f"covey: {printable(str(err))}", file=sys.stderr)
        return int(err.exit_code)
    except Exception as err:
        if os.environ.get("COVEY_DEBUG"):
            raise
        if refused := _refused(err):
            # The broker said no to this user, which is an answer, not a lost connection.
            print(f"covey: RabbitMQ refused: {printable(refused)}", file=sys.stderr)
            return int(ExitCode.BROKER_UNAVAILABLE)
        if _lost_broker(err):
            print(f"covey: lost RabbitMQ ({err}); check that it runs, then retry", file=sys.stderr)
            return int(ExitCode.BROKER_UNAVAILABLE)
        return _bug(err)
    finally:
        if covey is not None:
            with contextlib.suppress(Exception):  # the answer is given; closing is best effort
                await covey.close()


def _refused(err: Exception) -> str | None:
    """The broker's words, when it refused this user an operation (a provisioned
    participant reaching beyond its permissions); None for any other error."""
    import aiormq  # loaded already, if a broker was involved

    if not isinstance(err, aiormq.exceptions.ChannelAccessRefused):
        return None
    from coordinator.gateway import reply_text

    return f"{reply_text(err)}: this user lacks the permission (`covey provision` grants them)"


def _bug(err: Exception) -> int:
    from coordinator.errors import ExitCode

    print(
        f"covey: internal error: {type(err).__name__}: {err} (a bug in covey; "
        "COVEY_DEBUG=1 shows the traceback)",
        file=sys.stderr,
    )
    return int(ExitCode.INTERNAL)


def _warn_broken(covey: Covey, args: argparse.Namespace, daemon: bool) -> None:
    """One line per broken agent: the others work on. An agent this command names is
    not warned about, since the command refuses it with the same line."""
    from coordinator import logs
    from coordinator.errors import CoveyError
    from coordinator.names import Address

    named = set()
    identity = args.identity or os.environ.get("COVEY_AGENT") or covey.settings.identity
    for text in (*(getattr(args, key, None) for key in ("to", "name", "agent")), identity):
        with contextlib.suppress(CoveyError):
            if text and (address := Address.parse(text)).kind == "agent":
                named.add(address.name)
    log = logs.get_logger(__name__)
    for agent, problem in covey.roster.broken.items():
        if agent not in named:
            (log.error if daemon else log.warning)("agent left out", agent=agent, problem=problem)


def _lost_broker(err: Exception) -> bool:
    """A connection that died under a command: the broker's trouble, not covey's bug."""
    if isinstance(err, ConnectionError):
        return True
    from aiormq.exceptions import AMQPError  # loaded already, if a broker was involved

    return isinstance(err, AMQPError)


if __name__ == "__main__":
    sys.exit(main())
