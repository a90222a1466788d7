"""``python -m xdtrain.data CONFIG``: describes a config's batches; bad input, one line."""

from __future__ import annotations

import subprocess
import sys

from xdtrain.data.__main__ import main


def test_describes_a_batch_of_the_config(packed, capsys):
    argv = [
        "configs/demo/pt_simclr_imagenet.yaml",
        "--set",
        f"data.shards={packed['imagenet']}",
        "--set",
        "data.batch_size=4",
        "--batches",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 × float32 [4, 3, 32, 32]" in out
    assert "batches per epoch of 4; preset simclr_small" in out


def test_missing_shards_give_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdtrain.data",
            "configs/demo/pt_simclr_imagenet.yaml",
            "--set",
            f"data.shards={tmp_path / 'none'}",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no shard folder" in done.stderr
