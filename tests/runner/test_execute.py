"""The execution engine with the real os driver (local processes): docs/manifest.md §6."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from marid.runner.drivers.base import Limits, SshKey
from marid.runner.drivers.os import OsDriver
from marid.runner.execute import BuildSpec, Execution, JobSpec, ObjectSpec, StageSpec


@dataclass
class Recorder:
    """An in-memory Reporter."""

    output: dict[str, str] = field(default_factory=dict)
    status: dict[str, tuple[str, bool]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def job_started(self, job: JobSpec) -> None:
        self.started.append(job.name)

    async def job_output(self, job: JobSpec, text: str) -> None:
        self.output[job.name] = self.output.get(job.name, "") + text
        self.changed.set()

    async def wait_for(self, job: str, text: str) -> None:
        """Return once the job's output holds `text`."""
        async with asyncio.timeout(60):
            while text not in self.output.get(job, ""):
                self.changed.clear()
                await self.changed.wait()

    async def job_finished(self, job: JobSpec, status: str, ran: bool) -> None:
        self.status[job.name] = (status, ran)

    async def object_placed(self, obj: ObjectSpec) -> None:
        self.placed.append(obj.destination)

    async def key_placed(self, name: str, location: str) -> None:
        self.keys[name] = location

    async def artifact_collected(self, job: JobSpec, source: str, name: str, path: Path) -> None:
        self.artifacts[name] = path.read_bytes()


SETUP = StageSpec("setup - #1", False, [JobSpec("create-driver", "")])


def spec(*stages: StageSpec, **overrides: object) -> BuildSpec:
    fields: dict[str, object] = {
        "stages": [SETUP, *stages],
        "env": {},
        "secrets": [],
        "objects": [],
        "keys": [],
        "timeout": 60.0,
        "artifact_max_size": 1024,
    }
    fields.update(overrides)
    return BuildSpec(**fields)  # type: ignore[arg-type]


async def run(build: BuildSpec) -> tuple[str, Recorder, Execution]:
    recorder = Recorder()
    execution = Execution(build, OsDriver(Limits(2**31, 1.0, 4096)), recorder)
    return await execution.run(), recorder, execution


async def test_three_stages_with_an_allowed_failure_and_masking():
    build = spec(
        StageSpec("lint", True, [JobSpec("lint.1", "echo linting\nfalse")]),
        StageSpec(
            "test",
            False,
            [
                JobSpec(
                    "test.1",
                    'echo "token is $TOKEN"\necho ok > out.txt',
                    artifacts=[("out.txt", "result.txt")],
                )
            ],
        ),
        StageSpec("deploy", False, [JobSpec("deploy.1", "cat out.txt")]),
        env={"TOKEN": "s3cr3t-value", "PLAIN": "visible"},
        secrets=["s3cr3t-value"],
    )
    status, rec, _ = await run(build)
    assert status == "passed_with_failures"
    assert rec.status == {
        "create-driver": ("passed", True),
        "lint.1": ("passed_with_failures", True),
        "test.1": ("passed", True),
        "deploy.1": ("passed", True),
    }
    assert rec.output["lint.1"] == "+ echo linting\nlinting\n+ false\nexit status 1\n"
    assert "s3cr3t" not in rec.output["test.1"]
    assert "token is xxxxxx" in rec.output["test.1"]
    assert "Collecting artifact out.txt => result.txt\n" in rec.output["test.1"]
    assert rec.artifacts == {"result.txt": b"ok\n"}
    assert rec.output["deploy.1"] == "+ cat out.txt\nok\n"


async def test_a_failure_stops_the_build_and_unrun_jobs_take_its_status():
    build = spec(
        StageSpec("one", False, [JobSpec("a", "exit 3"), JobSpec("b", "echo never")]),
        StageSpec("two", False, [JobSpec("c", "echo never")]),
    )
    status, rec, _ = await run(build)
    assert status == "failed"
    assert rec.status["a"] == ("failed", True)
    assert rec.status["b"] == ("failed", False) and rec.status["c"] == ("failed", False)
    assert "b" not in rec.started


