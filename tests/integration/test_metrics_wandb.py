"""W&B offline: a run's file, read back as wandb's service wrote it, holds the same scalars as
metrics.jsonl. The JSONL, TensorBoard and rollout metrics: tests/unit/test_metrics.py."""

from __future__ import annotations

import json

from asympo.metrics import MetricsLog


def read_wandb_records(path) -> list:
    """The protobuf `Record`s of a `.wandb` file: the LevelDB log format (32 KiB blocks of records, each
    with a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if not data.startswith(b":W&B"):  # not written yet
        return []
    block, pos, chunks, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record the service is still writing
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def read_wandb_run(folder, timeout: float = 60.0) -> tuple[list[dict], dict]:
    """History rows and config of an offline W&B run. wandb's service writes the file on its own and
    `finish()` can return before it has (seen with wandb 0.31: no history in 2 reads of 12 made
    straight after it), so wait for the run's closing `exit` record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        paths = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(paths) <= 1, paths
        records = read_wandb_records(paths[0]) if paths else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{folder}: no finished W&B run after {timeout:.0f} s"
        time.sleep(0.1)
    rows, config = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            step = items.pop("_step", record.history.step.num)
            rows.append({k: v for k, v in items.items() if not k.startswith("_")} | {"_step": step})
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    return rows, config


def test_wandb_offline_receives_the_same_scalars_as_the_jsonl(tmp_path, monkeypatch):
    from asympo.config import TrainConfig
    from asympo.metrics import WandbSettings
    from asympo.trainer import wandb_settings

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert wandb_settings(TrainConfig()) is None
    settings = wandb_settings(
        TrainConfig(wandb=True, wandb_project="p", wandb_run_name="r", wandb_mode="offline", steps=7)
    )
    assert isinstance(settings, WandbSettings) and (settings.project, settings.name) == ("p", "r")
    assert settings.mode == "offline" and settings.config["steps"] == 7

    log = MetricsLog(tmp_path, wandb=settings)
    steps = [
        {"reward": 0.25, "loss": 1.5, "staleness_hist": {"0": 8}},
        {"reward": 0.5, "loss": float("nan"), "staleness_mean": 1},
        {"reward": 0.75, "loss": 0.5},
    ]
    for step, metrics in enumerate(steps):
        log.log(step, metrics)
    log.close()
    rows, config = read_wandb_run(tmp_path)
    expected = []
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        expected.append(scalars | {"_step": step})
    assert rows == expected
    unwrap = {k: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v for k, v in config.items()}
    assert unwrap["steps"] == 7 and unwrap["objective"]["name"] == TrainConfig().objective.name
