"""The `promptq` command as users run it: real processes, exit codes, files, messages."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import click
import orjson
from arq.connections import ArqRedis

from promptq.cli import main
from promptq.mock import MockServer
from promptq.shared.settings import Settings

from .conftest import WorkerProcs, worker_env


async def cli(*args: str, env: dict[str, str], timeout_s: float = 90) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptq", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def embedded_env(mock: MockServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(PROMPTQ_UPSTREAM_URL=mock.url, PROMPTQ_MODEL="mock-gpt", PROMPTQ_MAX_ATTEMPTS="3")
    return env


async def test_run_embedded_writes_one_line_per_request_and_exits_1_on_failures(
    mock: MockServer, tmp_path: Path
) -> None:
    rows: list[object] = [{"custom_id": f"c{i}", "prompt": f"hello {i}"} for i in range(40)]
    rows.append({"custom_id": "doomed", "prompt": "x [[mock status=400]]"})
    rows.append({"custom_id": "retried", "prompt": "y [[mock status=500 fail=1]]"})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out, err_file = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    code, stdout, stderr = await cli(
        "run", str(src), "-o", str(out), "--errors-out", str(err_file), env=embedded_env(mock)
    )
    assert code == 1, stderr
    ok, failed = read_jsonl(out), read_jsonl(err_file)
    assert len(ok) == 41
    assert [r["custom_id"] for r in failed] == ["doomed"]
    assert {r["custom_id"] for r in ok + failed} == {f"c{i}" for i in range(40)} | {
        "doomed",
        "retried",
    }
    assert failed[0]["error"]["code"]  # type: ignore[index]
    assert "p99" in stdout  # the stats table


async def test_run_succeeds_with_exit_0_and_default_errors_file(
    mock: MockServer, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    code, _, stderr = await cli("run", str(src), "-o", str(tmp_path / "o.jsonl"),
                                env=embedded_env(mock))  # fmt: skip
    assert code == 0, stderr
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 5
    assert (tmp_path / "o.errors.jsonl").read_bytes() == b""  # written, empty


async def test_bad_input_exits_2_naming_file_line_and_field_and_enqueues_nothing(
    redis: ArqRedis, redis_url: str, mock: MockServer, tmp_path: Path
) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"prompt": "fine"}\n{"prompt": ""}\n{"custom_id": 3, "prompt": "x"}\n{oops\n')
    env = embedded_env(mock) | {"PROMPTQ_REDIS_URL": redis_url}
    for args in (["run", str(src), "-o", str(tmp_path / "o.jsonl")], ["submit", str(src)]):
        code, stdout, stderr = await cli(*args, env=env)
        assert code == 2
        assert stdout == ""
        assert f"{src}: line 2, field 'prompt': is empty" in stderr
        assert "line 3, field 'custom_id'" in stderr
        assert "line 4: not valid JSON" in stderr
        assert "4 problem(s)" not in stderr  # three bad lines, not four
        assert await redis.dbsize() == 0
    code, _, stderr = await cli("submit", str(tmp_path / "missing.jsonl"), env=env)
    assert code == 2
    assert "missing.jsonl" in stderr


async def test_demo_runs_with_no_redis(mock: MockServer) -> None:
    code, stdout, stderr = await cli(
        "demo", "-n", "40", "--latency-ms", "20", "--jitter-ms", "0", env=embedded_env(mock)
    )
    assert code == 0, stderr
    assert "faster" in stdout
    assert "latency p50" in stdout
    # the bar's last word on the spend is the table's (it used to lag a refresh behind)
    table_cost = re.search(r"│ cost\s+│\s+(\$[0-9.]+)", stdout)
    bar_costs = re.findall(r"40/40 .*?(\$[0-9.]+)", stderr)
    assert table_cost is not None
    assert bar_costs
    assert bar_costs[-1] == table_cost.group(1)


async def test_submit_status_results_workers_against_redis(
    redis: ArqRedis, settings: Settings, tmp_path: Path, worker_procs: WorkerProcs
) -> None:
    env = worker_env(settings)
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"s{i}", "prompt": f"q{i}"}
                                              for i in range(30)])  # fmt: skip
    code, stdout, stderr = await cli("submit", str(src), "--batch-id", "cli-batch", env=env)
    assert (code, stdout) == (0, "cli-batch\n"), stderr
    code, stdout, _ = await cli("status", "cli-batch", "--json", env=env)
    assert code == 0
    assert orjson.loads(stdout)["status"] == "queued"  # no worker yet
    worker_procs.start(1)
    code, _, stderr = await cli("watch", "cli-batch", env=env)
    assert code == 0, stderr
    code, stdout, _ = await cli("status", "cli-batch", "--json", env=env)
    status = orjson.loads(stdout)
    assert (status["status"], status["succeeded"], status["total"]) == ("completed", 30, 30)
    assert status["stats"]["p50_ms"] > 0
    code, stdout, _ = await cli("status", "cli-batch", env=env)
    assert "completed" in stdout
    assert "throughput" in stdout
    out = tmp_path / "res.jsonl"
    code, _, stderr = await cli("results", "cli-batch", "-o", str(out), env=env)
    assert code == 0, stderr
    assert sorted(r["custom_id"] for r in read_jsonl(out)) == sorted(f"s{i}" for i in range(30))
    code, stdout, _ = await cli("workers", "--json", env=env)
    assert len(orjson.loads(stdout)) == 1
    code, _, stderr = await cli("cancel", "cli-batch", env=env)  # finished: nothing changes
    assert code == 0
    assert "completed" in stderr
    # a second submit: --follow streams results as they complete
    code, batch_id, _ = await cli("submit", str(src), env=env)
    assert re.fullmatch(r"batch_[0-9a-f]{32}\n", batch_id)
    code, _, stderr = await cli("results", batch_id.strip(), "-o", str(out), "--follow", env=env)
    assert code == 0, stderr
    assert len(read_jsonl(out)) == 30


async def test_unknown_batch_and_unreachable_redis_are_clear_errors(
    redis: ArqRedis, settings: Settings
) -> None:
    for command in ("status", "cancel", "watch"):
        code, _, stderr = await cli(command, "nope", env=worker_env(settings))
        assert code == 2
        assert "no batch 'nope'" in stderr
    env = worker_env(settings) | {
        "PROMPTQ_REDIS_URL": "redis://user:hunter2@127.0.0.1:1/0",
        "PROMPTQ_REDIS_CONNECT_WAIT_S": "0.2",
    }
    code, _, stderr = await cli("status", "x", env=env)
    assert code == 1
    assert "cannot reach Redis at redis://user:***@127.0.0.1:1/0" in stderr
    assert "hunter2" not in stderr
    assert "Traceback" not in stderr


async def test_invalid_configuration_names_the_variable(mock: MockServer) -> None:
    env = embedded_env(mock) | {"PROMPTQ_CONCURRENCY": "0"}
    code, _, stderr = await cli("demo", "-n", "1", env=env)
    assert code == 2
    assert "PROMPTQ_CONCURRENCY" in stderr


def test_every_option_of_every_command_has_help() -> None:
    for name, command in [("promptq", main), *main.commands.items()]:
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"promptq {name} {param.opts[0]} has no help text"


async def test_help_runs_for_every_command() -> None:
    for name in main.commands:
        code, stdout, _ = await cli(name, "--help", env=dict(os.environ))
        assert code == 0
        assert "Usage: python -m promptq " + name in stdout
