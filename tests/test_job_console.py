"""What `make demo` shows of the pipeline job's output (cluster/runtime/job_console.py), fed with lines in the formats a
real `ray job submit` of the pipeline printed: everything reaches the log file, people see the stages."""

from __future__ import annotations

import io

import pytest

from cluster.runtime.job_console import JobConsole

ESC = "\x1b"
WORKER = f"{ESC}[36m(RayTrainWorker pid=29493){ESC}[0m "
OUTPUT = [
    f"2026-12-05 06:30:49,700\tINFO cli.py:42 -- {ESC}[37mJob submission server address{ESC}[39m: http://127.0.0.1:8265",
    f"2026-12-05 06:30:51,734\tSUCC cli.py:67 -- {ESC}[32mJob 'raysubmit_JWux74QQ1juz2qLd' submitted successfully{ESC}[39m",
    "Running entrypoint for job raysubmit_JWux74QQ1juz2qLd: python jobs/pipeline.py --config configs/pipeline-local.yaml",
    "2026-12-05 06:30:56,603\tINFO worker.py:1841 -- Connecting to existing Ray cluster at address: 192.0.2.2:6379...",
    "[prepare] running",
    "[2026-12-05 06:31:07,435 E 28924 28924] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
    "TokenizeDocuments))' has constructor arguments in the object store and max_restarts > 0.",
    "/runs/data/pydocs: 2 shards, 422 documents, 520,629 tokens (val 33,175, train 487,454) — wrote in 22.9 s",
    "[prepare] done in 23 s",
    "[pretrain] running",
    f"{ESC}[36m(TrainController pid=29373){ESC}[0m Requesting resources: {{'CPU': 1.0}} * 2",
    f"{WORKER}Wrapping provided model in DistributedDataParallel.",
    f"{WORKER}step 1/60 | loss 10.8016 | lr 5.00e-04 | grad norm 6.30 | 18073 ms | 227 tokens/s | MFU 40.9% | val_loss 10.7940",
    f"{WORKER}step 1/60 | loss 10.8016 | lr 5.00e-04 | grad norm 6.30 | 18073 ms | 227 tokens/s | MFU 40.9% | val_loss 10.7940",
    f"{WORKER}step 2/60 | loss 10.1821 | lr 1.00e-03 | grad norm 4.36 | 13530 ms | 303 tokens/s | MFU 54.6%",
    f"{WORKER}step 3/60 | loss 9.8323 | lr 1.50e-03 | grad norm 3.43 | 13059 ms | 314 tokens/s | MFU 56.6%",
    "Downloading artifacts:  12%|█▎        | 1/8 [00:00<00:00, 4718.00it/s]",
    "2026/12/05 07:09:17 WARNING mlflow.pyfunc: Passing a Python object as `python_model` causes it to be serialized",
    "🏃 View run local at: http://127.0.0.1:5000/#/experiments/2/runs/4152cbfb5f8b4998b0477b7fec4efb70",
    "Registered model 'gpt2-local-finetuned' already exists. Creating a new version of this model...",
    "Created version '1' of model 'gpt2-local-finetuned'.",
    "[pretrain] done in 700 s",
    "[evaluate] running",
    "2026-12-05 06:55:05,751\tINFO logging_progress.py:225 -- Total Progress: 0/?",
    "2026-12-05 06:56:06,230\tINFO logging_progress.py:225 -- Total Progress: 16/624",
    "2026-12-05 06:56:06,230\tINFO logging_progress.py:231 -- MapBatches(_Scorer): 16/624",
    "2026-12-05 06:56:16,230\tINFO logging_progress.py:225 -- Total Progress: 16/624",
    "2026-12-05 06:56:26,230\tINFO logging_progress.py:225 -- Total Progress: 48/624",
    "2026-12-05 06:56:36,230\tINFO logging_progress.py:225 -- Total Progress: 64/624",
    "2026-12-05 06:56:46,230\tINFO logging_progress.py:225 -- Total Progress: 200/411",
    "2026-12-05 06:56:56,230\tINFO logging_progress.py:225 -- Total Progress: 363/363",
    "[evaluate] done in 90 s",
    "[finetune] running",
    "Trial status: 2 RUNNING",
    "Current time: 2026-12-05 07:02:04. Total running time: 1min 30s",
    "Trial status: 2 RUNNING",
    "Current best trial: 90e1e_00001 with val_loss=5.87 and params={'lr': 0.001, 'data': ObjectRef(00ffff)}",
    "Trial finetune_loop_90e1e_00000 completed after 1 iterations at 2026-12-05 07:02:19.",
    "Trial status: 1 TERMINATED | 2 RUNNING",
    "╭──────────────────────────────────────────────────────────╮",
    "│ Trial name      status    lr   data                      │",
    "│ tune_fn_1b2c3   RUNNING   0.001  ObjectRef(00ffff...)   │",
    "best learning rate: 0.001 (val loss 5.2000); results in /runs/finetune/local/search/results.csv",
    "[finetune] done in 200 s",
    "[serve] running",
    "INFO 2026-12-05 07:35:24,002 serve 28924 -- Started Serve in namespace \"serve\".",
    "[serve] done in 39 s",
    "=== pipeline results ===",
    "pretraining val loss (first → last)  10.794 → 6.200",
    "Serve API: http://127.0.0.1:8000/v1   web page: http://127.0.0.1:8000/",
]


