"""Hardening of python -m abm.batch: bad folders and files give one clear error (exit 2)
and leave everything as it was; pool workers end with the sweep; Ray addresses are
checked before anything is written and a local Ray listens on 127.0.0.1 only; charts
of rates clip their intervals, show whole legends and draw categorical keys as points."""

import builtins
import errno
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from batch_scenarios import tiny_base
from conftest import ROOT

from abm.batch import aggregate, load_sweep, run_sweep
from abm.batch.__main__ import main
from abm.errors import ScenarioError

SWEEP = 'scenario = "base.toml"\nseed = 3\n[sweep]\nreplicates = 2\ngame.noise = [0.0, 0.2]\n'


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A complete sweep folder (results.parquet, sweep.json, aggregate.csv) to spoil."""
    folder = tmp_path_factory.mktemp("done")
    (folder / "base.toml").write_text(tiny_base(noise=0.1))
    (folder / "sweep.toml").write_text(SWEEP)
    run_sweep(load_sweep(folder / "sweep.toml"), folder / "out", backend="serial", charts=False)
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with its bytes; None for folders."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` read-only. As root, permission bits do not stop writes, so writes
    under it are refused the way a read-only folder refuses them (EACCES)."""
    folder.chmod(0o555)
    try:
        (folder / ".probe").touch()
    except PermissionError:
        return  # the bits work: a real read-only folder
    (folder / ".probe").unlink()
    folder = folder.resolve()

    def denied(path) -> bool:
        p = Path(os.path.abspath(os.fsdecode(path)))
        return p == folder or folder in p.parents

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_mkdir, real_open, real_replace = os.mkdir, builtins.open, os.replace

    def mkdir(path, *args, **kwargs):
        if denied(path):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and denied(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if denied(dst):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "replace", replace)


# ------------------------------------------------------------------ bad inputs: one table
# each: how to spoil a copy of a complete sweep (returns --out / the report's folder),
# which command, and what the one-paragraph error must say


def _text(name: str, text: str):
    def spoil(tmp, monkeypatch):
        (tmp / "out" / name).write_text(text)
        return tmp / "out"

    return spoil


def _wrong_table(tmp, monkeypatch):
    pd.DataFrame({"x": [1, 2]}).to_parquet(tmp / "out" / "results.parquet")
    return tmp / "out"


def _results_folder(tmp, monkeypatch):
    (tmp / "out" / "results.parquet").unlink()
    (tmp / "out" / "results.parquet").mkdir()
    return tmp / "out"


def _read_only_sweep(tmp, monkeypatch):
    read_only(tmp / "out", monkeypatch)
    return tmp / "out"


def _read_only_empty(tmp, monkeypatch):
    shutil.rmtree(tmp / "out")
    (tmp / "out").mkdir()
    read_only(tmp / "out", monkeypatch)
    return tmp / "out"


def _in_read_only(tmp, monkeypatch):
    shutil.rmtree(tmp / "out")
    (tmp / "ro").mkdir()
    read_only(tmp / "ro", monkeypatch)
    return tmp / "ro" / "out"


def _under_a_file(tmp, monkeypatch):
    shutil.rmtree(tmp / "out")
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file" / "out"


