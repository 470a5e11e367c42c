"""A Ray instance fedsim starts is stopped completely (and without Ray's one-second stall)."""

import pytest

ray = pytest.importorskip("ray")


def test_stop_local_ray_ends_every_process_ray_started():
    import ray._private.worker as ray_worker

    from fedsim.engines.ray_cluster import start_local_ray, stop_local_ray

    if ray.is_initialized():
        pytest.skip("another test module holds a Ray instance")
    start_local_ray(num_cpus=1)
    node = ray_worker._global_node
    processes = [info.process for infos in node.all_processes.values() for info in infos]
    assert len(processes) >= 3  # GCS, raylet, the autoscaler monitor, ...
    stop_local_ray()
    assert not ray.is_initialized()
    still_running = [p.args[0] if isinstance(p.args, list) else p.args for p in processes if p.poll() is None]
    assert not still_running, still_running


def test_a_ray_address_in_the_environment_does_not_decide_where_a_local_run_goes():
    """RAY_ADDRESS (or a `ray start` cluster file) must not make fedsim join, or fail to join, a
    cluster: only engine.ray.address / sweep --address join one."""
    import os
    import subprocess
    import sys

    code = ("from fedsim.engines.ray_cluster import start_local_ray, stop_local_ray\nimport ray\nstart_local_ray(1)\n"
            "print('cpus', ray.cluster_resources().get('CPU'))\nstop_local_ray()\n")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpus 1.0" in proc.stdout