def watch(lines: list[str]) -> tuple[list[str], str, JobConsole]:
    shown, log = [], io.StringIO()
    ticks = iter(range(0, 10_000, 10))  # each reading of the clock (one per count shown) 10 s after the last
    console = JobConsole(log, shown.append, clock=lambda: float(next(ticks)))
    for line in lines:
        console.feed(line + "\n")
    return shown, log.getvalue(), console


def test_people_see_the_stages_steps_summaries_and_results_and_the_log_file_keeps_everything():
    shown, log, console = watch(OUTPUT)
    assert shown == [
        "[prepare] running",
        "  /runs/data/pydocs: 2 shards, 422 documents, 520,629 tokens (val 33,175, train 487,454) — wrote in 22.9 s",
        "[prepare] done in 23 s",
        "[pretrain] running",
        "  step 1/60 | loss 10.8016 | 18073 ms | 227 tokens/s | val_loss 10.7940",
        "  step 2/60 | loss 10.1821 | 13530 ms | 303 tokens/s | ETA 13m05s",  # 13.53 s a step so far, 58 to go
        "  step 3/60 | loss 9.8323 | 13059 ms | 314 tokens/s | ETA 12m38s",  # the first step (start-up) left out
        "[pretrain] done in 700 s",
        "[evaluate] running",
        "  16/624 blocks (3%)",  # the first count; then one line per tenth of the work
        "  64/624 blocks (10%) | ETA 3m53s",  # 48 blocks in 20 s, 560 to go
        "  200/411 blocks (49%) | ETA 34s",  # Ray Data revised its total
        "  363/363 blocks (100%) | ETA 0s",
        "[evaluate] done in 90 s",
        "[finetune] running",
        "  trials: 2 RUNNING",
        "  trials: 1 TERMINATED | 2 RUNNING",
        "  best learning rate: 0.001 (val loss 5.2000); results in /runs/finetune/local/search/results.csv",
        "[finetune] done in 200 s",
        "[serve] running",
        "[serve] done in 39 s",
        "\n=== pipeline results ===",
        "pretraining val loss (first → last)  10.794 → 6.200",
        "Serve API: http://127.0.0.1:8000/v1   web page: http://127.0.0.1:8000/",
    ]
    assert console.job_id == "raysubmit_JWux74QQ1juz2qLd"
    assert log.count("\n") == len(OUTPUT) and ESC not in log  # every line, duplicates included, without colours
    assert "core_worker.cc:2465" in log and "ObjectRef" in log


