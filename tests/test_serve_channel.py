"""server/channel.py: the one-way pipes between the API process and the engine core carry any picklable message
intact and in order, say when a message is waiting without consuming it, and report the other end's close."""
import multiprocessing

import pytest

from xverse_engine import SamplingParams
from xverse_engine.engine.outputs import RequestMetrics, TokenLogprob
from xverse_engine.server.channel import channel_pair


@pytest.fixture
def pipe():
    reader, writer = channel_pair(multiprocessing.get_context("spawn"))
    yield reader, writer
    reader.close()
    writer.close()


def test_messages_arrive_intact_and_in_order(pipe):
    reader, writer = pipe
    step = ("step", [(7, "", [101, 102], [TokenLogprob(101, -0.5, (101, 3), (-0.5, -1.5))], True, "length", None,
                      RequestMetrics(num_prompt_tokens=4, num_output_tokens=2))], 1, {"waiting": 0}, 0.004)
    commands = [("add", [(8, [1, 2, 3], SamplingParams(max_new_tokens=5, stop=["\n"]), True)]), ("abort", [7])]
    writer.send(step)
    writer.send(commands)
    assert reader.recv() == step
    assert reader.recv() == commands


def test_ready_says_whether_a_message_waits_without_taking_it(pipe):
    reader, writer = pipe
    assert not reader.ready()
    writer.send(("stop",))
    assert reader.ready() and reader.ready()   # asking twice takes nothing
    assert reader.recv() == ("stop",)
    assert not reader.ready()


def test_closing_the_writer_wakes_the_reader_and_ends_it(pipe):
    reader, writer = pipe
    writer.send("last")
    writer.close()
    reader.wait()                       # returns at once: a message waits, then end-of-file
    assert reader.recv() == "last"      # what was sent before the close still arrives
    assert reader.ready()               # the close reads as ready, so a poller does not sleep on a dead pipe
    with pytest.raises(EOFError):
        reader.recv()
