"""Sweeps: the space file, bad input in one line, a study of tiny runs with a trial pruned at
an evaluation, SIGTERM and SIGKILL of a trial resumed from its run's checkpoint, and two
workers on one study (SQLite, and a real PostgreSQL server the test starts itself)."""

import dataclasses
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest

import helpers
import warm
from research.sweep import space as spaces
from research.sweep import study as sweeps
from research.sweep.study import SweepConfig

TINY = ["--batch_size=32", "--widths=8,16", "--res_blocks=1,0", "--stem_width=8",
        "--gradcam_images=0", "--progress=false", "--precision=float32", "--steps_per_loop=2"]


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("line,message", [
    ("--learning_rate=loguniform(1e-4, 3e-3)", None),
    ("--nonsense=uniform(0, 1)", "--nonsense is neither a train flag nor an option of "
                                 "--model=scratch"),
    ("--learning_rate=uniform(0.1)", "uniform(low, high) takes 2 numbers, got 1"),
    ("--learning_rate=normal(0, 1)", "unknown distribution 'normal'"),
    ("--learning_rate=0.1", "give a distribution"),
    ("--learning_rate=loguniform(0, 1)", "loguniform needs low > 0"),
    ("--learning_rate=uniform(1, 0.5)", "is empty: low must be below high"),
    ("--head_epochs=int(1, 3)", "takes a float: use uniform or loguniform"),
    ("--train_steps=uniform(1, 3)", "takes an integer: use int(low, high)"),
    ("--optimizer=choice()", "choice() needs at least one value"),
    ("--run_name=choice(a, b)", "--run_name is the sweep's to set"),
    ("--dropout=choice(0.1, x)", "--dropout: could not convert"),
])
def test_space_file_lines(tmp_path, line, message):
    fixed = helpers.tiny_config(str(tmp_path), tmp_path)
    path = write(tmp_path / "s.space", f"# a comment\n\n{line}\n")
    if message is None:
        (p,) = spaces.load_space(path, fixed)
        expected = ("learning_rate", "loguniform", (1e-4, 3e-3), f"{path}:3")
        assert (p.name, p.kind, p.args, p.where) == expected
        return
    with pytest.raises(spaces.SpaceError) as e:
        spaces.load_space(path, fixed)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert message in str(e.value)


def test_space_values_reach_the_trial_config(tmp_path):
    fixed = helpers.tiny_config(str(tmp_path), tmp_path)
    path = write(tmp_path / "s.space", "--learning_rate=uniform(0.01, 0.1)\n"
                 "--dropout=choice(0.0, 0.25)\n--train_steps=int(4, 8, 2)\n")
    params = spaces.load_space(path, fixed)
    assert [p.option for p in params] == [False, True, False]  # dropout: a scratch option
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    values = spaces.suggest(study.ask(), params)
    cfg = spaces.apply(fixed, params, values, "s_t000")
    assert cfg.run_name == "s_t000" and cfg.learning_rate == values["learning_rate"]
    assert cfg.model_options["dropout"] == values["dropout"] and cfg.train_steps in (4, 6, 8)
    assert cfg.model_options["widths"] == fixed.model_options["widths"]
    assert spaces.grid(params) == {"learning_rate": [0.01, 0.1], "dropout": [0.0, 0.25],
                                   "train_steps": [4, 6, 8]}


