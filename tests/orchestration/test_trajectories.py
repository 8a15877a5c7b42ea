"""The trajectory log's resume rule (orchestration/trajectories.py)."""

import pyarrow.parquet as pq

from orchestration.trajectories import TrajectoryLog, drop_steps_from
from policy.batch import Group


def _group(index: int) -> Group:
    return Group(prompt="1+1=", prompt_ids=[1], responses=[[2], [3]], behaviour_logprobs=[[0.0], [0.0]], version=0,
                 completions=["2", "3"], rewards=[1.0, 0.0], row={}, index=index, finish_reasons=["stop", "stop"])


def _log(path, steps):
    log = TrajectoryLog(path)
    for step in steps:
        log.write(TrajectoryLog.table(step, [_group(step)]))
    log.close()


def test_a_resume_drops_the_later_steps_of_earlier_files_and_keeps_the_rest(tmp_path):
    """Resumed at step 2 after a run reached step 3 (and an earlier resume logged from step 3):
    steps 2-3 are trained again, so their rows go; steps 0-1 stay, one row group per step."""
    _log(tmp_path / "trajectories.parquet", range(4))
    _log(tmp_path / "trajectories.from-step3.parquet", [3])
    assert drop_steps_from(tmp_path, 2) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectories.parquet"]  # the emptied file is gone
    kept = pq.ParquetFile(tmp_path / "trajectories.parquet")
    assert kept.read().column("step").to_pylist() == [0, 0, 1, 1] and kept.num_row_groups == 2
    assert drop_steps_from(tmp_path, 2) == 0  # nothing later left: the file is not rewritten


def test_a_log_without_its_footer_is_set_aside_not_fatal(tmp_path, caplog):
    """A run killed before closing its log leaves a Parquet file without footer: a resume keeps its
    bytes under another name and goes on."""
    log = TrajectoryLog(tmp_path / "trajectories.parquet")
    log.write(TrajectoryLog.table(0, [_group(0)]))
    log.close()
    torn = (tmp_path / "trajectories.parquet").read_bytes()[:-8]  # no footer length and magic bytes
    (tmp_path / "trajectories.parquet").write_bytes(torn)
    assert drop_steps_from(tmp_path, 0) == 0
    assert not (tmp_path / "trajectories.parquet").exists()
    assert (tmp_path / "trajectories.parquet.unreadable").read_bytes() == torn
    assert "cannot be read" in caplog.text
