"""Two CPU processes on gloo: DDP keeps ranks identical, shards data and eval, saves once, resumes exactly;
FSDP2 trains to the same weights."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pixel_sail_ros.training.data import ResumableBatchSampler

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, runs: list[list[str]], result_dir: str) -> None:
    """One torchrun-like rank: environment and process group, the trainer runs, each run's parameters to a file."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pixel_sail_ros.training import train

    dist.init_process_group("gloo")  # ours: the trainer leaves a caller's group open, so runs can follow
    try:
        for i, argv in enumerate(runs):
            trainer = train.Trainer(train.build_parser().parse_args(argv))
            trainer.run()
            if "--fsdp" in argv:  # sharded: gather (a collective), rank 0 gets the full tensors
                full = trainer._full_model_state()
                state = {k[len("model."):]: v.clone() for k, v in full.items() if k.startswith("model.")}
                state.pop("lm_head.weight", None)  # tied to the embeddings
                if rank != 0:
                    continue
            else:  # replicated: this rank's own copy
                state = {k: v.detach().clone() for k, v in train.base_model(trainer.module.model).state_dict().items()}
                state.pop("lm_head.weight", None)
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(result_dir) / f"run{i}_rank{rank}.safetensors"))
        # Both ranks reach the end together, with every result on disk. Then leave without tearing gloo down: in
        # CI a rank died in gloo's teardown after all its work was done ("terminate called without an active
        # exception", SIGABRT), twice, once even after this barrier; the parent reads only the files.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(runs: list[list[str]], result_dir: Path) -> list[list[dict[str, torch.Tensor]]]:
    """Per run, per rank: the parameters after training."""
    result_dir.mkdir(parents=True, exist_ok=True)
    # spawn, not fork: a forked child of a pytest-xdist worker inherits its threads' locks (execnet, OpenMP
    # pools of earlier tests) and hung once in CI; spawn costs an import of torch per rank, seconds
    mp.start_processes(_worker, args=(_free_port(), runs, str(result_dir)), nprocs=WORLD, join=True, start_method="spawn")
    files = [[result_dir / f"run{i}_rank{r}.safetensors" for r in range(WORLD)] for i in range(len(runs))]
    return [[load_file(str(f)) for f in run if f.is_file()] for run in files]


def test_sampler_shards_ranks_and_restarts_anywhere():
    samplers = [ResumableBatchSampler(100, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for g in range(40):  # crosses epochs (16 micro-batches each)
        a, b = samplers[0].batch(g), samplers[1].batch(g)
        assert not {k[0] for k in a} & {k[0] for k in b}
        assert a[0][1] == g // 16
    late = iter(ResumableBatchSampler(100, 3, seed=1, rank=1, world_size=2, start=21))
    assert next(late) == samplers[1].batch(21)


@pytest.mark.timeout(120)
def test_ddp_two_processes_gloo(tmp_path: Path):
    common = [
        "--preset", "tiny", "--model-overrides", json.dumps({"num_hidden_layers": 1}), "--image-size", "48",
        "--threads", "1", "--no-progress", "--num-points", "64", "--turns-per-image", "3", "--batch-size", "1",
        "--lr", "1e-3", "--max-steps", "3", "--save-every", "2", "--eval-every", "3", "--eval-samples", "4",
        "--log-every", "1", "--save-total-limit", "5",
    ]
    out, resumed, fsdp = tmp_path / "run", tmp_path / "resumed", tmp_path / "fsdp"
    ranks, again, sharded = _spawn(
        [
            common + ["--output-dir", str(out)],
            # then both ranks resume from step 2 of that run: they must end where it ended
            common + ["--eval-every", "0", "--output-dir", str(resumed), "--resume", str(out / "checkpoint-2")],
            # and FSDP2 (the --fsdp path for 3B+): same training, parameters sharded over the two ranks
            common + ["--eval-every", "0", "--output-dir", str(fsdp), "--fsdp"],
        ],
        tmp_path / "ranks",
    )
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP kept the replicas identical
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)  # rank 0 saved the trained weights once
    first = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert any(not torch.equal(first[k], saved[k]) for k in saved)
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors", "rng_state_1.safetensors"}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if r["type"] == "eval"]
    assert len(ev) == 1 and ev[0]["num_samples"] == 4  # 2 per rank, summed by all_reduce
    assert len([r for r in recs if r["type"] == "train"]) == 3  # logged once, by rank 0
    assert all(torch.equal(again[r][k], ranks[0][k]) for r in range(WORLD) for k in ranks[0])  # exact resume
    full = load_file(str(fsdp / "model.safetensors"))  # gathered from the shards by rank 0
    assert full.keys() == saved.keys()
    assert all(torch.allclose(full[k], saved[k], atol=1e-5) for k in saved)  # = DDP up to summation order
    assert all(torch.equal(sharded[0][k], full[k]) for k in full)
