"""``streampipe export systemd``: the units parse, and their ``ExecStart`` lines run a real pipeline.

systemd is not PID 1 on a test machine, so the units are not started by it: each unit's command
line is run as written (its ``WorkingDirectory``, its ``Environment``, SIGTERM as its
``KillSignal``), records flow end to end exactly once, and every process is gone after the stop.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.conftest import cli, wait_for
from tests.netstages import free_port, http_get, sink_ids

# what the units may hold, per section: a typo (Restrat=) or a misplaced key fails the check
KEYS = {
    "Unit": {"Description", "PartOf", "Wants", "After", "StartLimitIntervalSec", "StartLimitBurst"},
    "Service": {"Type", "WorkingDirectory", "Environment", "User", "ExecStart", "Restart", "RestartSec", "KillSignal",
                "KillMode", "TimeoutStopSec", "SyslogIdentifier"},
    "Install": {"WantedBy"},
}
REPEATABLE = {"Environment"}
TIME_SPAN = re.compile(r"^\d+(ms|s)$")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file, strictly: known sections and keys only, each key once unless it may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{number}"
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            assert current in KEYS and current not in sections, f"{where}: section {line}"
            sections[current] = {}
            continue
        assert current is not None, f"{where}: a key before any section"
        key, sep, value = line.partition("=")
        assert sep and key in KEYS[current], f"{where}: {key!r} in [{current}]"
        assert value.strip() == value and value, f"{where}: {line!r}"
        assert key in REPEATABLE or key not in sections[current], f"{where}: {key} twice"
        sections[current].setdefault(key, []).append(value)
    return sections


def unquote(value: str) -> list[str]:
    """systemd's words: double quotes with C escapes, then ``%%`` and ``$$`` as one character."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value)]


def write_pipeline(folder: Path, count: int, replicas: int = 2) -> Path:
    hosts = [f"127.0.0.{51 + i}" for i in range(replicas)]
    p_norm, p_cons = free_port(hosts[0]), free_port("127.0.0.59")
    path = folder / "services.yaml"
    path.write_text(textwrap.dedent(f"""\
        pipeline: units
        transport: tcp
        resolve_interval: 0.5
        defaults: {{ack_timeout: 0.3, stop_grace: 10}}
        stages:
          generator: {{type: generator, options: {{count: {count}, rate: 2000, seed: 3}}}}
          normalizer:
            type: normalizer
            inputs: [generator]
            replicas: {replicas}
            address: [{", ".join(hosts)}]
            port: {p_norm}
          consumer: {{type: consumer, inputs: [normalizer], address: 127.0.0.59, port: {p_cons}}}
        """))
    return path