NOT_PARQUET = "PAR1 this is not a parquet file"
BAD_INPUTS = {
    "sweep.json not JSON": (
        "run",
        _text("sweep.json", "{not json"),
        ["sweep.json", "is not valid JSON", "left as it is"],
    ),
    "sweep.json a list": (
        "run",
        _text("sweep.json", "[1, 2]"),
        ["sweep.json", "is not a sweep description", "got [1, 2]"],
    ),
    "sweep.json keys not a list": (
        "run",
        _text("sweep.json", '{"name": "sweep", "keys": 3}'),
        ["sweep.json", "is not a sweep description"],
    ),
    "resume into corrupt results": (
        "run",
        _text("results.parquet", NOT_PARQUET),
        ["results.parquet", "cannot be read", "left as it is", "move it aside"],
    ),
    "resume into a foreign table": ("run", _wrong_table, ["results.parquet", "no column 'run_id'"]),
    "results.parquet a folder": ("run", _results_folder, ["results.parquet", "is not a file"]),
    "report: sweep.json not JSON": (
        "report",
        _text("sweep.json", "{not json"),
        ["sweep.json", "is not valid JSON"],
    ),
    "report: sweep.json a list": (
        "report",
        _text("sweep.json", "[1, 2]"),
        ["sweep.json", "is not a sweep description"],
    ),
    "report: corrupt results": (
        "report",
        _text("results.parquet", NOT_PARQUET),
        ["results.parquet", "cannot be read", "move it aside"],
    ),
    "report into a read-only folder": (
        "report",
        _read_only_sweep,
        ["cannot write the report", "untouched"],
    ),
    "resume into a read-only folder": ("run", _read_only_sweep, ["cannot write there"]),
    "--out read-only and empty": (
        "run",
        _read_only_empty,
        ["cannot write there", "Permission denied"],
    ),
    "--out in a read-only folder": (
        "run",
        _in_read_only,
        ["cannot write there", "Permission denied"],
    ),
    "--out under a file": ("run", _under_a_file, ["cannot write there", "Not a directory"]),
}


