"""What this machine offers the stages: CUDA, installed packages, a Prefect API, a gpu pool.

Probed when asked, never at import: torch takes 3-4 s to import and is imported only for a
config that needs CUDA; the Prefect API may not be there. The config (tasks/config.py)
stays what a recipe says; what this machine can do with it is asked here, by the verbs that
train (`load_config(..., for_training=True)`), by the train stage on the machine that
trains, and by the pipeline when it chooses where training runs.
"""

from __future__ import annotations

import importlib.util

from tasks.config import TrainConfig, accelerate_launch


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prefect_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def trains_here(train_on: str) -> bool:
    """Whether `llmft run` would train on this machine. 'auto' sends training to the gpu
    pool only when a Prefect server has one with a worker online; without a server
    configured it cannot, so the run trains here. (With a server, whether a worker is
    online is only known when the train stage starts; it checks this machine then.)"""
    if train_on == "auto":
        return not prefect_api_url()
    return train_on == "local"


def machine_problems(t: TrainConfig) -> list[str]:
    """What this machine lacks to train `t` (CUDA, bitsandbytes, DeepSpeed, Liger). Imports
    torch (3-4 s) only when the config asks for something that needs CUDA."""
    wants_cuda = t.method == "qlora" or t.device == "cuda" or t.precision == "fp16"
    cuda = (wants_cuda or t.liger is True) and cuda_available()
    problems = []
    if t.method == "qlora" and not cuda:
        problems.append(
            "train.method: got 'qlora': it needs a CUDA GPU (bitsandbytes quantizes on the GPU) "
            "and this machine has none; nothing was loaded; fix: --set train.method=lora on "
            "CPU, or train on a GPU worker (--set pipeline.train_on=gpu-pool)"
        )
    elif t.method == "qlora" and not installed("bitsandbytes"):
        problems.append(
            "train.method: got 'qlora': it needs bitsandbytes, which is not installed; "
            "fix: pip install 'llmft[gpu]' (or pip install bitsandbytes)"
        )
    if t.device == "cuda" and not cuda:
        problems.append(
            "train.device: got 'cuda': CUDA is not available on this machine; "
            "fix: --set train.device=auto"
        )
    if t.precision == "fp16" and (t.device == "cpu" or not cuda):
        problems.append(
            "train.precision: got 'fp16': fp16 training needs a CUDA GPU; "
            "fix: --set train.precision=auto (or fp32)"
        )
    if t.liger is True and not (cuda and installed("liger_kernel")):
        problems.append(
            "train.liger: got True: Liger kernels need CUDA and liger-kernel; "
            "fix: --set train.liger=auto"
        )
    if accelerate_launch(t).get("distributed_type") == "DEEPSPEED" and not installed("deepspeed"):
        problems.append(
            f"train.accelerate_config: got {t.accelerate_config!r}: it uses DeepSpeed, which is "
            "not installed; fix: pip install deepspeed, or --set train.accelerate_config=ddp"
        )
    return problems


def training_problems(t: TrainConfig, train_on: str) -> list[str]:
    """What this machine lacks to train `t`, when this machine is where it trains."""
    return machine_problems(t) if trains_here(train_on) else []


def trains_on_gpu_pool(train_on: str) -> bool:
    """`gpu-pool`, or `auto` when a server has a `gpu` work pool with a worker online."""
    if train_on != "auto":
        return train_on == "gpu-pool"
    if not prefect_api_url():
        return False
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool("gpu")
    except Exception:  # no such pool (or the server is away): train here
        return False
    return any(w.status == "ONLINE" for w in workers)