async def test_job_timeout_and_kill():
    build = spec(StageSpec("s", True, [JobSpec("slow", "sleep 30", timeout=0.5)]))
    status, rec, _ = await run(build)
    assert status == "timed_out" and rec.status["slow"] == ("timed_out", True)

    build = spec(
        StageSpec(
            "s", False, [JobSpec("long", "echo started\nsleep 3600"), JobSpec("next", "true")]
        )
    )
    recorder = Recorder()
    execution = Execution(build, OsDriver(), recorder)
    task = asyncio.create_task(execution.run())
    for _ in range(100):
        if "long" in recorder.output:
            break
        await asyncio.sleep(0.05)
    execution.kill.set()
    # The kill stops the job: the build ends long before the hour-long sleep would.
    assert await asyncio.wait_for(task, timeout=60) == "killed"
    assert recorder.status["long"] == ("killed", True)
    assert recorder.status["next"] == ("killed", False)


async def test_objects_keys_and_artifact_errors(tmp_path: Path):
    async def fetch(path: Path) -> None:
        path.write_bytes(b"object bytes")

    build = spec(
        StageSpec(
            "s",
            False,
            [
                JobSpec(
                    "check",
                    "cat conf/app.conf\nls -l conf/app.conf\ncat .ssh/config\nmkdir d",
                    artifacts=[("missing.txt", "m"), ("d", "dir"), ("../../etc/passwd", "escape")],
                )
            ],
        ),
        objects=[
            ObjectSpec("config.prod", "conf/app.conf", fetch),
            ObjectSpec("gone", "gone", None),
            ObjectSpec("evil", "../../outside", fetch),
        ],
        keys=[SshKey("deploy", "PRIVATE", "Host x\n  IdentityFile /root/.ssh/deploy")],
    )
    status, rec, _ = await run(build)
    assert status == "passed", rec.output
    setup = rec.output["create-driver"]
    assert "Placing object config.prod => conf/app.conf\n" in setup
    assert "object error: gone: no such object\n" in setup
    assert "object error: ../../outside: outside the workspace\n" in setup
    assert rec.placed == ["conf/app.conf"]
    out = rec.output["check"]
    assert "object bytes" in out and "-rw-r--r--" in out
    assert "StrictHostKeyChecking no" in out and "/root/.ssh" not in out
    assert rec.keys["deploy"].endswith("/.ssh/deploy")
    assert "artifact error: missing.txt: no such file\n" in out
    assert "artifact error: d: is a directory\n" in out
    assert "artifact error: ../../etc/passwd: outside the workspace\n" in out


async def test_build_timeout_covers_the_whole_run():
    build = spec(
        StageSpec("s", False, [JobSpec("a", "sleep 5"), JobSpec("b", "true")]), timeout=0.5
    )
    status, rec, _ = await run(build)
    assert status == "timed_out"
    assert rec.status["a"] == ("timed_out", True) and rec.status["b"] == ("timed_out", False)


async def test_workspace_is_removed(tmp_path: Path):
    build = spec(StageSpec("s", False, [JobSpec("a", "pwd")]))
    _, rec, _ = await run(build)
    workspace = rec.output["a"].splitlines()[-1]
    assert not Path(workspace).exists()


async def test_a_failed_build_keeps_its_workspace_only_when_asked_and_never_after_passing():
    """Driver.keep instead of destroy (docs/api.md §27): for a build that failed, with
    keep_workspace; a build that passed, or one not asked to, removes everything."""
    failing = [StageSpec("s", False, [JobSpec("a", "pwd; touch made; exit 1")])]
    status, rec, execution = await run(spec(*failing, keep_workspace=True))
    workspace = Path(rec.output["a"].splitlines()[1])
    assert status == "failed" and execution.kept == str(workspace)
    assert (workspace / "made").is_file()
    shutil.rmtree(workspace)
    _, rec, execution = await run(spec(*failing))
    assert execution.kept is None and not Path(rec.output["a"].splitlines()[1]).exists()
    passing = [StageSpec("s", False, [JobSpec("a", "pwd")])]
    _, rec, execution = await run(spec(*passing, keep_workspace=True))
    assert execution.kept is None and not Path(rec.output["a"].splitlines()[-1]).exists()


async def test_reused_jobs_do_not_run_and_a_setup_error_fails_create_driver_first():
    """A resumed build's reused jobs count with their status and never run; a setup error (its
    kept workspace is gone) fails create-driver before anything is created."""
    build = spec(
        StageSpec("one", False, [JobSpec("a", "echo never", reused="passed")]),
        StageSpec("two", False, [JobSpec("b", "echo runs")]),
    )
    status, rec, _ = await run(build)
    assert status == "passed" and rec.started == ["create-driver", "b"]
    assert "a" not in rec.status  # its row already says what it reuses
    status, rec, _ = await run(dataclasses.replace(build, setup_error="the workspace is gone"))
    assert status == "failed"
    assert rec.output["create-driver"] == "error: the workspace is gone\n"
    assert rec.status["b"] == ("failed", False)