def test_bad_sweeps_are_one_line_before_any_trial(syn, tmp_path):
    space = write(tmp_path / "s.space", "--learning_rate=uniform(0.01, 0.1)\n")
    with pytest.raises(sweeps.SweepError, match="--direction=minimize contradicts "
                                                "--metric=best_val"):
        SweepConfig(study="s", metric="best_val", direction="minimize").resolved_direction()
    with pytest.raises(sweeps.SweepError, match="--study: 'a b' is not a portable file name"):
        sweeps.check_name("a b")
    cfg = SweepConfig(study="s", space=space, storage="postgresql+psycopg://u@127.0.0.1:1/x")
    with pytest.raises(sweeps.SweepError, match=r"^--storage: cannot use postgresql"):
        sweeps.make_storage(cfg, str(tmp_path))
    cfg = SweepConfig(study="s", space=space)
    fixed = helpers.tiny_config(syn, tmp_path)
    storage = sweeps.make_storage(cfg, str(tmp_path / "ck"))
    params = spaces.load_space(space, fixed)
    sweeps.open_study(cfg, storage, params, "--batch_size=32")
    other = spaces.load_space(write(tmp_path / "t.space", "--learning_rate=uniform(0.01, 0.2)"
                                    "\n"), fixed)
    with pytest.raises(sweeps.SweepError, match="the space of study s changed since"):
        sweeps.open_study(cfg, storage, other, "--batch_size=32")
    with pytest.raises(sweeps.SweepError, match="fixed train flags of study s changed"):
        sweeps.open_study(cfg, storage, params, "--batch_size=64")
    res = warm.run([sys.executable, "-m", "research.apps.sweep", "--study=s",
                    f"--space={tmp_path / 'missing.space'}", f"--data_dir={syn}"], timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: recipe {tmp_path / 'missing.space'}: no such file")


def sweep_command(syn, root, study, space, *extra):
    return [sys.executable, "-m", "research.apps.sweep", f"--study={study}", f"--space={space}",
            f"--data_dir={syn}", f"--checkpoint_dir={root}/ck", f"--log_dir={root}/logs",
            *TINY, *extra]


def trials(root, study, storage=None):
    url = storage or f"sqlite:///{root}/ck/{study}.db"
    return optuna.load_study(study_name=study, storage=url).get_trials()


@pytest.mark.slow
def test_a_study_of_runs_with_a_pruned_trial_and_its_report(syn, tmp_path):
    """Grid over two learning rates, val loss reported at every evaluation: the hopeless one
    (1e-9) is pruned at its first evaluation against the good one's; it records pruned_at,
    is exported, and the report lists both."""
    space = write(tmp_path / "s.space", "--learning_rate=choice(0.1, 1e-9)\n")
    cmd = sweep_command(syn, tmp_path, "st", space, "--n_trials=2", "--sampler=grid",
                        "--seed=1", "--metric=val_loss", "--pruner_startup_trials=1",
                        "--train_steps=12", "--eval_every_steps=6")
    res = warm.run(cmd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = {t.params["learning_rate"]: t for t in trials(tmp_path, "st")}
    assert got[0.1].state.name == "COMPLETE" and got[1e-9].state.name == "PRUNED", got
    first = got[0.1].number < got[1e-9].number
    assert first, "grid order with --seed=1 changed: pick the seed that runs 0.1 first"
    pruned = got[1e-9].user_attrs["run"]
    summary = json.loads((tmp_path / "ck" / pruned / "train_summary.json").read_text())
    assert summary["pruned_at"] == 6 and summary["final_step"] == 6
    assert (tmp_path / "ck" / pruned / "export" / "model.keras").is_file()
    assert "best: trial" in res.stdout
    res = warm.run(sweep_command(syn, tmp_path, "st", space, "--n_trials=2",
                                 "--sampler=grid", "--seed=1", "--metric=val_loss"),
                   timeout=300)  # no --train_steps
    assert res.returncode == 1, res.stderr[-2000:]
    assert "error: the fixed train flags of study st changed" in res.stderr
    res = warm.run([sys.executable, "-m", "research.apps.sweep", "--study=st", "--report",
                    f"--checkpoint_dir={tmp_path}/ck"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = tmp_path / "ck" / "st_report" / "report.html"
    assert res.stdout.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    assert "Pruned trials" in text and pruned in text and "data:image/png;base64" in text
    tags = set()
    for path in glob.glob(str(tmp_path / "logs" / pruned / "**" / "events*"), recursive=True):
        import tensorflow as tf

        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert "_hparams_/session_start_info" in tags  # the trial in TensorBoard's HParams view


def start(cmd, env=None):
    return warm.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                      env=env)


def wait_for(proc, text, timeout=300):
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"{text!r} never came:\n" + "".join(lines[-40:]))


@pytest.mark.slow
def test_a_preempted_trial_resumes_its_run_and_a_killed_one_is_retried(syn, tmp_path):
    space = write(tmp_path / "s.space", "--learning_rate=uniform(0.01, 0.1)\n")
    cmd = sweep_command(syn, tmp_path, "pre", space, "--n_trials=1", "--train_steps=40",
                        "--eval_every_steps=20", "--heartbeat_seconds=1")
    proc = start(cmd)
    wait_for(proc, "train | step")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "re-queued: run the same command to resume it" in out
    states = [(t.state.name, t.user_attrs.get("run")) for t in trials(tmp_path, "pre")]
    assert states == [("FAIL", "pre_t000"), ("WAITING", "pre_t000")]
    res = warm.run(cmd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resumed" in res.stderr and "pre_t000" in res.stderr
    assert [t.state.name for t in trials(tmp_path, "pre")] == ["FAIL", "COMPLETE"]
    summary = json.loads((tmp_path / "ck" / "pre_t000" / "train_summary.json").read_text())
    assert len(summary["sessions"]) == 2 and summary["final_step"] == 40

    # SIGKILL: no checkpoint of its own, the heartbeat stops; the next worker fails the stale
    # trial and retries it with the same run, which resumes from its last checkpoint.
    cmd = sweep_command(syn, tmp_path, "kill", space, "--n_trials=1", "--train_steps=40",
                        "--eval_every_steps=10", "--heartbeat_seconds=1")
    proc = start(cmd)
    wait_for(proc, "train | step     20")
    proc.kill()
    proc.communicate()
    time.sleep(3)  # stale: more than twice the heartbeat
    res = warm.run(cmd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resumed" in res.stderr and "kill_t000" in res.stderr
    done = trials(tmp_path, "kill")
    assert [t.state.name for t in done] == ["FAIL", "COMPLETE"]
    assert done[1].user_attrs["run"] == "kill_t000"
    assert done[1].system_attrs["failed_trial"] == 0


def run_workers(cmds, kill_after=None):
    """Starts the workers; kills the first once it logs `kill_after`, then relaunches it."""
    procs = [start(c) for c in cmds]
    relaunched = None
    if kill_after:
        wait_for(procs[0], kill_after)
        procs[0].kill()
        procs[0].communicate()
        time.sleep(3)
        relaunched = start(cmds[0])
    outs = []
    for p in procs[1:] + ([relaunched] if relaunched else []):
        outs.append(p.communicate(timeout=900)[0])
        assert p.returncode == 0, outs[-1][-3000:]
    return outs


def assert_no_trial_twice(all_trials, n, workers=2):
    """n finished trials, or up to one more per other worker (each may be inside a trial
    when the study reaches n), none run twice: distinct runs, a retried trial on its
    original's run."""
    complete = [t for t in all_trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert n <= len(complete) <= n + workers - 1, [(t.number, t.state.name)
                                                   for t in all_trials]
    runs = [t.user_attrs["run"] for t in complete]
    assert len(set(runs)) == len(runs), runs  # no run finished twice
    for t in complete:
        if "failed_trial" in t.system_attrs:
            assert t.user_attrs["run"] == f"{t.user_attrs['run'].rsplit('_t', 1)[0]}_t" \
                f"{t.system_attrs['failed_trial']:03d}"
    return complete


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study(syn, tmp_path):
    space = write(tmp_path / "s.space", "--learning_rate=uniform(0.01, 0.1)\n")
    cmd = sweep_command(syn, tmp_path, "two", space, "--n_trials=4", "--train_steps=6",
                        "--eval_every_steps=3", "--heartbeat_seconds=1", "--sampler=random")
    run_workers([cmd, cmd])
    assert_no_trial_twice(trials(tmp_path, "two"), 4)


def pg_bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture
def postgres(tmp_path_factory):
    """A PostgreSQL server on a free loopback port, run by an unprivileged user (initdb and
    postgres refuse root); yields its SQLAlchemy URL."""
    if not pg_bin("initdb"):
        pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    user = "postgres" if _has_user("postgres") else "nobody"
    root = tempfile.mkdtemp(prefix="pg-")
    os.chmod(root, 0o777)
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sock)
    shutil.chown(sock, user)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_user = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_user, pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "research"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", data, "-w", "-l",
                    os.path.join(root, "log"), "-o",
                    f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://research@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.mark.slow
def test_two_workers_on_postgresql_one_killed_and_relaunched(syn, tmp_path, postgres):
    space = write(tmp_path / "s.space", "--learning_rate=uniform(0.01, 0.1)\n")
    cmd = sweep_command(syn, tmp_path, "pg", space, "--n_trials=4", "--train_steps=20",
                        "--eval_every_steps=5", "--heartbeat_seconds=1", "--sampler=random",
                        f"--storage={postgres}")
    outs = run_workers([cmd, cmd], kill_after="train | step     10")
    done = assert_no_trial_twice(trials(tmp_path, "pg", postgres), 4)
    retried = [t for t in done if "failed_trial" in t.system_attrs]
    assert len(retried) == 1, [(t.number, t.system_attrs) for t in done]
    run = retried[0].user_attrs["run"]
    assert any("Resumed" in o and run in o for o in outs), outs[-1][-3000:]


def test_the_baseline_trial_is_the_fixed_flags_own_values(syn, tmp_path):
    space = write(tmp_path / "s.space", "--learning_rate=uniform(0.01, 0.1)\n"
                  "--dropout=choice(0.0, 0.25)\n")
    fixed = helpers.tiny_config(syn, tmp_path, learning_rate=0.03)
    params = spaces.load_space(space, fixed)
    cfg = SweepConfig(study="b", space=space, baseline_trial=True)
    study = sweeps.open_study(cfg, sweeps.make_storage(cfg, str(tmp_path / "ck")), params,
                              "", fixed)
    (waiting,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting.system_attrs["fixed_params"] == {"learning_rate": 0.03, "dropout": 0.0}
    assert waiting.user_attrs == {"baseline": True}
    outside = dataclasses.replace(fixed, learning_rate=0.5)
    cfg = SweepConfig(study="c", space=space, baseline_trial=True)
    with pytest.raises(sweeps.SweepError, match="--learning_rate=0.5 is outside the space"):
        sweeps.open_study(cfg, sweeps.make_storage(cfg, str(tmp_path / "ck")), params, "",
                          outside)


def test_a_fine_tune_trial_is_not_pruned_in_its_head_phase():
    """The pruner is asked only once the fine-tuning the trial tries has begun (after
    --head_epochs); every evaluation is reported all the same."""
    class Trial:
        number = 0

        def __init__(self):
            self.reported, self.asked = [], []

        def report(self, value, step):
            self.reported.append(step)

        def should_prune(self):
            self.asked.append(self.reported[-1])
            return True

    def ctx(step, transfer="fine_tune"):
        cfg = type("Cfg", (), {"transfer": transfer, "positive_class": lambda self, m: "cat"})()
        return type("Ctx", (), {"report": {"pr_auc": 0.5}, "cfg": cfg, "manifest": {},
                                "step": step, "stop": False,
                                "plan": type("Plan", (), {"head_steps": 62})()})()

    trial = Trial()
    action = sweeps.ReportToTrial(trial, "best_val")
    for step in (31, 62):
        c = ctx(step)
        action(c)
        assert not c.stop and action.pruned_at is None
    c = ctx(93)
    action(c)
    assert c.stop and action.pruned_at == 93
    assert trial.reported == [31, 62, 93] and trial.asked == [93]
    scratch = sweeps.ReportToTrial(Trial(), "best_val")  # no head phase: judged at once
    c = ctx(31, transfer="none")
    scratch(c)
    assert c.stop and scratch.pruned_at == 31


def test_two_workers_creating_the_tables_at_once_retry(monkeypatch, tmp_path):
    """PostgreSQL refuses the second of two concurrent CREATE TABLEs with a unique violation
    on pg_type: the worker that loses waits and opens the tables the other made; any other
    error is one line at once."""
    class IntegrityError(Exception):
        pass

    calls = []

    def storage(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise IntegrityError('duplicate key value violates unique constraint '
                                 '"pg_type_typname_nsp_index"')
        return "opened"

    monkeypatch.setattr(sweeps.optuna.storages, "RDBStorage", storage)
    monkeypatch.setattr(sweeps.time, "sleep", lambda s: None)
    cfg = SweepConfig(study="s", storage="postgresql+psycopg://u@127.0.0.1:1/db")
    assert sweeps.make_storage(cfg, str(tmp_path)) == "opened" and len(calls) == 2
    assert sweeps._schema_race(IntegrityError(
        "(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num"))

    def refused(url, **kw):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(sweeps.optuna.storages, "RDBStorage", refused)
    with pytest.raises(sweeps.SweepError, match="--storage: cannot use .*connection refused"):
        sweeps.make_storage(cfg, str(tmp_path))
