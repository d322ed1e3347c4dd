"""A new user's first hour: the mistakes people make get a clear answer, never a hang or
a traceback. Real ``promptq`` processes where the bug was in a process's life."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from arq.connections import ArqRedis

import promptq
from promptq import Producer, Status
from promptq.mock import MockConfig, MockServer
from promptq.producer.parsing import parse_jsonl
from promptq.shared import keys
from promptq.shared.errors import InputError
from promptq.shared.settings import Settings
from promptq.worker.backends.http import needs_key

from .conftest import REPO, WorkerProcs, free_port, wait_until, worker_env
from .test_cli import cli, embedded_env, read_jsonl, write_jsonl


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text
        assert "Unclosed" not in text, text


# 1. output paths are checked before anything is sent; no shutdown waits forever


@pytest.mark.parametrize("flag", ["-o", "--errors-out"])
async def test_a_missing_output_directory_is_refused_before_anything_is_sent(
    mock: MockServer, tmp_path: Path, flag: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    args = ["run", str(src), "-o", str(tmp_path / "out.jsonl")]
    bad = str(tmp_path / "nodir" / "sub" / "x.jsonl")
    args += ["--errors-out", bad] if flag == "--errors-out" else []
    if flag == "-o":
        args[3] = bad
    started = time.monotonic()
    code, _, stderr = await cli(*args, env=embedded_env(mock), timeout_s=30)
    assert code == 2, stderr
    assert "does not exist; create it first" in stderr
    assert time.monotonic() - started < 20  # no hang
    assert mock.stats.requests == 0  # nothing sent, nothing paid for
    no_traceback(stderr)


async def test_with_redis_a_missing_directory_costs_nothing_either(
    redis: ArqRedis, settings: Settings, mock: MockServer, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    env = worker_env(settings)
    code, _, stderr = await cli("run", str(src), "-o", str(tmp_path / "no/x.jsonl"), env=env)
    assert code == 2, stderr
    assert "does not exist" in stderr
    assert await redis.zcard(keys.BATCHES) == 0  # nothing enqueued
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        batch = await p.submit(["a"])
    code, _, stderr = await cli("results", batch.id, "-o", str(tmp_path / "no/x.jsonl"), env=env)
    assert code == 2
    assert "does not exist" in stderr
    no_traceback(stderr)


async def test_ctrl_c_on_an_embedded_run_exits_at_once_and_says_how_to_resume(
    tmp_path: Path,
) -> None:
    async with MockServer(MockConfig(latency_ms=400)) as slow:
        src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"c{i}", "prompt": f"p{i}"}
                                                  for i in range(300)])  # fmt: skip
        out = tmp_path / "out.jsonl"
        env = {**embedded_env(slow), "PROMPTQ_CONCURRENCY": "20"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "promptq", "run", str(src), "-o", str(out),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

        async def some_written() -> bool:
            return out.exists() and len(out.read_bytes().splitlines()) >= 20

        await wait_until(some_written, timeout_s=30, what="the first results")
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        stopped_s = time.monotonic() - started
        stderr = err.decode()
        assert proc.returncode == 130, stderr
        assert stopped_s < 5  # it does not wait for the requests in flight
        assert "run the same command again" in stderr
        no_traceback(stderr)
        first = {line["custom_id"] for line in read_jsonl(out)}
        sent_before = slow.stats.requests
        # the same command again sends only what has no line in OUT yet
        code, _, stderr = await cli("run", str(src), "-o", str(out), env=env, timeout_s=90)
        assert code == 0, stderr
        assert f"resuming: {len(first):,} of 300 requests already have a result" in stderr
        lines = read_jsonl(out)
        assert sorted(str(line["custom_id"]) for line in lines) == sorted(
            f"c{i}" for i in range(300)
        )  # exactly one line per custom_id, those of the first run included
        assert slow.stats.requests - sent_before == 300 - len(first)
        assert read_jsonl(tmp_path / "out.errors.jsonl") == []
        # all done: nothing is sent again
        code, _, stderr = await cli("run", str(src), "-o", str(out), env=env)
        assert code == 0
        assert "nothing to send" in stderr


async def test_a_changed_input_is_refused_unless_told_to_start_over(
    mock: MockServer, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    env = embedded_env(mock)
    assert (await cli("run", str(src), "-o", str(out), env=env))[0] == 0
    write_jsonl(src, [{"prompt": f"other {i}"} for i in range(4)])
    code, _, stderr = await cli("run", str(src), "-o", str(out), env=env)
    assert code == 2
    assert "holds results of other input" in stderr
    assert "--restart" in stderr
    code, _, stderr = await cli("run", str(src), "-o", str(out), "--restart", env=env)
    assert code == 0, stderr
    assert {line["response"]["body"]["choices"][0]["message"]["content"]  # type: ignore[index]
            for line in read_jsonl(out)} == {f"echo: other {i}" for i in range(4)}  # fmt: skip


# 2, 3. Redis URLs that cannot work say why


@pytest.fixture
def password_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is needed for this test (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="promptq-pw-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret",
         "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "-a", "s3cret", "ping"],
                             capture_output=True).stdout.strip() != b"PONG":  # fmt: skip
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(extra)
    return env


async def test_a_database_out_of_range_says_so(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/99"
    code, _, stderr = await cli("status", "x", "--redis-url", url, env=plain_env())
    assert code == 2
    assert "has no database 99" in stderr
    no_traceback(stderr)


@pytest.mark.parametrize(
    ("auth", "reason"),
    [(":wrong@", "invalid username-password pair"), ("", "Authentication required")],
)
async def test_a_wrong_password_is_an_auth_problem_not_a_missing_server(
    password_redis: str, auth: str, reason: str
) -> None:
    url = f"redis://{auth}{password_redis}/0"
    started = time.monotonic()
    code, _, stderr = await cli("status", "x", env=plain_env(PROMPTQ_REDIS_URL=url))
    assert code == 2
    assert "refused the credentials" in stderr
    assert reason in stderr
    assert "Start one" not in stderr  # no advice to start a server that is running
    assert "wrong" not in stderr  # the password stays hidden
    assert time.monotonic() - started < 10  # no waiting for a Redis that answers
    no_traceback(stderr)


async def test_an_unreachable_redis_is_waited_for_as_long_as_configured() -> None:
    env = plain_env(PROMPTQ_REDIS_URL="redis://127.0.0.1:1/0", PROMPTQ_REDIS_CONNECT_WAIT_S="2")
    started = time.monotonic()
    code, _, stderr = await cli("status", "x", env=env)
    waited = time.monotonic() - started
    assert code == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in stderr
    assert 2.0 <= waited < 8  # PROMPTQ_REDIS_CONNECT_WAIT_S, not less


# 4. watch shows a rate measured from the batch's start


async def test_watch_rate_is_measured_from_the_batch_start(
    redis: ArqRedis, settings: Settings
) -> None:
    from promptq.embedded import local_cluster

    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit([f"w{i}" for i in range(40)])
        await batch.wait(timeout_s=20)
        info = await batch.info()
    code, _, stderr = await cli("watch", batch.id, env=worker_env(settings))
    assert code == 0
    assert info.completed_at is not None
    started = info.in_progress_at or info.created_at
    assert started is not None
    expected = 40 / (info.completed_at - started)
    shown = re.findall(r"([\d,]+) req/s", stderr)
    if expected >= 1 and info.completed_at - started >= 1:
        assert shown
    for rate in shown:  # never the millions of a rate measured from the watcher's start
        assert float(rate.replace(",", "")) <= 1.2 * expected + 1


# 5. a dead upstream: a warning, a circuit breaker, exit codes


async def test_a_dead_upstream_is_warned_about_and_stops_the_batch_early(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    worker_procs.settings = settings.model_copy(update={"upstream_url": dead, "concurrency": 8})
    await worker_procs.launch(redis, 2, PROMPTQ_UPSTREAM_DOWN_S="2")
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        batch = await p.submit([f"d{i}" for i in range(2000)])
        code, _, _ = await cli("watch", batch.id, env=worker_env(settings), timeout_s=60)
        info = await batch.info()
        results = [r async for r in batch.results()]
    assert code == 1  # watch says the batch failed
    assert info.status is Status.FAILED
    assert info.reason is not None
    assert "refused every connection" in info.reason
    assert len(results) == 2000  # every request accounted for
    codes = {r.error.code for r in results if r.error is not None}
    assert "upstream_unreachable" in codes
    assert codes <= {"upstream_unreachable", "connection_error"}
    assert all(r.error is not None for r in results)
    attempts = sum(r.attempts for r in results)
    assert attempts <= 200  # not 2,000 x 5 attempts: the breaker stopped spending them
    log = worker_procs.log_text()
    assert "refuses connections" in log
    assert "does not answer" in log  # the check at start
    code, _, _ = await cli("status", batch.id, env=worker_env(settings))
    assert code == 1


async def test_a_worker_warns_when_a_public_upstream_has_no_key(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    worker_procs.settings = settings.model_copy(
        update={"upstream_url": "https://api.example.com/v1"}
    )
    await worker_procs.launch(redis, 1)
    await wait_until(
        lambda: _in_log(worker_procs, "no API key is set for https://api.example.com/v1"),
        what="the warning",
    )
    assert needs_key("https://api.openai.com/v1")
    assert not needs_key("http://127.0.0.1:8000/v1")
    assert not needs_key("http://vllm:8000/v1")  # a compose service
    assert not needs_key("http://10.0.0.5:8000/v1")


async def _in_log(procs: WorkerProcs, text: str) -> bool:
    return text in procs.log_text()


async def test_status_exit_codes(redis: ArqRedis, settings: Settings) -> None:
    from promptq.embedded import local_cluster

    async with local_cluster(settings, workers=1) as producer:
        clean = await producer.submit(["fine"])
        broken = await producer.submit(["ok", "bad [[mock status=400]]"])
        await clean.wait(timeout_s=20)
        await broken.wait(timeout_s=20)
    env = worker_env(settings)
    assert (await cli("status", clean.id, env=env))[0] == 0
    assert (await cli("status", broken.id, env=env))[0] == 1
    assert (await cli("status", "no-such-batch", env=env))[0] == 2


# 6, 7, 8, 9. usage


async def test_demo_with_no_workers_is_a_usage_error() -> None:
    code, _, stderr = await cli("demo", "--workers", "0", "-n", "5", env=plain_env(), timeout_s=30)
    assert code == 2
    assert "--workers" in stderr


async def test_workers_json_has_numbers_as_numbers(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    env = worker_env(settings)
    code, stdout, _ = await cli("workers", env=env)
    assert code == 0
    assert "no live workers" in stdout  # not an empty table
    await worker_procs.launch(redis, 1)
    code, stdout, _ = await cli("workers", "--json", env=env)
    (beat,) = orjson.loads(stdout)
    assert isinstance(beat["pid"], int)
    assert isinstance(beat["done"], int)
    assert isinstance(beat["last_beat"], float)
    assert isinstance(beat["host"], str)


async def test_retry_failed_twice_keeps_the_first_link(redis: ArqRedis, settings: Settings) -> None:
    from promptq.embedded import local_cluster

    async with local_cluster(settings, workers=1) as producer:
        first = await producer.submit(["ok", "bad [[mock status=400]]"])
        await first.wait(timeout_s=20)
        retry = await producer.retry_failed(first.id)
        await retry.wait(timeout_s=20)
    code, stdout, stderr = await cli("retry-failed", first.id, env=worker_env(settings))
    assert code == 2
    assert f"already retried as '{retry.id}'" in stderr
    assert stdout == ""
    assert await redis.hget(keys.batch(first.id), "retried_by") == retry.id.encode()


async def test_flags_after_the_command_and_errors_that_name_the_flag(
    redis: ArqRedis, settings: Settings, tmp_path: Path
) -> None:
    env = plain_env()
    code, _, stderr = await cli("status", "nope", "--redis-url", settings.redis_url_or_default,
                                env=env)  # fmt: skip
    assert code == 2
    assert "no batch 'nope'" in stderr  # the URL after the command was used
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    code, _, stderr = await cli("run", str(src), "-o", str(tmp_path / "o.jsonl"),
                                "--concurrency", "0", env=env)  # fmt: skip
    assert code == 2
    assert "--concurrency:" in stderr
    assert "PROMPTQ_CONCURRENCY" not in stderr
    code, _, stderr = await cli("run", str(src), "-o", str(tmp_path / "o.jsonl"),
                                env={**env, "PROMPTQ_CONCURRENCY": "0"})  # fmt: skip
    assert code == 2
    assert "PROMPTQ_CONCURRENCY:" in stderr
    code, _, stderr = await cli("run", str(src), "-o", str(tmp_path / "o.jsonl"),
                                "--workers", "-1", env=env)  # fmt: skip
    assert code == 2
    assert "--workers" in stderr


# 10. stdin/stdout, --order input, messages, BOM, JSON errors


async def test_dash_is_stdin_and_stdout(mock: MockServer, tmp_path: Path) -> None:
    rows = b"".join(orjson.dumps({"custom_id": f"s{i}", "prompt": f"p{i}"}) + b"\n"
                    for i in range(5))  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptq", "run", "-", "-o", "-",
        env=embedded_env(mock), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(rows), 60)
    assert proc.returncode == 0, err.decode()
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"s{i}" for i in range(5)]
    assert not (tmp_path / "-").exists()


async def test_order_input_writes_lines_in_input_order(
    redis: ArqRedis, settings: Settings, tmp_path: Path
) -> None:
    from promptq.embedded import local_cluster

    # later lines answer sooner: completion order is not input order
    items = [{"custom_id": f"o{i}", "prompt": f"p{i} [[mock latency_ms={300 - 25 * i}]]"}
             for i in range(10)]  # fmt: skip
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit(items)
        await batch.wait(timeout_s=20)
    out = tmp_path / "out.jsonl"
    env = worker_env(settings)
    assert (await cli("results", batch.id, "-o", str(out), "--order", "input", env=env))[0] == 0
    assert [line["custom_id"] for line in read_jsonl(out)] == [f"o{i}" for i in range(10)]
    assert (await cli("results", batch.id, "-o", str(out), env=env))[0] == 0
    assert [line["custom_id"] for line in read_jsonl(out)] != [f"o{i}" for i in range(10)]
    src = write_jsonl(tmp_path / "in.jsonl", items)
    code, _, stderr = await cli("run", str(src), "-o", str(out), "--order", "input",
                                env=worker_env(settings, PROMPTQ_REDIS_URL=""))  # fmt: skip
    assert code == 0, stderr
    assert [line["custom_id"] for line in read_jsonl(out)] == [f"o{i}" for i in range(10)]


def test_short_form_messages_bom_and_json_error_columns() -> None:
    data = (
        b"\xef\xbb\xbf"  # a UTF-8 BOM, as Windows tools write
        + b'{"custom_id": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}\n'
        + b'{"prompt": "ok"}\n'
    )
    parsed = parse_jsonl(data, source="in.jsonl", default_model="m")
    first = parsed.requests[0]
    assert first.body["messages"] == [{"role": "user", "content": "hi"}]
    assert (first.body["max_tokens"], first.body["model"]) == (5, "m")
    with pytest.raises(InputError) as bad:
        parse_jsonl(b'{"prompt": "a"}\n{"prompt": "b" "x"}\n', source="in.jsonl",
                    default_model="m")  # fmt: skip
    (error,) = bad.value.errors
    assert error.line == 2
    assert "line 1" not in error.message
    assert "column 16" in error.message
    with pytest.raises(InputError, match="either prompt or messages"):
        parse_jsonl(b'{"prompt": "a", "messages": []}\n', source="x", default_model="m")


# 11. the README's one-call example runs as written


def test_the_readme_python_example_runs(mock_process: str) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(import promptq\n.*?)```", readme, re.S)
    assert block is not None, "the README's first Python example starts with import promptq"
    code = block.group(1)
    env = {**plain_env(PROMPTQ_UPSTREAM_URL=mock_process, PROMPTQ_MODEL="mock-gpt")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout


@pytest.fixture
def mock_process() -> Iterator[str]:
    """A mock upstream in a process of its own (a blocked test loop cannot stall it)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptq", "mock-llm", "--port", str(port), "--latency-ms", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import socket

        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mock-llm did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# promptq.run: a plain script, a running loop


