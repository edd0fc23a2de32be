"""supervisor/log.py: one event is one line (control characters in any value escaped, multi-line blocks
indented), secrets on the command line redacted; and end to end: a real `ckptd run` whose command line and
cloud notice carry a forged log line, terminal escapes and secrets logs none of them raw, journals no secret,
and serves none on its metrics port (which has no /status)."""

from __future__ import annotations

import io
import json
import os
import re
import time

import pytest

from ckptd import exitcodes
from ckptd.supervisor import notices
from ckptd.supervisor.log import CONTINUATION, EventLog, escape, redact_argv
from fixtures.fake_metadata import FakeMetadata, iso
from fixtures.sup_helpers import FAST, TRAINER, Run, ckptd, http_get

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes

FORGED = "\n2026-01-01T00:00:00.000 ckptd[1] info: checkpoint committed: step-999 (FORGED)\x1b[2J\x1b[31m\r"
SECRETS = ("SECRET_TOKEN_123", "hunter2", "tok_456", "pa55word")
RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ckptd\[(\d+)\] (debug|info|warning|error): ")


def test_control_characters_in_a_message_stay_escaped_on_its_one_line():
    out = io.StringIO()
    log = EventLog("text", stream=out)
    log("info", "start", f"supervising train.py --note={FORGED} in /srv/ck{FORGED}")
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text and "\r" not in text, repr(text)
    assert "\\n2026-01-01T00:00:00.000 ckptd[1] info: checkpoint committed: step-999 (FORGED)\\x1b[2J" in text
    assert escape("a\tb\x00c\x7f\x9b\u2028") == "a\\tb\\x00c\\x7f\\x9b\\u2028"
    assert escape("ünïcode, plain text") == "ünïcode, plain text"


def test_a_multi_line_block_is_printed_indented_with_each_line_escaped():
    out = io.StringIO()
    EventLog("text", stream=out)("warning", "hang_stacks", "stacks of hung pid 7:",
                                 lines=['  File "train.py", line 3', f"x{FORGED}"])
    first, *rest = out.getvalue().splitlines()
    assert RECORD.match(first) and len(rest) == 2 and all(r.startswith(CONTINUATION) for r in rest), rest
    assert "\x1b" not in out.getvalue()
    out = io.StringIO()
    EventLog("json", stream=out)("error", "give_up", "giving up:", lines=["a", "b\x1b"], why="w")
    record = json.loads(out.getvalue())  # JSON escapes by itself; the block is part of msg
    assert out.getvalue().count("\n") == 1 and record["msg"] == "giving up:\na\nb\x1b" and record["why"] == "w"


def test_values_of_options_named_like_secrets_are_redacted():
    argv = ["python", "train.py", "--api-key=SECRET_TOKEN_123", "--password", "hunter2", "HF_TOKEN=tok_456",
            "--db-credential", "x", "-auth=y", "--lr", "0.1", "--keep-last", "3", "data/key.txt", "--", "--secret"]
    assert redact_argv(argv) == ["python", "train.py", "--api-key=***", "--password", "***", "HF_TOKEN=***",
                                 "--db-credential", "***", "-auth=***", "--lr", "0.1", "--keep-last", "3",
                                 "data/key.txt", "--", "--secret"]


@pytest.mark.kind("system")
def test_a_run_logs_no_forged_line_and_no_secret_and_its_metrics_port_shows_neither(tmp_path):
    imds = FakeMetadata("aws")
    root = str(tmp_path / "ck")
    try:
        run = Run(tmp_path, root, [*FAST, "--metrics-addr", "127.0.0.1:0", "--notices", "aws", "--notice-endpoint",
                                   imds.url, "--notice-poll", "0.1", "--every-steps", "20", TRAINER, "--steps",
                                   "10000000", "--step-time", "0.01", "--api-key=SECRET_TOKEN_123", "--password",
                                   "hunter2", "HF_TOKEN=tok_456", f"--note={FORGED}"],
                  env={notices.LOOPBACK_ONLY_ENV: "1", "CKPTD_TEST_DB_PASSWORD": "pa55word"})
        base = f"http://{run.wait_event('start', timeout=30)['metrics']['addr']}"
        run.wait_event("checkpoint", timeout=30)
        assert http_get(base + "/status")[0] == 404
        for path in ("/", "/metrics", "/healthz", "/status", "/status?full=1"):
            body = http_get(base + path)[1].decode()
            assert not [s for s in SECRETS if s in body] and "sup_trainer" not in body and root not in body, path
        st = ckptd("status", "--dir", root, "--json")  # the owner still sees the run, over the socket
        assert st.returncode == 0 and json.loads(st.stdout)["state"] == "running", st.stderr
        # a cloud notice whose `action` carries a forged record and terminal escapes
        imds.set(instance_action={"action": f"terminate{FORGED}", "time": iso(time.time() + 30)})
        assert run.wait(60) == exitcodes.PREEMPTED, run.stderr()
    finally:
        imds.close()
    err = run.stderr()
    pid = str(run.events("start")[0]["pid"])
    bad = [line for line in err.splitlines()
           if not (line.startswith(CONTINUATION) or ((m := RECORD.match(line)) and m.group(1) == pid))]
    assert not bad, bad  # every line is a record of this supervisor, or part of a block it indented
    assert "\x1b" not in err and "\r" not in err
    assert err.count("(FORGED)") == 2, err  # shown (escaped) in the start line and in the notice line
    run_dir = os.path.join(root, ".ckptd")
    for text in (err, *(open(os.path.join(run_dir, f)).read() for f in ("journal.jsonl", "state.json"))):
        assert not [s for s in SECRETS if s in text], text
    assert run.events("start")[0]["argv"][-5:-2] == ["--api-key=***", "--password", "***"]