async def test_a_background_process_does_not_keep_the_job_running():
    """The os driver ends what a job left running once its shell exits, as a container's end
    would; before, the job ran on until its time limit."""
    script = "sleep 30 &\necho $! > bg.pid\necho done\n"
    build = spec(StageSpec("s", False, [JobSpec("a", script + "cat bg.pid\n")]), timeout=10.0)
    status, rec, _ = await run(build)
    assert status == "passed"  # not timed_out: it did not wait for the 30 s sleep
    # The background shell's own `+ sleep 30` trace line may come in any order.
    [pid] = [int(line) for line in rec.output["a"].splitlines() if line.isdigit()]
    assert "done" in rec.output["a"]
    for _ in range(50):  # reaped by its parent, or at least no longer running
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            break
        if stat.split()[2] == "Z":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"background process {pid} still runs")


# --- why a job ended: its last line (docs/manifest.md §6.8) ----------------------------------


@pytest.mark.parametrize(
    ("commands", "output"),
    [
        ("exit 3", "+ exit 3\nexit status 3\n"),
        ("set +x\nprintf partial\nexit 3", "+ set +x\npartial\nexit status 3\n"),
        ("set +x\nkill -9 $$", "+ set +x\nkilled by signal 9 (SIGKILL)\n"),
        ("set +x\nkill -TERM $$", "+ set +x\nterminated by signal 15 (SIGTERM)\n"),
    ],
    ids=["exit-status", "after-a-partial-line", "sigkill", "sigterm"],
)
async def test_a_job_that_does_not_exit_0_says_why_last(commands: str, output: str) -> None:
    status, rec, _ = await run(spec(StageSpec("s", False, [JobSpec("a", commands)])))

    assert status == "failed"
    assert rec.output["a"] == output


async def test_a_killed_command_is_reported_as_its_signal() -> None:
    """The shell says so its own way ("Killed"), then returns 128 + 9."""
    status, rec, _ = await run(spec(StageSpec("s", False, [JobSpec("a", "sh -c 'kill -9 $$'")])))

    assert status == "failed"
    assert rec.output["a"].splitlines()[-1] == "killed by signal 9 (SIGKILL)"


async def test_the_reason_follows_the_artifact_lines_and_is_masked() -> None:
    job = JobSpec("a", "set +x\necho made > out.txt\nexit 3", artifacts=[("out.txt", "out")])
    build = spec(StageSpec("s", True, [job]), secrets=["status"])

    status, rec, _ = await run(build)

    assert status == "passed_with_failures"
    assert rec.output["a"] == "+ set +x\nCollecting artifact out.txt => out\nexit xxxxxx 3\n"
    assert rec.artifacts == {"out": b"made\n"}


async def test_a_time_limit_says_which_limit() -> None:
    job_limit = spec(StageSpec("s", False, [JobSpec("a", "set +x\nsleep 60", timeout=1.0)]))
    build_limit = spec(StageSpec("s", False, [JobSpec("a", "set +x\nsleep 60")]), timeout=2.0)

    for build, line in [
        (job_limit, "time limit 1s reached"),
        (build_limit, "build time limit 2s reached"),
    ]:
        status, rec, _ = await run(build)
        assert status == "timed_out"
        assert rec.output["a"] == f"+ set +x\n{line}\n"


@pytest.mark.parametrize("reason", [None, "stopped by the runner: its lease was lost"])
async def test_a_killed_job_says_so_last(reason: str | None) -> None:
    build = spec(StageSpec("s", False, [JobSpec("a", "set +x\necho ready\nsleep 60")]))
    recorder = Recorder()
    execution = Execution(build, OsDriver(), recorder)
    if reason is not None:
        execution.kill_reason = reason  # a runner stopping a job for a reason of its own
    task = asyncio.create_task(execution.run())
    await recorder.wait_for("a", "ready\n")

    execution.kill.set()

    assert await asyncio.wait_for(task, timeout=60) == "killed"
    assert recorder.output["a"] == f"+ set +x\nready\n{reason or 'killed on request'}\n"
