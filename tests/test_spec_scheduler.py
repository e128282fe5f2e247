"""The Scheduler's rules, without a model (milliseconds; test_scheduler.py checks the outputs through the
engine): running sequences first (one token each in decode, the next chunk of a prompt in prefill), then
waiting ones first come first served while the token budget, max_num_seqs and free blocks allow; when a
decode needs a block and none is free the newest running sequence gives way; scheduling commits the step
(computed tokens move on, a sampling sequence gains a pending token).
"""
import pytest

from xverse_engine import SamplingParams
from xverse_engine.engine.block_manager import BlockManager
from xverse_engine.engine.scheduler import Scheduler
from xverse_engine.engine.sequence import Sequence, SequenceStatus

BLOCK = 4
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, ignore_eos=True)


def seq(request_id, num_prompt, max_tokens=64):
    return Sequence(request_id, None, list(range(10, 10 + num_prompt)), GREEDY, seed=0, max_tokens=max_tokens)


def make(num_blocks=16, max_num_seqs=8, budget=64):
    return Scheduler(BlockManager(num_blocks, BLOCK), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def plan(items):
    """[(request id, first position, tokens, samples)] of a schedule."""
    return [(i.seq.request_id, i.start, i.num_new_tokens, i.samples) for i in items]


def tokens_arrive(items, token=7):
    """The sampled tokens of a step reach the host."""
    for item in items:
        if item.samples:
            item.seq.num_pending -= 1
            item.seq.append_token(token)


def test_waiting_sequences_are_admitted_first_come_first_served():
    s = make()
    a, b = seq(0, 5), seq(1, 3)
    s.add(a)
    s.add(b)
    assert s.has_unfinished()
    items = s.schedule()
    assert plan(items) == [(0, 0, 5, True), (1, 0, 3, True)]
    assert s.running == [a, b] and not s.waiting
    assert a.status == b.status == SequenceStatus.RUNNING
    assert (a.num_computed_tokens, a.num_pending, len(a.block_table)) == (5, 1, 2)
    assert a.first_scheduled_time is not None and a.first_scheduled_time == b.first_scheduled_time


def test_decode_gives_each_running_sequence_one_token_and_a_block_when_it_starts_one():
    s = make()
    a = seq(0, 4)
    s.add(a)
    tokens_arrive(s.schedule())
    first_time = a.first_scheduled_time
    items = s.schedule()               # the 5th token starts a second block
    assert plan(items) == [(0, 4, 1, True)]
    assert (a.num_computed_tokens, a.num_pending, len(a.block_table)) == (5, 1, 2)
    assert a.first_scheduled_time == first_time
    for _ in range(3):                 # the 6th, 7th and 8th fit in the second block, the 8th exactly
        tokens_arrive(items)
        items = s.schedule()
        assert len(a.block_table) == 2
    assert a.num_computed_tokens == 8
    tokens_arrive(items)
    s.schedule()                       # the 9th starts a third
    assert len(a.block_table) == 3


def test_the_next_step_is_planned_before_the_sampled_token_arrives():
    """Asynchronous scheduling: a pending token counts; its sequence decodes again at once."""
    s = make()
    a = seq(0, 3)
    s.add(a)
    s.schedule()
    assert a.num_pending == 1 and a.num_tokens == 4
    assert plan(s.schedule()) == [(0, 3, 1, True)]
    assert a.num_pending == 2 and a.num_computed_tokens == 4


@pytest.mark.parametrize("last_chunk", [1, 2, 3])
def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget(last_chunk):
    s = make(budget=8)
    a, b = seq(0, 16 + last_chunk), seq(1, 2)
    s.add(a)
    s.add(b)
    assert plan(s.schedule()) == [(0, 0, 8, False)]        # the budget is spent: b waits
    assert a.num_pending == 0 and a.num_computed_tokens == 8 and len(a.block_table) == a.num_tokens // BLOCK + 1
    assert plan(s.schedule()) == [(0, 8, 8, False)]
    assert plan(s.schedule()) == [(0, 16, last_chunk, True), (1, 0, 2, True)]
    assert a.num_pending == 1 and a.num_computed_tokens == 16 + last_chunk


def test_running_sequences_beyond_the_budget_wait_for_the_next_step():
    s = make(budget=3)
    seqs = [seq(i, 1) for i in range(3)]
    for x in seqs:
        s.add(x)
    tokens_arrive(s.schedule())
    assert plan(s.schedule()) == [(0, 1, 1, True), (1, 1, 1, True), (2, 1, 1, True)]   # exactly the budget
    for x in seqs:
        x.num_pending -= 1
        x.append_token(7)
    s.max_num_batched_tokens = 2
    assert plan(s.schedule()) == [(0, 2, 1, True), (1, 2, 1, True)]
    assert seqs[2].num_computed_tokens == 2 and seqs[2].num_pending == 0


def test_decodes_spend_the_budget_before_waiting_prompts():
    s = make(budget=4)
    a, b = seq(0, 2), seq(1, 2)
    s.add(a)
    s.add(b)
    tokens_arrive(s.schedule())
    c = seq(2, 6)
    s.add(c)
    assert plan(s.schedule()) == [(0, 2, 1, True), (1, 2, 1, True), (2, 0, 2, False)]


def test_a_sequence_that_is_done_does_not_hold_up_the_ones_after_it():
    s = make()
    a, b, c = seq(0, 1), seq(1, 1, max_tokens=2), seq(2, 1)
    for x in (a, b, c):
        s.add(x)
    items = s.schedule()
    tokens_arrive([i for i in items if i.seq is not b])     # b's last token is still on its way
    assert plan(s.schedule()) == [(0, 1, 1, True), (2, 1, 1, True)]


def test_a_prompt_that_completes_behind_a_finished_sequence_is_scheduled_once():
    s = make(budget=8)
    a, b = seq(0, 1, max_tokens=2), seq(1, 12)
    s.add(a)
    s.add(b)
    assert plan(s.schedule()) == [(0, 0, 1, True), (1, 0, 7, False)]
    assert plan(s.schedule()) == [(1, 7, 5, True)]           # a's last token is on its way: nothing for a


def test_the_last_token_of_the_budget_starts_a_prompt():
    s = make(budget=3)
    s.add(seq(0, 2))
    s.add(seq(1, 4))
    assert plan(s.schedule()) == [(0, 0, 2, True), (1, 0, 1, False)]


def test_max_num_seqs_caps_the_running_sequences():
    s = make(max_num_seqs=2)
    seqs = [seq(i, 2) for i in range(3)]
    for x in seqs:
        s.add(x)
    assert [i.seq.request_id for i in s.schedule()] == [0, 1]
    assert list(s.waiting) == [seqs[2]]


def test_a_prompt_waits_until_all_its_blocks_are_free():
    s = make(num_blocks=3)
    a, b = seq(0, 8), seq(1, 5)       # 2 blocks, then 2 more: only 1 left
    s.add(a)
    s.add(b)
    assert [i.seq.request_id for i in s.schedule()] == [0]
    assert list(s.waiting) == [b]
    s.remove(a)
    assert not s.running and s.block_manager.num_free_blocks == 3
    assert [i.seq.request_id for i in s.schedule()] == [1]


def test_a_sequence_whose_last_token_is_on_its_way_is_not_scheduled():
    s = make()
    a = seq(0, 3, max_tokens=4)       # the prompt's step draws the 4th and last token
    s.add(a)
    s.schedule()
    assert a.num_tokens == 4 and s.schedule() == []


def test_the_newest_running_sequence_gives_way_when_no_block_is_free():
    s = make(num_blocks=2)
    a, b = seq(0, 4), seq(1, 4)
    s.add(a)
    s.add(b)
    tokens_arrive(s.schedule())       # each fills its block; the next token needs a new one
    s.add(seq(2, 1))
    items = s.schedule()
    assert plan(items) == [(0, 4, 1, True)]                 # b preempted, and nothing admitted this step
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.running == [a]
    assert (b.num_preemptions, s.num_preemptions) == (1, 1)
    assert s.take_preempted() == [b] and s.take_preempted() == []


def test_preemptions_are_counted_per_sequence_and_in_total():
    s = make(num_blocks=2)
    a, b = seq(0, 4), seq(1, 4)
    s.add(a)
    s.add(b)
    tokens_arrive(s.schedule())
    tokens_arrive(s.schedule())       # a takes the second block; b gives way
    s.remove(a)
    for _ in range(4):                # b recomputes its 5 tokens, then decodes up to 9 in its 2 blocks
        tokens_arrive(s.schedule())
    assert b.num_tokens == 9 and b.status == SequenceStatus.RUNNING
    assert s.schedule() == []         # the 9th needs a third block: b gives way again, to no one
    assert (b.num_preemptions, s.num_preemptions) == (2, 2)
    assert s.take_preempted() == [b, b]


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    s = make(num_blocks=1)
    a = seq(0, 4)
    s.add(a)
    tokens_arrive(s.schedule())
    assert s.schedule() == []
    assert a.status == SequenceStatus.WAITING and list(s.waiting) == [a] and not s.running
    assert s.take_preempted() == [a]


def test_a_preempted_sequence_is_not_readmitted_while_its_token_is_pending():
    s = make(num_blocks=2)
    a, b = seq(0, 4), seq(1, 4)
    s.add(a)
    s.add(b)
    s.schedule()                       # both pending
    s.schedule()                       # a's 5th position needs a block: b gives way with its token pending
    assert b.num_pending == 1 and s.waiting[0] is b
    assert [i.seq.request_id for i in s.schedule()] == [0]     # b waits for its token


def test_removing_a_waiting_or_running_sequence_frees_its_blocks():
    s = make()
    a, b = seq(0, 6), seq(1, 2)
    s.add(a)
    s.schedule()
    s.add(b)
    s.remove(b)
    assert not s.waiting
    s.remove(a)
    assert not s.running and not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 16
