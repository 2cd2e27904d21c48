"""Task slicing, TaskMixture / TaskSequence semantics, render_mc and conversation validation."""
from collections import Counter

import pytest

from nanopipe.tasks.common import Task, TaskMixture, TaskSequence, check_conversation, render_mc


class Rows(Task):
    """A physical list of n tagged conversations."""

    def __init__(self, n, tag="t", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"},
                             {"role": "assistant", "content": "ok"}], "id": f"{self.tag}{index}"}


def ids(task):
    return [ex["id"] for ex in task]


def test_slicing_maps_logical_to_physical():
    task = Rows(10, start=2, stop=9, step=3)
    assert len(task) == 3  # ceil((9 - 2) / 3)
    assert ids(task) == ["t2", "t5", "t8"]
    full = Rows(10)
    assert full[5] == Rows(10, start=5, stop=10)[0]  # nanochat's MMLU smoke test, on a fake task
    assert len(Rows(10, start=5, stop=10)) == 5
    assert len(Rows(10, start=10)) == 0
    assert len(Rows(10, step=4)) == 3  # 0, 4, 8


def test_stop_is_not_clamped_to_num_examples():
    # nanochat semantics: a synthetic task can be read past its nominal size
    task = Rows(3, stop=5)
    assert len(task) == 5 and task[4]["id"] == "t4"


def test_slicing_argument_checks():
    with pytest.raises(ValueError, match="start"):
        Rows(5, start=-1)
    with pytest.raises(ValueError, match="stop"):
        Rows(5, start=3, stop=2)
    with pytest.raises(ValueError, match="step"):
        Rows(5, step=0)


def test_indexing_is_int_only_and_bounds_checked():
    task = Rows(4)
    with pytest.raises(TypeError, match="int"):
        task[1:3]
    with pytest.raises(TypeError):
        task["0"]
    with pytest.raises(IndexError, match="out of range"):
        task[4]
    with pytest.raises(IndexError):
        task[-1]
    assert len(list(task)) == 4  # iteration stops at the end


def test_base_task_is_abstract():
    task = Task()
    for call in (lambda: task.eval_type, task.num_examples, lambda: task.get_example(0), lambda: task.evaluate({}, "")):
        with pytest.raises(NotImplementedError):
            call()


def test_render_mc_exact_format():
    assert render_mc("Q?", ["A", "B"], ["x", "y"]) == (
        "Multiple Choice question: Q?\n- x=A\n- y=B\n\nRespond only with the letter of the correct answer.")


def test_mixture_is_a_deterministic_shuffle_of_all_rows():
    a, b = Rows(5, "a"), Rows(3, "b")
    mix = TaskMixture([a, b])
    assert len(mix) == 8
    assert sorted(ids(mix)) == sorted(ids(a) + ids(b))
    assert ids(mix) != ids(a) + ids(b)  # interleaved, not concatenated
    assert ids(TaskMixture([Rows(5, "a"), Rows(3, "b")])) == ids(mix)  # same on every rank / every run
    assert mix.index_map == TaskMixture([a, b]).index_map


def test_mixture_oversamples_a_task_listed_twice_and_respects_sub_slicing():
    a, b = Rows(4, "a"), Rows(4, "b", stop=2)
    mix = TaskMixture([a, a, b])
    counts = Counter(i[0] for i in ids(mix))
    assert counts == {"a": 8, "b": 2}
    assert Counter(ids(mix))["a0"] == 2


def test_mixture_slicing_and_range():
    mix = TaskMixture([Rows(6, "a"), Rows(6, "b")])
    sliced = TaskMixture([Rows(6, "a"), Rows(6, "b")], start=3, stop=9)
    assert ids(sliced) == ids(mix)[3:9]
    with pytest.raises(IndexError):
        mix.get_example(12)


def test_sequence_concatenates_in_order():
    seq = TaskSequence([Rows(2, "a"), Rows(3, "b", start=1)])
    assert ids(seq) == ["a0", "a1", "b1", "b2"]
    assert seq[2]["id"] == "b1"
    with pytest.raises(IndexError):
        seq.get_example(4)
    assert ids(TaskSequence([Rows(2, "a"), Rows(3, "b")], step=2)) == ["a0", "b0", "b2"]


def test_check_conversation_accepts_valid_and_rejects_invalid():
    ok = {"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": [{"type": "text", "text": "a "},
                                                         {"type": "python", "text": "1+1"},
                                                         {"type": "python_output", "text": "2"}]}]}
    check_conversation(ok)
    system = {"messages": [{"role": "system", "content": "s"}] + ok["messages"]}
    check_conversation(system, allow_system=True)
    bad = [
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": []}]},
        system,  # a system message only where allowed
        "not a dict",
    ]
    for conv in bad:
        with pytest.raises(ValueError):
            check_conversation(conv)
