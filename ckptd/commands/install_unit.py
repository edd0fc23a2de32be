"""ckptd install-unit JOB --config FILE [--user] [--dry-run] SCRIPT.py [ARGS...]: run a job as `ckptd@JOB`.

Checks the config first (exit 78 naming key and line), then writes it where the unit expects it
(``%E/ckptd/JOB.yaml``: /etc/ckptd/ for the system manager, $XDG_CONFIG_HOME/ckptd/ for ``--user``), the
command to ``JOB.env`` (read by systemd, mode 0600), the template unit with ExecStart pointing at this
ckptd, and a drop-in for what this job needs beyond the template (a checkpoint directory elsewhere, an
account that owns it, a Python under /home); then ``systemctl daemon-reload`` and ``enable``. ``--root DIR``
prepares an image instead (``systemctl --root=DIR enable``, nothing reloaded). ``--dry-run`` prints the plan.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from .. import store
from ..errors import CkptdError, ConfigError
from ..supervisor import config as configmod
from ..supervisor.journal import write_text_atomic
from . import UsageError, print_json
from .run import command_argv

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "units", "ckptd@.service")
PLACEHOLDER = "/usr/local/bin/ckptd"  # the template's ExecStart, replaced by this installation's ckptd
JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
HIDDEN_HOMES = ("/home", "/root", "/run/user")  # ProtectHome=yes hides them from the service


@dataclass
class Plan:
    job: str
    unit: str
    manager: str  # "system", "user" or "image"
    command: list[str] = field(default_factory=list)  # CKPTD_COMMAND, as `ckptd run` gets it
    files: dict[str, str] = field(default_factory=dict)  # path -> content
    modes: dict[str, int] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    makedirs: list[tuple[str, str | None]] = field(default_factory=list)  # (dir, owner) to create
    remove: list[str] = field(default_factory=list)  # a drop-in of an earlier install this one no longer needs

    def as_dict(self) -> dict:
        out = asdict(self)
        out["files"] = sorted(self.files)
        out["modes"] = {p: oct(m) for p, m in self.modes.items()}
        return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "install-unit", help="install a training job as the systemd service ckptd@JOB",
        usage="ckptd install-unit JOB --config FILE [--user] [--now] [--dry-run] SCRIPT.py [ARGS...]\n"
              "       ckptd install-unit JOB --config FILE [options] -- CMD [ARGS...]",
        description="Check FILE, copy it to /etc/ckptd/JOB.yaml (--user: $XDG_CONFIG_HOME/ckptd/), write the "
        "command to JOB.env, install the ckptd@.service template with ExecStart pointing at this ckptd, reload "
        "systemd and enable ckptd@JOB so it starts at every boot and resumes from the newest valid checkpoint.",
        epilog="Exit codes: 0 installed (or planned, --dry-run), 78 error in FILE, 2 bad command line, "
        "4 script not found, 1 systemctl failed, 5 a file could not be written.")
    p.add_argument("--config", metavar="FILE", help="the job's `ckptd run` YAML config (required)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the calling user's service manager")
    where.add_argument("--root", metavar="DIR", help="install into the system image at DIR (enable offline)")
    p.add_argument("--run-as", metavar="USER", help="run as this existing account instead of a dynamic user "
                   "(needed when the config's dir is elsewhere, e.g. a shared file system owned by USER)")
    p.add_argument("--now", action="store_true", help="also start it now")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    # JOB, then options, then the command: argparse's REMAINDER would swallow options after JOB, so the
    # words are split here (_split) and the options parsed again.
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="JOB [options] SCRIPT.py [ARGS...] | -- CMD [ARGS...]",
                   help="job name (the unit is ckptd@JOB.service), then what it runs (as for `ckptd run`)")
    p.set_defaults(func=lambda args: run(args, p))


VALUE_OPTIONS = ("--config", "--root", "--run-as")


def _split(words: list[str]) -> tuple[str, list[str], list[str]]:
    """``JOB [options] COMMAND...`` -> (JOB, options, COMMAND); options end at the first other word or ``--``."""
    if not words or words[0].startswith("-"):
        raise UsageError("no JOB given; write `ckptd install-unit JOB --config FILE SCRIPT.py [ARGS...]`")
    job, rest, options = words[0], list(words[1:]), []
    while rest and rest[0].startswith("--") and rest[0] != "--":
        word = rest.pop(0)
        options.append(word)
        if word in VALUE_OPTIONS and rest:
            options.append(rest.pop(0))
    return job, options, rest


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    args.job, options, args.command = _split(args.words)
    parser.parse_args(options, namespace=args)
    if not args.config:
        raise UsageError("--config FILE is required: the job's `ckptd run` config")
    plan = make_plan(args)
    if args.json:
        print_json({**plan.as_dict(), "dry_run": args.dry_run})
    else:
        verb = "would " if args.dry_run else ""
        for path in plan.files:
            print(f"{verb}write {path}")
        for path in plan.remove:
            print(f"{verb}remove {path}")
        for cmd in plan.commands:
            print(f"{verb}run {' '.join(cmd)}")
        for note in plan.notes:
            print(f"note: {note}")
    if not args.dry_run:
        apply(plan)
        if not args.json:
            print(f"installed {plan.unit}" + (" and started it" if args.now else "")
                  + f"; see `systemctl{' --user' if plan.manager == 'user' else ''} status {plan.unit}`")
    return 0


def make_plan(args: argparse.Namespace) -> Plan:
    if not JOB_RE.match(args.job):
        raise UsageError(f"job name {args.job!r}: use letters, digits, '_', '.', '-' (up to 64), e.g. llama-7b")
    cfg = configmod.resolve(args.config, {})  # exit 78 naming key and line: nothing is written
    words = list(args.command)
    argv = command_argv(words)
    if words[0] == "--":  # the service's PATH is systemd's, not this shell's: name the command's full path
        command = ["--", os.path.abspath(shutil.which(argv[0]) or argv[0]), *argv[1:]]
    else:
        command = [os.path.abspath(words[0]), *words[1:]]
    for word in command:
        problem = configmod.control_character(word)  # the command goes into JOB.env, one line per variable
        if problem:
            raise UsageError(f"argument {configmod.show(word)} {problem}")
        if not word or any(c.isspace() or c in "'\"\\" for c in word):
            raise UsageError(f"argument {word!r}: systemd splits the command at spaces, and quotes or backslashes "
                             "do not survive; put the command in a small wrapper script and install that")
    manager = "user" if args.user else "image" if args.root else "system"
    if args.run_as and manager == "user":
        raise UsageError("--run-as is for system units; a user unit runs as you")
    etc, unit_dir = _dirs(manager, args.root)
    plan = Plan(args.job, f"ckptd@{args.job}.service", manager, command)
    config_path = os.path.join(etc, "ckptd", f"{args.job}.yaml")
    env_path = os.path.join(etc, "ckptd", f"{args.job}.env")
    with open(args.config, encoding="utf-8") as f:
        plan.files[config_path] = f.read()
    plan.modes[config_path] = 0o644  # read by ckptd, as the service's user
    plan.files[env_path] = ("# written by `ckptd install-unit`; systemd reads it (ExecStart= ... $CKPTD_COMMAND)\n"
                            f"CKPTD_COMMAND='{' '.join(command)}'\n")
    plan.modes[env_path] = 0o600  # read by the service manager only
    plan.files[os.path.join(unit_dir, "ckptd@.service")] = render_unit(manager)
    seen = config_path if manager == "user" else f"/etc/ckptd/{args.job}.yaml"  # as the service sees it
    dropin = _dropin(plan, cfg, command, args, manager, [seen])
    dropin_path = os.path.join(unit_dir, f"{plan.unit}.d", "50-install-unit.conf")
    if dropin:
        plan.files[dropin_path] = dropin
    elif os.path.exists(dropin_path):
        plan.remove.append(dropin_path)
    systemctl = ["systemctl", "--user"] if manager == "user" else ["systemctl"]
    if manager == "image":
        plan.commands.append(["systemctl", f"--root={args.root}", "enable", plan.unit])
        if args.now:
            raise UsageError("--now starts the unit on this machine; with --root it starts at the image's boot")
    else:
        plan.commands.append([*systemctl, "daemon-reload"])
        plan.commands.append([*systemctl, "enable", *(["--now"] if args.now else []), plan.unit])
    return plan


def _dirs(manager: str, root: str | None) -> tuple[str, str]:
    if manager == "user":
        config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return config_home, os.path.join(config_home, "systemd", "user")
    base = os.path.abspath(root) if root else "/"
    return os.path.join(base, "etc"), os.path.join(base, "etc", "systemd", "system")


def unit_word(key: str, value: str, *, exec_line: bool = False) -> str:
    """``value`` as one word of a unit-file setting, by systemd's own rules (systemd.syntax(7), systemd.unit(5)
    "Specifiers", systemd.service(5) "Command lines"): ``%`` doubled (specifiers are expanded after the word is
    unquoted), ``$`` doubled on an Exec line, and the word put in double quotes, each backslash and double quote
    in it escaped by a backslash, when it holds blanks, quotes, backslashes or ``;``. A newline or any other
    control character cannot be written into a unit safely (it would end the line and start a directive of its
    own): refused, naming ``key`` (exit 78)."""
    problem = configmod.control_character(value)
    if problem:
        raise ConfigError(f"{key} {configmod.show(value)} {problem}")
    word = value.replace("%", "%%")
    if exec_line:
        word = word.replace("$", "$$")
    if not word or any(c.isspace() or c in "\"'\\;" for c in word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_unit(manager: str) -> str:
    """The template with ExecStart pointing at this installation; for a user manager, what it forces."""
    with open(TEMPLATE, encoding="utf-8") as f:
        text = f.read()
    exe = " ".join(unit_word("ckptd's own path", w, exec_line=True) for w in ckptd_argv())
    text = text.replace(f"ExecStart={PLACEHOLDER} ", f"ExecStart={exe} ", 1)
    if manager == "user":  # a user manager runs every unit as its own user and has no multi-user.target
        text = text.replace("\nDynamicUser=yes\n", "\n")
        text = text.replace("WantedBy=multi-user.target", "WantedBy=default.target")
    return text


def ckptd_argv() -> list[str]:
    """How the unit runs this ckptd: the script beside this Python, else the one on PATH, else ``python -m``."""
    beside = os.path.join(os.path.dirname(sys.executable), "ckptd")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("ckptd")
    return [found] if found else [sys.executable, "-m", "ckptd"]


def ckptd_executable() -> str:
    return " ".join(ckptd_argv())


def _dropin(plan: Plan, cfg: configmod.Config, command: list[str], args: argparse.Namespace, manager: str,
            read_paths: list[str]) -> str:
    service, unit = [], []
    if args.run_as in ("root", "nobody"):
        raise UsageError(f"--run-as {args.run_as}: give the job an account of its own (useradd --system ckptd); "
                         "root defeats the sandbox and `nobody` is shared by everything")
    if args.run_as:
        if not USER_RE.match(args.run_as):
            raise UsageError(f"--run-as {configmod.show(args.run_as)}: not an account name (letters, digits, "
                             "'_', '.', '-')")
        try:
            pwd.getpwnam(args.run_as)
        except KeyError:
            raise UsageError(f"--run-as {args.run_as}: no such account; create it (useradd --system "
                             f"{args.run_as}) or leave --run-as out to use a dynamic user") from None
        service += ["DynamicUser=no", f"User={unit_word('--run-as', args.run_as)}"]
    if os.path.isabs(cfg.dir):
        if manager != "user" and not args.run_as:
            raise UsageError(f"the config's dir {cfg.dir} is outside the service's state directory; give --run-as "
                             "USER (an account that may write there: a dynamic user's uid is only known at start) "
                             "or use a relative dir (it lands in /var/lib/ckptd/JOB/)")
        where = f"{args.config}: key 'dir'"
        service.append(f"ReadWritePaths={unit_word(where, cfg.dir)}")
        unit.append(f"RequiresMountsFor={unit_word(where, cfg.dir)}")  # a shared file system is mounted first
        plan.makedirs.append((cfg.dir, args.run_as))
    script = command[0] if command[0] != "--" else None
    used = [os.path.realpath(ckptd_argv()[0]), os.path.realpath(sys.executable), *read_paths,
            *([os.path.realpath(script)] if script else [])]
    in_home = sorted({p for p in used if any(p == h or p.startswith(h + "/") for h in HIDDEN_HOMES)})
    if in_home:
        service.append("ProtectHome=read-only")
        plan.notes.append(f"{', '.join(in_home)} under a home directory: the unit's ProtectHome= is relaxed to "
                          "read-only; install Python, ckptd and the script under /opt or /srv to keep homes hidden")
    tmp = [p for p in used if p.startswith(("/tmp/", "/var/tmp/"))]
    if tmp and manager != "user":
        raise UsageError(f"{tmp[0]} is under /tmp, which the service does not see (PrivateTmp=yes); "
                         "install it under /opt or /srv")
    if not service and not unit:
        return ""
    lines = ["# written by `ckptd install-unit` for this job"]
    if unit:
        lines += ["[Unit]", *unit]
    lines += ["[Service]", *service]
    return "\n".join(lines) + "\n"


def apply(plan: Plan) -> None:
    for path, content in plan.files.items():
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        write_file(path, content, plan.modes.get(path, 0o644))
    for path in plan.remove:
        os.unlink(path)
    for directory, owner in plan.makedirs:
        if not os.path.isdir(directory) and plan.manager != "image":
            os.makedirs(directory, mode=0o750)
            if owner:  # through a descriptor of the directory just made: never a link swapped in since
                entry = pwd.getpwnam(owner)
                fd = store.open_dir(directory)
                try:
                    os.fchown(fd, entry.pw_uid, entry.pw_gid)
                finally:
                    os.close(fd)
    for cmd in plan.commands:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise CkptdError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): "
                             f"{' '.join((r.stderr or r.stdout).split()) or 'no output'}")


def write_file(path: str, content: str, mode: int) -> None:
    """A unit or config is never seen half-written (temp, fsync, rename, fsync the directory), never written
    through a link, and never into a directory another account could write (it would rewrite root's units)."""
    write_text_atomic(path, content, mode, check=store.unshared_dir)
