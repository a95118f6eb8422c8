"""The preemption policy on its own, and the seam it plugs into: the Preemptor asks its victim function
which group goes, so another policy is another function. The mechanism (swap or recompute, swap-in
order) is tested through the scheduler in test_scheduler.py and test_beam_search.py."""

from scheduler_svc.preemption import SeqQueues, latest_arrival
from scheduler_svc.request import Request, Sequence
from tests.scheduler_svc.factories import check_invariants, params, scheduler, step


def running(*arrivals: int) -> list[Sequence]:
    seqs = []
    for i, arrival in enumerate(arrivals):
        request = Request(f"r{arrival}", 0, [1], params(), arrival, frozenset())
        seqs.append(Sequence(i, request, [1]))
    return seqs


def test_the_latest_arrival_is_the_victim():
    seqs = running(0, 1, 2)
    assert latest_arrival(seqs) is seqs[2].request


def test_the_preemptor_asks_its_victim_function():
    """The scenario of test_recompute_preemption_takes_latest_arrival_and_resumes_it, with the earliest
    arrival as the victim instead: "a" is preempted for "b", and both still finish."""
    s = scheduler(num_blocks=4, block_size=2, max_model_len=64)
    asked = []

    def earliest_arrival(queue):
        asked.append([q.seq_id for q in queue])
        return queue[0].request

    s.preemptor.victim = earliest_arrival
    a = s.add_request(0, "a", [1, 2, 3], params(max_tokens=4))
    b = s.add_request(0, "b", [4, 5, 6], params(max_tokens=4))
    step(s)
    step(s)
    out, _ = step(s)  # both need a 3rd block: the victim function picks "a"
    assert asked == [[0, 1]] and [p.seq_id for p in out.preempted] == [0]
    assert [(r.seq.seq_id, r.new_block_ids) for r in out.running] == [(1, [1])]  # a's tail block, freed first
    check_invariants(s)
    while s.has_work():
        step(s)
        check_invariants(s)
    assert [len(r.seqs[0].token_ids) for r in (a, b)] == [7, 7]


def test_the_dropped_ids_are_taken_once():
    queues = SeqQueues()
    queues.dropped_seq_ids += [3, 1]
    assert queues.take_dropped() == [3, 1] and queues.take_dropped() == []
