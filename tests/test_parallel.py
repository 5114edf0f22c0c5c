"""irm.parallel: the data-parallel launcher of the non-Lightning stages, on 2 CPU processes (gloo)."""

import pytest

from irm.config import RunConfig
from irm.errors import UserError
from irm.parallel import Ranks, launch, split_list


def _square_share(ranks: Ranks, cfg: RunConfig, n: int):
    """Each rank squares its contiguous share; every rank sees every share; rank 0 returns the whole."""
    mine = [i * i for i in ranks.split(n)]
    shares = ranks.gather({"rank": ranks.rank, "values": mine, "device": str(ranks.device)})
    ranks.barrier()
    token = ranks.broadcast(f"from rank {ranks.rank}")
    return {"world": ranks.world_size, "shares": shares, "token": token, "main": ranks.is_main}


def test_split_covers_everything_once_in_order():
    for n in (0, 1, 5, 16, 17):
        for world in (1, 2, 3, 8):
            parts = [list(Ranks(rank=r, world_size=world).split(n)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert split_list("abcde", Ranks(rank=1, world_size=2)) == ["c", "d", "e"]


def test_one_device_runs_in_process():
    out = launch(RunConfig(device="cpu"), _square_share, 5)
    assert out == {"world": 1, "shares": [{"rank": 0, "values": [0, 1, 4, 9, 16], "device": "cpu"}],
                   "token": "from rank 0", "main": True}


@pytest.mark.slow
def test_two_cpu_processes_gather_and_return_rank_zero():
    out = launch(RunConfig(device="cpu", devices=2), _square_share, 5)
    assert out["world"] == 2 and out["main"] is True
    assert out["token"] == "from rank 0"
    assert [s["rank"] for s in out["shares"]] == [0, 1]
    assert out["shares"][0]["values"] + out["shares"][1]["values"] == [0, 1, 4, 9, 16]
    assert {s["device"] for s in out["shares"]} == {"cpu"}


def test_bad_devices_are_refused():
    with pytest.raises(UserError, match="devices must be >= 1"):
        launch(RunConfig(device="cpu", devices=0), _square_share, 1)
    with pytest.raises(UserError, match="cuda:1"):
        launch(RunConfig(device="cuda:1", devices=2), _square_share, 1)


def _refuse_on_rank_one(ranks: Ranks, cfg: RunConfig):
    if ranks.rank == 1:
        raise UserError("rank 1 found bad input")
    ranks.barrier()


def _crash_on_rank_one(ranks: Ranks, cfg: RunConfig):
    if ranks.rank == 1:
        raise ZeroDivisionError("not a user error")
    ranks.barrier()


@pytest.mark.slow
def test_a_workers_user_error_reaches_the_caller_as_one_user_error_and_other_errors_stay_errors():
    with pytest.raises(UserError, match="^rank 1 found bad input$"):
        launch(RunConfig(device="cpu", devices=2), _refuse_on_rank_one)
    with pytest.raises(Exception, match="ZeroDivisionError: not a user error") as info:
        launch(RunConfig(device="cpu", devices=2), _crash_on_rank_one)
    assert not isinstance(info.value, UserError)
