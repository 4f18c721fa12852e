"""Spot-checks as pure pieces: comparing answers, judging who lies, and RemoteBlocks rerouting a caught liar
(against the in-process fake swarm of test_remote_autograd)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
import torch

from swarm.client import BanList
from swarm.errors import PeerUnreachableError
from swarm.remote_autograd import RemoteBlocks
from swarm.spot_check import Answer, SpotChecker, judge, pair_tolerance, relative_error
from tests.unit.test_remote_autograd import NUM_BLOCKS, FakeSwarm, run_blocks

TOLERANCE = 0.01


def test_relative_error_ignores_scale_and_small_noise():
    x = torch.randn(2, 5, 16) * 300  # large activations, as deep layers have
    assert relative_error(x, x) == 0.0
    assert relative_error(x * (1 + 1e-3 * torch.randn_like(x)), x) < 2e-3  # float16-like rounding
    assert relative_error(x + x.std() * torch.randn_like(x), x) > 0.5  # corrupted


def test_relative_error_is_not_diluted_by_right_positions():
    x = torch.randn(1, 64, 16)
    x[:, 0] *= 100  # an attention-sink position with a huge norm
    wrong = x.clone()
    wrong[:, -1] = torch.randn(16)  # only the last position (the one a generation uses) is wrong
    assert relative_error(wrong, x) > 0.5


def test_pair_tolerance_follows_the_coarsest_dtype():
    assert pair_tolerance("float32", "float32", "none", 0.01) == 0.01  # the floor
    assert pair_tolerance("float32", "float16", "none", 0.01) == pytest.approx(50 * 2**-10)
    assert pair_tolerance("float32", "float32", "float16", 0.01) == pytest.approx(50 * 2**-10)  # wire rounding
    assert pair_tolerance("bfloat16", "float32", "none", 0.01) == pytest.approx(50 * 2**-7)
    assert pair_tolerance("weird", "float32", "none", 0.01) == pytest.approx(50 * 2**-7)  # unknown: lenient


def test_judge_agreeing_answers_ban_nobody():
    x = torch.randn(1, 3, 8)
    verdict = judge(Answer("a", x), Answer("b", x + 1e-6), None)
    assert verdict.agreed and not verdict.liars


def test_judge_gives_bfloat16_servers_more_slack():
    x = torch.randn(1, 3, 64)
    off_by_5_percent = x + 0.05 * x.norm(dim=-1, keepdim=True) / 64**0.5 * torch.randn_like(x)  # [1, 3, 64]
    error = relative_error(off_by_5_percent, x)
    assert 0.01 < error < 0.2
    assert not judge(Answer("a", off_by_5_percent), Answer("b", x), None).agreed
    assert judge(Answer("a", off_by_5_percent, "bfloat16"), Answer("b", x), None).agreed


def test_judge_needs_a_referee_to_blame_anyone():
    x, wrong = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    verdict = judge(Answer("a", wrong), Answer("b", x), None)
    assert not verdict.agreed and not verdict.liars
    assert verdict.max_abs_diff == (wrong - x).abs().max().item()


def test_judge_blames_whoever_disagrees_with_the_referee():
    x, wrong = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    assert judge(Answer("a", wrong), Answer("b", x), Answer("c", x)).liars == ("a",)
    assert judge(Answer("a", x), Answer("b", wrong), Answer("c", x)).liars == ("b",)
    # three different answers settle nothing
    assert judge(Answer("a", x), Answer("b", wrong), Answer("c", torch.randn(1, 3, 8))).liars == ()


def test_distrusted_peers_stay_banned_past_failure_bans():
    bans = BanList(0.0)
    bans.distrust("liar", 60)
    bans.ban("liar")  # a later failover ban does not shorten it
    bans.ban("slow")
    assert bans.distrusted() == {"liar"} and "liar" in bans.banned()


class LyingSwarm(FakeSwarm):
    """The fake swarm, where ``liar`` adds noise to its outputs; spot-check settings as a client has them."""

    def __init__(self, *servers, liar: str):
        super().__init__(*servers)
        self.liar = liar
        self.config = SimpleNamespace(
            max_retries=3, spot_check_probability=1.0, spot_check_max_tokens=1024, spot_check_tolerance=TOLERANCE,
            spot_check_ban_s=3600.0, compression="none",
        )  # fmt: skip

    async def model_coverage(self, model_id: str, fresh: bool = False):
        return self.coverage

    async def forward(self, client, model_id, hop, hidden, extras=None):
        out = await super().forward(client, model_id, hop, hidden, extras)
        return out + torch.randn_like(out) if hop.peer_id == self.liar else out


def test_remote_blocks_reroute_around_a_caught_liar():
    # the liar is the fastest and takes the route; two honest servers can check and referee it
    swarm = LyingSwarm(("liar", 0, 4, 100.0), ("a", 0, 4, 1.0), ("b", 0, 4, 1.0), liar="liar")
    checker = SpotChecker(swarm, rng=random.Random(0))
    blocks = RemoteBlocks(
        swarm, "m", 0, NUM_BLOCKS, asyncio.run, forward_call=swarm.forward, backward_call=swarm.backward,
        spot_checker=checker,
    )  # fmt: skip
    hidden = torch.randn(2, 3, 8)
    out, trace = asyncio.run(blocks.forward_traced(hidden))
    torch.testing.assert_close(out, run_blocks(swarm.weights, hidden, 0, NUM_BLOCKS))
    assert [t.hop.peer_id for t in trace] != ["liar"]
    assert checker.stats.banned == {"liar"} and checker.stats.mismatches == 1
    assert "liar" in swarm.bans.distrusted()


def test_an_honest_hop_checked_by_the_liar_is_kept():
    # only the honest server is on the route; the liar and a referee check it
    swarm = LyingSwarm(("a", 0, 4, 100.0), ("liar", 0, 4, 1.0), ("b", 0, 4, 1.0), liar="liar")
    checker = SpotChecker(swarm, rng=random.Random(0))
    hop = asyncio.run(swarm.route("m"))[0]
    assert hop.peer_id == "a"
    hidden = torch.randn(1, 4, 8)
    honest = run_blocks(swarm.weights, hidden, 0, NUM_BLOCKS)
    for _ in range(5):  # whichever checks first, "a" is never blamed
        caught = asyncio.run(checker.caught("m", hop, hidden, honest[:, -2:], forward_call=swarm.forward))
        assert not caught
    assert checker.stats.banned <= {"liar"} and checker.stats.unresolved == 0


def test_no_second_server_means_no_check():
    swarm = LyingSwarm(("liar", 0, 4, 1.0), ("a", 0, 2, 1.0), ("b", 2, 4, 1.0), liar="liar")
    checker = SpotChecker(swarm)
    hop = asyncio.run(swarm.route("m", 0, 4))[0]
    assert not asyncio.run(checker.caught("m", hop, torch.randn(1, 2, 8), torch.randn(1, 2, 8), swarm.forward))
    assert checker.stats.checks == 0


def test_wanted_respects_probability_and_history_length():
    swarm = LyingSwarm(("a", 0, 4, 1.0), liar="none")
    checker = SpotChecker(swarm, rng=random.Random(0))
    assert all(checker.wanted(10) for _ in range(100))
    long_history = sum(checker.wanted(4 * 1024) for _ in range(2000)) / 2000  # p x max_tokens / tokens = 0.25
    assert 0.2 < long_history < 0.3
    swarm.config.spot_check_probability = 0.0
    assert not checker.wanted(10)


def test_a_checker_that_fails_is_skipped_and_banned():
    swarm = LyingSwarm(("liar", 0, 4, 100.0), ("a", 0, 4, 1.0), ("b", 0, 4, 1.0), ("c", 0, 4, 1.0), liar="liar")
    hop = asyncio.run(swarm.route("m"))[0]
    hidden = torch.randn(1, 3, 8)
    lie = run_blocks(swarm.weights, hidden, 0, NUM_BLOCKS) + 1.0
    for seed in range(4):  # checkers come in random order; "a" failing never stops the verdict
        swarm.bans, swarm.calls = BanList(60.0), []
        swarm.fail[("fwd", "a")] = [PeerUnreachableError("a is down")]
        checker = SpotChecker(swarm, rng=random.Random(seed))
        assert asyncio.run(checker.caught("m", hop, hidden, lie, forward_call=swarm.forward))
        assert checker.stats.banned == {"liar"}
        tried_a = any(peer == "a" for _, peer, _, _ in swarm.calls)
        assert ("a" in swarm.bans.banned()) == tried_a
