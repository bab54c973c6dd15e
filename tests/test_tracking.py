"""Run tracking through a real `mlflow server` that goes down in the middle of a run and comes back."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from cluster.runtime import tracking
from cluster.runtime.local_services import free_port, start_local_server, stop_server
from cluster.runtime.tracking import RunLogger, read_metrics


def stop(proc) -> None:
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it so stop_server sees the group end
    stop_server(proc.pid)


def test_server_down_mid_run_keeps_every_step_and_uploads_them_when_it_is_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.5)
    uri, store, run_dir = f"http://127.0.0.1:{free_port()}", tmp_path / "mlflow", tmp_path / "run"
    server = start_local_server(store, uri)
    try:
        logger = RunLogger(run_dir, experiment="outage", run_name="r", uri=uri, params={"train.max_lr": 0.01})
        logger.log_metrics({"loss": 5.0}, 0)
        assert logger.online

        stop(server)
        for step in range(1, 4):  # training goes on while the server is away
            logger.log_metrics({"loss": 5.0 - step}, step)
        assert not logger.online
        assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]
        assert capsys.readouterr().err.count("is unreachable") == 1

        server = start_local_server(store, uri)  # the same store on the same port, as a restarted server would be
        time.sleep(0.6)  # past the retry interval
        logger.log_metrics({"loss": 1.0}, 4)
        assert logger.online
        assert "reachable again: uploaded 4 held-back steps" in capsys.readouterr().err
        logger.close()

        client = MlflowClient(uri)
        assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss")] == [
            (0, 5.0), (1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)
        ]
        run = client.get_run(logger.run_id)
        assert run.info.status == "FINISHED" and run.data.params["train.max_lr"] == "0.01"
    finally:
        stop(server)


def test_a_resumed_logger_continues_the_same_run(tmp_path, mlflow_server):
    first = RunLogger(tmp_path, experiment="resume", run_name="r", uri=mlflow_server)
    first.log_metrics({"loss": 2.0}, 0)
    first.close(status="KILLED")
    second = RunLogger(tmp_path, uri=mlflow_server)  # the directory names the run: no experiment needed
    second.log_metrics({"loss": 1.0}, 1)
    second.close()
    assert second.run_id == first.run_id
    client = MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [0, 1]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_new_run_without_an_experiment_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mlflow_run_id does not exist: name the experiment"):
        RunLogger(tmp_path / "run", uri=f"http://127.0.0.1:{free_port()}")
    assert not (tmp_path / "run").exists()


def test_an_unreachable_server_from_the_start_warns_once_and_keeps_metrics(tmp_path, capsys):
    logger = RunLogger(tmp_path, experiment="x", run_name="r", uri=f"http://127.0.0.1:{free_port()}")
    for step in range(3):
        logger.log_metrics({"loss": 1.0}, step)
    logger.close()
    assert len(read_metrics(tmp_path)) == 3 and not logger.online
    assert capsys.readouterr().err.count("is unreachable") == 1
