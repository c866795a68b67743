"""``python -m hf_adaptive.parallel.run_script``: our multi-process scripts start through the same accelerate
launcher as the parallel workers (command contract, and a real two-process gloo run on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hf_adaptive.parallel.launch import build_script_launch


def test_script_launch_matches_the_worker_launch():
    """Guards the contract: accelerate's torchrun path with a free port and file rendezvous, the script and its
    arguments last, the workers' environment (gloo on CPU), and the caller's mapping left as it was."""
    base = {"PATH": "/bin"}
    cmd, env = build_script_launch("eval/x.py", ["--out", "d"], 2, base, cpu=True, python="py")
    assert cmd[:4] == ["py", "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "0"
    assert cmd[cmd.index("--rdzv_conf") + 1] == "store_type=file"
    assert cmd[-3:] == ["eval/x.py", "--out", "d"] and "hf_adaptive.parallel.worker" not in cmd
    assert env["HF_ADAPTIVE_BACKEND"] == "gloo" and env["CUDA_VISIBLE_DEVICES"] == "" and base == {"PATH": "/bin"}
    assert env["HF_HUB_OFFLINE"] == "1"
    cmd, env = build_script_launch("s.py", [], 1, {}, python="py")
    assert "--multi_gpu" not in cmd and env["HF_ADAPTIVE_BACKEND"] == "nccl"


def test_run_script_refuses_a_missing_script(tmp_path, capsys):
    from hf_adaptive.parallel.run_script import main

    with pytest.raises(SystemExit):
        main(["--processes", "2", "--cpu", str(tmp_path / "nope.py")])
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--processes", "0", "--cpu", str(tmp_path / "nope.py")])


def test_two_gloo_processes_rendezvous_and_reduce(tmp_path):
    """Guards the launch for real: two CPU processes get ranks 0 and 1 of a world of 2 and all-reduce over gloo."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        import torch, torch.distributed as dist
        dist.init_process_group(os.environ["HF_ADAPTIVE_BACKEND"])
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}
        open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(out))
        dist.destroy_process_group()
    """))
    proc = subprocess.run([sys.executable, "-m", "hf_adaptive.parallel.run_script", "--processes", "2", "--cpu",
                           "--timeout-s", "120", str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)), key=lambda d: d["rank"])
    assert got == [{"rank": 0, "world": 2, "sum": 3.0}, {"rank": 1, "world": 2, "sum": 3.0}]
