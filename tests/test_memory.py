"""Peak memory per phase (pipeline.training.memory): each phase is charged its own peak only."""

import torch

from pipeline.training.memory import PhaseMemory


def test_each_phase_reports_its_own_peak_not_an_earlier_ones():
    mem = PhaseMemory()
    mem.enter("small")
    small = torch.ones(2**20)  # 4 MiB, touched
    mem.enter("big")
    big = torch.ones(100 * 2**18)  # 100 MiB, touched
    del big
    mem.enter("after")  # the 100 MiB were freed (and handed back) before this phase
    more = torch.ones(2**20)
    peaks = mem.finish()
    assert peaks["peaks_reset"], "this Linux cannot reset VmHWM: peaks would be cumulative"
    rss = peaks["rss_mb"]
    assert rss["big"] - rss["small"] > 90, rss
    assert rss["after"] < rss["big"] - 80, rss
    mem.enter("big")  # a phase entered again keeps its largest peak
    assert mem.finish()["rss_mb"]["big"] == rss["big"]
    del small, more