@pytest.mark.timeout(300)
def test_units_parse_and_their_exec_lines_run_the_pipeline_exactly_once(tmp_path: Path) -> None:
    n = 3000
    config = write_pipeline(tmp_path, n)
    out = tmp_path / "units"
    base = free_port()
    proc = cli("export", "systemd", "--config", str(config), "-o", str(out), "--health-port", str(base),
               "--env", "STAGE_GREETING=50% off $HOME", check=True)
    assert "units.target" in proc.stderr and "systemctl enable --now units.target" in proc.stderr
    services = sorted(out.glob("*.service"))
    assert [p.name for p in services] == ["units-consumer-0.service", "units-generator-0.service",
                                          "units-normalizer-0.service", "units-normalizer-1.service"]
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", *map(str, services), str(out / "units.target")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and not check.stderr.strip(), check.stderr
    target = parse_unit(out / "units.target")
    assert target["Unit"]["Wants"][0].split() == ["units-generator-0.service", "units-normalizer-0.service",
                                                  "units-normalizer-1.service", "units-consumer-0.service"]
    assert target["Install"]["WantedBy"] == ["multi-user.target"]

    units = {p.name: parse_unit(p) for p in services}
    for name, unit in units.items():
        svc = unit["Service"]
        assert unit["Unit"]["PartOf"] == ["units.target"] and unit["Install"]["WantedBy"] == ["units.target"]
        assert svc["Restart"] == ["always"] and svc["WorkingDirectory"] == [str(tmp_path)]
        assert all(TIME_SPAN.match(v[0]) for v in (svc["RestartSec"], unit["Unit"]["StartLimitIntervalSec"])), name
        argv = unquote(svc["ExecStart"][0])
        assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "streampipe" and argv[1] == "run-stage", argv
        assert argv[argv.index("--config") + 1] == str(config)
    norm1 = unquote(units["units-normalizer-1.service"]["Service"]["ExecStart"][0])
    assert norm1[norm1.index("--replica") + 1] == "1" and norm1[norm1.index("--bind-host") + 1] == "127.0.0.52"

    # run each ExecStart as systemd would: its folder, its environment and nothing else of ours
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("units-consumer-0.service", "units-normalizer-0.service", "units-normalizer-1.service",
                     "units-generator-0.service"):
            svc = units[name]["Service"]
            env = dict(word.split("=", 1) for value in svc["Environment"] for word in unquote(value))
            assert env["STAGE_GREETING"] == "50% off $HOME"
            with open(tmp_path / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(unquote(svc["ExecStart"][0]), cwd=svc["WorkingDirectory"][0], env=env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def logs() -> str:
            return "\n".join(f"== {k}\n{(tmp_path / f'{k}.log').read_text(errors='replace')[-1500:]}" for k in procs)

        run_dir = tmp_path / ".streampipe"
        wait_for(lambda: len(sink_ids(run_dir)) == n, timeout=180, what=f"{n} ids at the sink", detail=logs)
        ids = sink_ids(run_dir)
        assert set(ids) == set(range(n)) and max(ids.values()) == 1, "an id twice"
        # each replica answers on its own health port, in the order of the target
        for offset in range(4):
            assert wait_for(lambda o=offset: http_get(f"http://127.0.0.1:{base + o}/readyz")[0] == 200, timeout=60,
                            what=f"/readyz on {base + offset}")
        pids = {name: [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] + [proc.pid]
                for name, proc in procs.items()}
    finally:
        stop = {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)    # KillSignal=SIGTERM; KillMode=mixed: run-stage alone first
        for name, proc in procs.items():
            grace = int(units[name]["Service"]["TimeoutStopSec"][0].removesuffix("s"))
            try:
                stop[name] = proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                stop[name] = None
    assert stop == dict.fromkeys(procs, 0), stop
    left = [pid for group in pids.values() for pid in group if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"orphans: {left}"


def test_what_cannot_run_as_units_on_one_host_exits_2_with_the_line(tmp_path: Path) -> None:
    config = write_pipeline(tmp_path, 10)
    text = config.read_text()
    config.write_text(text.replace("    address: [127.0.0.51, 127.0.0.52]\n", ""))   # two replicas, one port
    proc = cli("export", "systemd", "--config", str(config), "-o", str(tmp_path / "u"))
    assert proc.returncode == 2, proc.stderr
    assert "services.yaml:10" in proc.stderr and "would all bind port" in proc.stderr, proc.stderr
    assert not (tmp_path / "u").exists()

    config.write_text(text.replace("transport: tcp", "transport: ipc"))
    proc = cli("export", "systemd", "--config", str(config), "-o", str(tmp_path / "u"))
    assert proc.returncode == 2 and "transport: tcp" in proc.stderr, proc.stderr

    config.write_text(text + "  logs: {type: log_extractor}\n")
    proc = cli("export", "systemd", "--config", str(config), "-o", str(tmp_path / "u"))
    assert proc.returncode == 2 and "--without logs" in proc.stderr and "services.yaml:14" in proc.stderr, proc.stderr
    cli("export", "systemd", "--config", str(config), "-o", str(tmp_path / "u"), "--without", "logs", check=True)

    proc = cli("export", "systemd", "--config", str(config), "-o", str(tmp_path / "u"), "--env", "NOEQUALS")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr, proc.stderr


def test_an_export_removes_the_units_an_earlier_one_wrote_and_no_other_file(tmp_path: Path) -> None:
    out = tmp_path / "units"
    cli("export", "systemd", "--config", str(write_pipeline(tmp_path, 10, replicas=3)), "-o", str(out), check=True)
    (out / "mine.service").write_text("[Unit]\nDescription=not ours\n")
    assert (out / "units-normalizer-2.service").exists()
    proc = cli("export", "systemd", "--config", str(write_pipeline(tmp_path, 10, replicas=2)), "-o", str(out), check=True)
    assert "units-normalizer-2.service" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.service", "units-consumer-0.service", "units-generator-0.service",
                                                     "units-normalizer-0.service", "units-normalizer-1.service", "units.target"]
    assert "Wants=units-generator-0.service units-normalizer-0.service units-normalizer-1.service units-consumer-0.service" \
        in (out / "units.target").read_text()