@pytest.mark.parametrize("mode, spoil, fragments", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_batch_inputs_exit_2_with_one_paragraph_and_leave_everything(
    done, tmp_path, monkeypatch, capsys, mode, spoil, fragments
):
    for name in ("base.toml", "sweep.toml"):
        shutil.copy(done / name, tmp_path / name)
    shutil.copytree(done / "out", tmp_path / "out")
    try:
        out = spoil(tmp_path, monkeypatch)
        before = snapshot(tmp_path)
        argv = (
            [str(tmp_path / "sweep.toml"), "--out", str(out), "--workers", "1", "--quiet"]
            if mode == "run"
            else ["report", str(out)]
        )
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2, err
        assert err.startswith("error: ") and err.strip().count("\n") == 0, err
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
        assert snapshot(tmp_path) == before  # nothing written, nothing removed
    finally:
        monkeypatch.undo()
        for folder in (tmp_path / "out", tmp_path / "ro"):
            if folder.is_dir():
                folder.chmod(0o755)


def test_a_spoilt_results_file_can_be_moved_aside_and_rebuilt(done, tmp_path):
    """What the error advises works: the rows come back from the run folders."""
    for name in ("base.toml", "sweep.toml"):
        shutil.copy(done / name, tmp_path / name)
    shutil.copytree(done / "out", tmp_path / "out")
    results = tmp_path / "out" / "results.parquet"
    results.write_text(NOT_PARQUET)
    with pytest.raises(ScenarioError, match="move it aside"):
        run_sweep(load_sweep(tmp_path / "sweep.toml"), tmp_path / "out", backend="serial")
    results.rename(results.with_name("results.parquet.bad"))
    again = run_sweep(
        load_sweep(tmp_path / "sweep.toml"), tmp_path / "out", backend="serial", charts=False
    )
    assert again.recovered == 4 and again.ran == []
    pd.testing.assert_frame_equal(
        pd.read_parquet(results).drop(columns="run_seconds"),
        pd.read_parquet(done / "out" / "results.parquet").drop(columns="run_seconds"),
    )


# ------------------------------------------------------------------ pool workers


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has ended: it only waits to be reaped)."""
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append(pid)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_pool_workers_end_when_the_sweep_process_is_killed(tmp_path):
    (tmp_path / "base.toml").write_text((ROOT / "scenarios" / "small_world_rules.toml").read_text())
    (tmp_path / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 3\n[set]\noutput.charts = false\n'
        "output.rounds = false\npairing.steps = 150\n"
        "[sweep]\nreplicates = 8\ngame.noise = [0.0, 0.1]\n"
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "abm.batch",
            str(tmp_path / "sweep.toml"),
            "--out",
            str(out),
            "--workers",
            "2",
            "--no-report",
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 90
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = [
                c
                for c in _children(proc.pid)
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            ]
            runs = list((out / "runs").iterdir()) if (out / "runs").is_dir() else []
            if len(workers) == 2 and len(runs) >= 2:  # both workers are running a run
                break
            time.sleep(0.05)
        assert len(workers) == 2 and proc.poll() is None, "the sweep ended too soon"
        time.sleep(0.5)
        seen = _children(proc.pid)  # the workers and multiprocessing's resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(seen) == [], "pool workers outlived the sweep's process"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _alive(seen):  # the processes this test started, by id
            os.kill(pid, signal.SIGKILL)


WATCHED = """
import sys, time
import abm.batch.backends as backends
backends._kill_on_parent_death = lambda: None  # the portable watch alone, as off Linux
backends.exit_with_parent(int(sys.argv[1]), interval=0.1)
open(sys.argv[2], "w").close()
time.sleep(120)
"""
MIDDLE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_parent_watch_alone_ends_an_orphaned_worker(tmp_path):
    ready = tmp_path / "ready"
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, WATCHED, str(ready)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(middle.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists() and _alive([child]) == [child]
        middle.kill()  # SIGKILL: no chance to take its child along
        middle.wait()
        deadline = time.monotonic() + 3
        while _alive([child]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive([child]) == []
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()
        if _alive([child]):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------ Ray


def test_the_install_hint_names_this_project_not_pypis_abm(monkeypatch):
    from abm.batch.ray_backend import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ScenarioError) as info:
        import_ray()
    message = str(info.value)
    assert 'pip install -e ".[ray]"' in message and 'pip install "ray>=2.40"' in message
    assert "abm[ray]" not in message


@pytest.mark.parametrize(
    "address, fragment",
    [
        ("nonsense", "not the address of a Ray cluster"),
        ("10.0.0.5", "not the address of a Ray cluster"),
        ("host:port", "not the address of a Ray cluster"),
        ("127.0.0.1:0", "not the address of a Ray cluster"),
        ("ray://127.0.0.1:{port}", "no Ray cluster answers there"),
        ("127.0.0.1:{port}", "no Ray cluster answers there"),
        ("[::1]:{port}", "no Ray cluster answers there"),
    ],
)
def test_ray_addresses_are_checked_before_ray_is_asked(address, fragment):
    from abm.batch.ray_backend import check_reachable

    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flag = f"--address {address.format(port=port)}"
    with pytest.raises(ScenarioError, match=fragment) as info:
        check_reachable(address.format(port=port), flag, timeout=2)
    assert str(info.value).startswith(flag)


def test_ray_addresses_that_answer_pass_the_check():
    from abm.batch.ray_backend import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}", "--address", timeout=2)
        check_reachable(f"ray://127.0.0.1:{port}", "--address", timeout=2)
    check_reachable("auto", "--address")  # Ray's own: left to Ray


@pytest.mark.slow
def test_an_unreachable_ray_address_fails_in_seconds_and_leaves_nothing(tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "base.toml").write_text(tiny_base())
    (tmp_path / "sweep.toml").write_text(SWEEP)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "abm.batch",
            str(tmp_path / "sweep.toml"),
            "--backend",
            "ray",
            "--address",
            f"127.0.0.1:{port}",
            "--out",
            str(out),
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert f"--address 127.0.0.1:{port}: no Ray cluster answers there" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert took < 30
    assert not out.exists()


def _listening(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses on which something listens on TCP ``port`` (/proc/net/tcp*)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            host, hexport = fields[1].split(":")
            if fields[3] != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.append(address)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net")
def test_a_local_ray_instance_listens_on_loopback_only():
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    from abm.batch.ray_backend import connect

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    env_before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    constant_before = ray_constants.ENABLE_RAY_CLUSTER
    saved_address = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert connect(None, 1) is True
        try:
            node = ray.nodes()[0]
            assert node["NodeManagerAddress"] == "127.0.0.1"
            host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
            assert host == "127.0.0.1"
            for port in (int(gcs_port), int(node["NodeManagerPort"])):
                addresses = _listening(port)
                assert addresses and all(a.is_loopback for a in addresses), (port, addresses)
            assert ray.get(ray.remote(lambda: 41).remote()) + 1 == 42  # and it works
        finally:
            ray.shutdown()
    finally:
        if saved_address is not None:
            os.environ["RAY_ADDRESS"] = saved_address
    # what connect changed to start it is as it was
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == env_before
    assert constant_before == ray_constants.ENABLE_RAY_CLUSTER


# ------------------------------------------------------------------ charts


def _results() -> pd.DataFrame:
    """Two replicates far apart: the t-interval of a rate reaches far past [0, 1]."""
    rows = []
    for point, (framing, noise) in enumerate(
        [("police", 0.0), ("police", 0.1), ("neutral", 0.0), ("neutral", 0.1)]
    ):
        for replicate, (rate, payoff) in enumerate([(0.05, 1.0), (0.95, 9.0)]):
            rows.append(
                {
                    "point": point,
                    "replicate": replicate,
                    "population.players[2].framing": framing,
                    "game.noise": noise,
                    "status": "ok",
                    "cooperation_rate": rate,
                    "mean_payoff": payoff,
                }
            )
    return pd.DataFrame(rows)


KEYS = ["population.players[2].framing", "game.noise"]


def _marks(spec: dict) -> set[str]:
    return {
        layer["mark"] if isinstance(layer["mark"], str) else layer["mark"]["type"]
        for layer in spec["layer"]
    }


def _values(spec: dict) -> list[dict]:
    return [row for rows in spec["datasets"].values() for row in rows]


def test_intervals_of_rates_are_clipped_in_charts_and_raw_in_the_table():
    from abm.batch.report import _line_chart, is_share

    table = aggregate(_results(), KEYS)
    rate = table[table["metric"] == "cooperation_rate"]
    assert (rate["ci95_low"] < -4).all() and (rate["ci95_high"] > 5).all()  # raw t-interval
    spec = _line_chart(rate, "cooperation_rate", "game.noise", KEYS[:1]).to_dict()
    values = _values(spec)
    assert values and all(0 <= row["low"] <= row["high"] <= 1 for row in values)
    assert "clipped to [0, 1]" in json.dumps(spec)
    payoff = table[table["metric"] == "mean_payoff"]
    spec = _line_chart(payoff, "mean_payoff", "game.noise", KEYS[:1]).to_dict()
    assert min(row["low"] for row in _values(spec)) < 0  # not a share: as computed
    assert "clipped" not in json.dumps(spec)
    assert is_share("cooperation[tit_for_tat]") and is_share("final_share[all_d]")
    assert is_share("llm_invalid_rate") and not is_share("payoff[all_d]")


def test_categorical_keys_are_points_with_error_bars_numeric_keys_lines():
    from abm.batch.report import _line_chart

    table = aggregate(_results(), KEYS)
    rate = table[table["metric"] == "cooperation_rate"]
    categorical = _line_chart(rate, "cooperation_rate", KEYS[0], KEYS[1:]).to_dict()
    assert _marks(categorical) == {"point", "rule"}
    numeric = _line_chart(rate, "cooperation_rate", KEYS[1], KEYS[:1]).to_dict()
    assert "line" in _marks(numeric)


def test_legends_show_whole_labels():
    vl_convert = pytest.importorskip("vl_convert")
    from abm.batch.report import _line_chart

    table = aggregate(_results(), KEYS)
    rate = table[table["metric"] == "cooperation_rate"]
    svg = vl_convert.vegalite_to_svg(
        _line_chart(rate, "cooperation_rate", KEYS[1], KEYS[:1]).to_json()
    )
    assert "population.players[2].framing=neutral" in svg
    assert "\u2026" not in svg  # Vega marks a cut label with an ellipsis