def test_errors_and_tracebacks_are_shown_in_full_and_a_failure_shows_the_end_of_the_output():
    lines = [
        "[evaluate] running",
        f"{WORKER}Traceback (most recent call last):",
        f'{WORKER}  File "/runs/cluster/eval/evaluation.py", line 12, in score',
        f"{WORKER}    raise ValueError('bad example')",
        f"{WORKER}ValueError: bad example",
        f"{WORKER}an actor's ordinary print",
        "WARNING: the model in /runs/x was not logged or registered in MLflow at http://127.0.0.1:5000: boom",
        "error: evaluation failed",
    ]
    shown, _, console = watch(lines)
    assert shown == [
        "[evaluate] running",
        "Traceback (most recent call last):",
        '  File "/runs/cluster/eval/evaluation.py", line 12, in score',
        "    raise ValueError('bad example')",
        "ValueError: bad example",
        "WARNING: the model in /runs/x was not logged or registered in MLflow at http://127.0.0.1:5000: boom",
        "error: evaluation failed",
    ]
    shown.clear()
    console.failed("/runs/demo/x.log")
    assert shown[0] == f"--- the job failed; the last {len(lines)} lines of its output (all of it: /runs/demo/x.log):"
    assert shown[1:] == [line.replace(ESC + "[36m", "").replace(ESC + "[0m", "") for line in lines]


def test_the_time_left_comes_from_the_step_durations_not_from_when_the_lines_arrive():
    """Ray hands a job's output over in bursts: lines that arrive together still give the pace their steps took."""
    shown, log = [], io.StringIO()
    console = JobConsole(log, shown.append, clock=lambda: 0.0)  # every line arrives at the same moment
    for s in (1, 2, 3):
        console.feed(f"{WORKER}step {s}/60 | loss 5.0 | {3000 if s == 1 else 1300} ms | 1 tokens/s\n")
    assert [line.rsplit("| ", 1)[-1] for line in shown] == ["1 tokens/s", "ETA 1m15s", "ETA 1m14s"]


def test_a_resumed_run_restarts_the_time_estimate():
    """After a worker restart (a new worker process) the steps start again from the checkpoint: the pace is measured
    anew."""
    restarted = WORKER.replace("29493", "29611")
    shown, _, _ = watch([f"{worker}step {s}/10 | loss 5.0 | 10000 ms | 1 tokens/s"
                         for worker, s in [(WORKER, 1), (WORKER, 2), (WORKER, 3), (restarted, 2), (restarted, 3),
                                           (restarted, 4)]])
    assert [line.rsplit("| ", 1)[-1] for line in shown] == [
        "1 tokens/s", "ETA 1m20s", "ETA 1m10s", "1 tokens/s", "ETA 1m10s", "ETA 1m00s"]


def test_a_copy_of_a_step_line_is_dropped_when_another_actors_line_comes_between():
    """Ray delivered `step 46` again after another worker's checkpoint line: shown once, and the time estimate goes on
    (a step count that goes back would otherwise read as a resumed run)."""
    other = f"{ESC}[36m(RayTrainWorker pid=29494){ESC}[0m Checkpoint successfully created at: Checkpoint(path=/runs/x)"
    steps = [f"{WORKER}step {s}/10 | loss 5.0 | 10000 ms | 1 tokens/s" for s in (1, 2, 3)]
    shown, log, _ = watch([steps[0], steps[1], other, steps[1], steps[2], steps[2]])
    assert [line.rsplit("| ", 1)[-1] for line in shown] == ["1 tokens/s", "ETA 1m20s", "ETA 1m10s"]
    assert log.count("step 2/10") == 2  # the log file keeps every line as delivered


def test_the_demo_refuses_a_bad_pipeline_config_before_starting_anything(tmp_path, monkeypatch, capsys):
    """`make demo` with a mistake in its config (here: a finetune override naming no key) ends in a second with the
    stage and key named, before the Ray head and MLflow server start and the job is submitted."""
    from tests.job_loader import load_job

    demo = load_job("demo")
    monkeypatch.setattr(demo, "up", lambda: pytest.fail("services were started for a config the job refuses"))
    config = tmp_path / "pipeline.yaml"
    config.write_text("finetune_overrides: ['train.lrr=1']\n")
    monkeypatch.setattr("sys.argv", ["demo.py", "--config", str(config)])
    with pytest.raises(SystemExit, match=r"error: the finetune stage: finetune_overrides of .*: unknown config key"):
        demo.main()
    monkeypatch.setattr("sys.argv", ["demo.py", "--from", "pretrian"])
    with pytest.raises(SystemExit):
        demo.main()
    assert "argument --from: invalid choice: 'pretrian'" in capsys.readouterr().err