def test_promptq_run_in_a_plain_script(mock_process: str) -> None:
    run = promptq.run(
        ["What is 2+2?", {"custom_id": "q2", "prompt": "Name a prime."}],
        concurrency=8,
        upstream_url=mock_process,
        model="mock-gpt",
    )
    assert [r.custom_id for r in run.results] == ["line-1", "q2"]  # input order
    assert run.results[1].content == "echo: Name a prime."
    assert (run.stats.succeeded, run.stats.failed) == (2, 0)


async def test_promptq_run_inside_a_running_event_loop(mock_process: str) -> None:
    run = promptq.run([f"n{i}" for i in range(20)], upstream_url=mock_process, model="m")
    assert [r.content for r in run.results] == [f"echo: n{i}" for i in range(20)]
    arun = await promptq.arun(["x"], upstream_url=mock_process, model="m")
    assert arun.results[0].content == "echo: x"
    seen = [r.custom_id async for r in promptq.stream(["a", "b"], upstream_url=mock_process)]
    assert sorted(seen) == ["line-1", "line-2"]
    with pytest.raises(TypeError, match="unknown option"):
        promptq.run(["x"], concurency=5)
    with pytest.raises(InputError, match="is empty"):
        promptq.run([""], upstream_url=mock_process)


# 12. output that is not a terminal, workers' shutdown lines


async def test_piped_output_is_not_cut_to_80_columns(redis: ArqRedis, settings: Settings) -> None:
    long_id = "x" * 60
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        await p.submit(["a"], batch_id=long_id)
    _, stdout, _ = await cli("status", long_id, env=worker_env(settings))
    assert f"batch {long_id}" in stdout
    assert "…" not in stdout


async def test_a_worker_says_it_drains_and_that_it_stopped(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    await worker_procs.launch(redis, 1)
    assert await worker_procs.terminate(0) == 0
    log = worker_procs.log_text()
    assert "SIGTERM: draining" in log
    assert re.search(r"worker \S+ stopped in [\d.]+s", log)
